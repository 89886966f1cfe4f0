"""The prepared GPU-machine check (issue 18, issue 12): one short script, run as

    python -m bench.device_check --out RESULTS_DIR [--demo CANONICAL_DIR] [--work DIR] [--explore]

1. Synthetic full-size files from ``bench/full_size_layout.json`` (the released
   configs' names, dtypes and shapes; random values) are written to ``--work``.
2. With ``--explore``: ``bench.bulk_load.explore`` times the loader's variants (each
   first checked byte for byte against ``load_file``); steps 3 and 4 then use the
   fastest verified one, else the loader's defaults.
3. Correctness: every tensor ``reference.load.load(..., device)`` gives equals
   ``safetensors.torch.load_file(..., device)``'s, byte for byte, for the full-size
   files and the demo canonical files.
4. ``bench.bulk_load.measure``: warm and cold load times against ``load_file`` and the
   page-cache and host-to-device limits, and the thread/piece grid.
5. The reference runtime on the demo canonical files loaded onto the device: every
   entry point's outputs against the same entry point on the CPU (max abs difference).

It needs torch, safetensors and this checkout only, and works on a CPU-only machine too
(``--device cpu``), which is how it is tried before a GPU run.  Results go to
``RESULTS_DIR/device_check.json`` and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = os.path.join(ROOT, "bench", "full_size_layout.json")


def log(msg: str) -> None:
    print(msg, flush=True)


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current",
                                                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    return info


def reference_on_device(demo: str, device: str) -> dict:
    """Every entry point on the demo files: device against CPU."""
    import torch

    from reference.entry import entries
    from reference.load import load

    cpu = {k: f.float() for k, f in load(demo, device="cpu").items()}
    dev = {k: f.float() for k, f in load(demo, device=device).items()}
    out = {}
    for kind in sorted(cpu):
        for e in entries(kind):
            inputs = e.inputs(cpu[kind].config, torch.Generator().manual_seed(0))
            try:
                with torch.no_grad():
                    a = e.run(cpu[kind], None, **inputs)
                    b = e.run(dev[kind], None, **{k: v.to(device) for k, v in inputs.items()})
            except Exception as err:  # noqa: BLE001 - report and go on with the other entries
                out[f"{kind}.{e.name}"] = {"error": f"{type(err).__name__}: {err}"[:300]}
                continue
            diffs = {}
            for k in a:
                x, y = a[k], b[k].cpu()
                diffs[k] = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
            out[f"{kind}.{e.name}"] = diffs
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--demo", default=None, help="A folder of demo canonical files (convert.py all output).")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-cache", "device-full"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-synth", action="store_true", help="Reuse the files already in --work.")
    ap.add_argument("--explore", action="store_true",
                    help="First time the loader's variants (bench.bulk_load.explore) and measure the fastest verified one.")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from bench import bulk_load

    res: dict = {"machine": machine(args.device)}
    os.makedirs(args.out, exist_ok=True)

    def save():  # after each step: a run cut short still leaves what it measured
        with open(os.path.join(args.out, "device_check.json"), "w") as f:
            json.dump(res, f, indent=2)

    log(json.dumps(res["machine"]))
    t = time.perf_counter()
    if not args.skip_synth:
        bulk_load.synth(LAYOUT, args.work, log)
    res["synth_s"] = round(time.perf_counter() - t, 1)
    full = bulk_load.large_files(args.work)
    options: dict = {}
    if args.explore:
        res["explore"] = ex = bulk_load.explore(args.work, args.device, runs=args.runs, log=log)
        if ex.get("best"):
            b = ex["best"]
            options = {"staging": b["staging"], "copier": b["copier"], "threads": b["threads"],
                       "piece_bytes": b["piece_mib"] << 20}
        save()
    res["options"] = dict(options)
    for name, paths in (("full", full), ("demo", [os.path.join(args.demo, n) for n in sorted(os.listdir(args.demo))
                                                   if n.endswith(".safetensors")] if args.demo else [])):
        if paths:
            res[f"identical_{name}"] = r = bulk_load.same_as_library(paths, args.device, **options)
            log(f"byte-identical to load_file ({name}): {r['tensors'] - len(r['mismatches'])}/{r['tensors']} tensors"
                + (f"; MISMATCHES: {r['mismatches'][:5]}" if r["mismatches"] else ""))
    res["bulk_load"] = bulk_load.measure(args.work, args.device, runs=args.runs, cold=True, log=log,
                                         threads=options.get("threads"), piece=options.get("piece_bytes"),
                                         staging=options.get("staging"), copier=options.get("copier"))
    save()
    if args.demo:
        try:
            res["reference_vs_cpu"] = r = reference_on_device(args.demo, args.device)
            for k, d in r.items():
                log(f"reference {k} on {args.device} vs cpu: " + ", ".join(f"{o} {v:.2e}" if isinstance(v, float) else f"{o} {v}"
                                                                          for o, v in d.items()))
        except Exception as e:  # noqa: BLE001 - report, keep the other results
            res["reference_vs_cpu_error"] = f"{type(e).__name__}: {e}"
            log(f"reference on device FAILED: {res['reference_vs_cpu_error']}")
    save()
    return res


if __name__ == "__main__":
    main()
