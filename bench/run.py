"""Measure the converter against its baselines (issue 8) and print a table.

    python -m bench.run [--cache DIR] [--results DIR] [--runs N] [--size full|tiny] [--release 2.0|2.5]

Every timed command runs in a fresh process, with a warm page cache (all inputs are
read once first), and is repeated ``--runs`` times; the table shows the median.
Conversions and their copy baselines alternate, so a noisy neighbour hurts both.

1. Conversion speed: ``convert.py gpt`` against ``cp gpt.pth X && sync X`` (the
   converter fsyncs its output too), and ``convert.py all`` against copying all of
   its inputs and syncing each copy.  Target: ratio <= 1.2.
2. Memory: peak anonymous resident memory (``RssAnon`` in ``/proc/PID/status``:
   private, non-file-backed pages, interpreter included; page-cache and mmap pages of
   files are not counted) of ``convert.py gpt`` plus its hashing child process,
   summed and sampled every ``POLL_S`` seconds by this process.  A spike shorter than the interval could be missed; tensors live for
   at least the time it takes to write them, and the largest (0.5 GB) take far longer
   than that.  Reference row: a naive converter (torch.load, a dict, save_file).
   Target: < 512 MiB.
3. ``convert.py check`` on the four outputs: wall time of the command.  Target: < 1 s.
4. Runtime load, in a fresh process per side, timed inside it (imports excluded):
   ``safetensors.torch.load_file`` of the canonical file, then one read of every byte
   of every tensor (copied piece by piece through a 1 MiB staging buffer, as a copy
   to a device reads host memory: mmap-backed tensors count only once read), against
   ``torch.load``
   of the upstream file plus the transforms a port has to do (the file's own
   provenance op chains applied with ``converters.format.ops.apply``, each result made
   contiguous).  Target: canonical at least 8x faster, for the ``.pth`` models.
   Where CUDA is available the pair also runs with ``device="cuda"`` (``load_file``
   straight to the GPU against ``torch.load(map_location="cuda")`` plus the transforms
   on the GPU, both synchronised), as extra rows.
5. The reference loader (``reference/load.py``, issue 18): :mod:`bench.bulk_load` on the
   four large outputs, against ``load_file`` and the page-cache (and, on a GPU, the
   host-to-device) limits; cold too on a GPU.

``--release 2.5`` (full size only) runs the same on the synthetic IndexTTS-2.5 release
(``bench.inputs`` size ``full-2.5``, in ``CACHE/release-2.5``), and adds row 2 for the
semantic codec: peak RssAnon of ``convert.py semantic-codec codec.pth`` (the ~405 MB of
optimizer state beside the codec's ``model`` must never be read), against a naive
``torch.load`` of the file.  Results go to ``latest-full-2.5.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from . import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "convert.py")
PY = sys.executable
POLL_S = 0.002
LARGE = ("gpt", "s2mel", "w2v-bert", "bigvgan")  # the four large models the load rows measure


def _out_names() -> dict[str, str]:
    sys.path.insert(0, ROOT)
    from converters.format.schema import model_spec

    return {k: model_spec(k)["file"] for k in LARGE}


OUT_NAMES = _out_names()
TARGETS = {"convert_ratio": 1.2, "memory_mib": 512, "check_s": 1.0, "load_speedup": 8.0}


# ------------------------------------------------------------------ machine


def machine(folder: str) -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    disk = {"free_gib": round(shutil.disk_usage(folder).free / 2**30, 1)}
    try:
        out = subprocess.run(["df", "-T", folder], capture_output=True, text=True, check=True).stdout.splitlines()[-1].split()
        disk.update(device=out[0], fstype=out[1], size_gib=round(int(out[2]) / 2**20, 1))
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        pass
    import torch

    return {
        "cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(mem / 2**30, 1), "disk": disk,
        "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }


# ------------------------------------------------------------------ helpers


def timed(cmd: list[str] | str, **kw) -> float:
    # Flush writeback left by the previous step (removed outputs, earlier copies), so it
    # is not billed to this command: untimed, before every measurement on both sides.
    os.sync()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def warm(paths) -> None:
    """Read files once so the page cache holds them (both sides start warm)."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def rmtree(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the converter starts a hashing child)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def _status(pid: int, *keys: str) -> dict[str, int]:
    got = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                k = ln.split(":", 1)[0]
                if k in keys:
                    got[k] = int(ln.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return got


def peak_anon(cmd: list[str]) -> dict:
    """Run cmd; sample the summed RssAnon of it and its child processes (and the
    main process's VmHWM) from /proc/PID/status."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak, samples, hwm = 0, 0, 0
    t = time.perf_counter()
    while proc.poll() is None:
        total = 0
        for pid in _tree(proc.pid):
            st = _status(pid, "RssAnon", "VmHWM")
            total += st.get("RssAnon", 0)
            if pid == proc.pid and "VmHWM" in st:
                hwm = st["VmHWM"]
        if total:
            peak = max(peak, total)
            samples += 1
        time.sleep(POLL_S)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return {"peak_rss_anon_mib": round(peak / 1024, 1), "peak_rss_total_mib": round(hwm / 1024, 1), "samples": samples, "wall_s": round(wall, 3)}


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


# ------------------------------------------------------------------ measurements


def bench_convert(release: str, work: str, runs: int, log, size: str = "full") -> dict:
    files = inputs.release_files(release, size)
    out_gpt, copy_gpt = os.path.join(work, "gpt.safetensors"), os.path.join(work, "gpt.copy")
    out_all, copy_all = os.path.join(work, "all"), os.path.join(work, "all.copy")
    warm(files.values())
    res: dict = {"gpt": {"convert_s": [], "copy_s": [], "sha256sum_s": []}, "all": {"convert_s": [], "copy_s": []}}
    for i in range(runs):
        order = [0, 1] if i % 2 == 0 else [1, 0]
        for which in order:
            if which == 0:
                rmtree(out_gpt)
                res["gpt"]["convert_s"].append(timed([PY, CONVERT, "gpt", files["gpt"], out_gpt, "--quiet"]))
                rmtree(out_gpt)
            else:
                rmtree(copy_gpt)
                res["gpt"]["copy_s"].append(timed(f'cp "{files["gpt"]}" "{copy_gpt}" && sync "{copy_gpt}"', shell=True))
                rmtree(copy_gpt)
        res["gpt"]["sha256sum_s"].append(timed(["sha256sum", files["gpt"]]))
        log(f"convert gpt: run {i + 1}: {res['gpt']['convert_s'][-1]:.2f} s, cp+sync {res['gpt']['copy_s'][-1]:.2f} s, "
            f"sha256sum {res['gpt']['sha256sum_s'][-1]:.2f} s")
    srcs = inputs.all_inputs(release)
    warm(srcs)
    for i in range(runs):
        order = [0, 1] if i % 2 == 0 else [1, 0]
        for which in order:
            if which == 0:
                rmtree(out_all)
                res["all"]["convert_s"].append(timed([PY, CONVERT, "all", "--src", release, "--out", out_all, "--quiet"]))
            else:
                rmtree(copy_all)
                os.makedirs(copy_all)
                dsts = [os.path.join(copy_all, f"{i}.{os.path.basename(p)}") for i, p in enumerate(srcs)]
                cmd = " && ".join(f'cp "{s}" "{d}"' for s, d in zip(srcs, dsts)) + " && sync " + " ".join(f'"{d}"' for d in dsts)
                res["all"]["copy_s"].append(timed(cmd, shell=True))
                rmtree(copy_all)
        log(f"convert all: run {i + 1}: {res['all']['convert_s'][-1]:.2f} s, copy+sync {res['all']['copy_s'][-1]:.2f} s")
    for r in res.values():
        r["convert_median_s"], r["copy_median_s"] = median(r["convert_s"]), median(r["copy_s"])
        r["ratio"] = round(r["convert_median_s"] / r["copy_median_s"], 3)
    g = res["gpt"]
    g["sha256sum_median_s"] = median(g["sha256sum_s"])
    # issue 16's bound: the larger of the copy and the source's sha256sum
    g["ratio_copy_or_hash"] = round(g["convert_median_s"] / max(g["copy_median_s"], g["sha256sum_median_s"]), 3)
    res["input_bytes"] = {"gpt": os.path.getsize(files["gpt"]), "all": sum(os.path.getsize(p) for p in srcs)}
    return res


IMPORT_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
# One conversion through the CLI in-process, then whether torch was imported.
IMPORTS_TORCH = """
import sys
sys.path.insert(0, sys.argv[1])
from converters.cli.commands import main
main(sys.argv[2:], standalone_mode=False)
print("torch" in sys.modules)
"""


def bench_torch_free(release: str, work: str, runs: int, log, size: str = "full") -> dict:
    """Issue 16: what ``import torch`` costs in a fresh process, whether the gpt and
    w2v-bert conversions import it, and the w2v-bert conversion against copying its
    source."""
    files = inputs.release_files(release, size)
    res: dict = {"import_torch_s": [float(subprocess.run([PY, "-c", IMPORT_TORCH], check=True, capture_output=True,
                                                         text=True).stdout) for _ in range(runs)]}
    res["import_torch_median_s"] = median(res["import_torch_s"])
    out = os.path.join(work, "torch-free.safetensors")
    res["imports_torch"] = {}
    for kind in ("gpt", "w2v-bert"):
        rmtree(out)
        p = subprocess.run([PY, "-c", IMPORTS_TORCH, ROOT, kind, files[kind], out, "--quiet"], check=True, capture_output=True, text=True)
        res["imports_torch"][kind] = p.stdout.strip().splitlines()[-1] == "True"
        rmtree(out)
    w = {"convert_s": [], "copy_s": []}
    copy = os.path.join(work, "w2v.copy")
    warm([files["w2v-bert"], files["stats"]])
    for _ in range(runs):
        rmtree(out)
        w["convert_s"].append(timed([PY, CONVERT, "w2v-bert", files["w2v-bert"], out, "--quiet"]))
        rmtree(out)
        rmtree(copy)
        w["copy_s"].append(timed(f'cp "{files["w2v-bert"]}" "{copy}" && sync "{copy}"', shell=True))
        rmtree(copy)
    w["convert_median_s"], w["copy_median_s"] = median(w["convert_s"]), median(w["copy_s"])
    w["ratio"] = round(w["convert_median_s"] / w["copy_median_s"], 3)
    res["w2v-bert"] = w
    log(f"import torch {res['import_torch_median_s']:.2f} s; imports torch: {res['imports_torch']}; "
        f"w2v-bert {w['convert_median_s']:.2f} s vs cp+sync {w['copy_median_s']:.2f} s")
    return res


# The naive converters the memory rows compare with: torch.load the whole file (the
# state dict under ``key`` if given), then save_file.
NAIVE = """
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
if sys.argv[3]:
    sd = sd[sys.argv[3]]
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])
"""


def _peak_memory(kind: str, src: str, work: str, runs: int, log, naive_key: str = "") -> dict:
    """Peak RssAnon of ``convert.py KIND`` on ``src`` (``runs`` times) and of the naive converter."""
    out = os.path.join(work, "out.safetensors")
    warm([src])
    conv = []
    for i in range(runs):
        rmtree(out)
        conv.append(peak_anon([PY, CONVERT, kind, src, out, "--quiet"]))
        log(f"memory {kind}: run {i + 1}: {conv[-1]['peak_rss_anon_mib']} MiB anon, {conv[-1]['wall_s']} s")
    rmtree(out)
    naive = peak_anon([PY, "-c", NAIVE, src, out, naive_key])
    log(f"memory naive {kind}: {naive['peak_rss_anon_mib']} MiB anon")
    rmtree(out)
    return {
        "converter": {"runs": conv, "peak_rss_anon_mib": max(r["peak_rss_anon_mib"] for r in conv)},
        "naive": naive, "poll_interval_s": POLL_S,
    }


def bench_memory(release: str, work: str, runs: int, log, size: str = "full") -> dict:
    return _peak_memory("gpt", inputs.release_files(release, size)["gpt"], work, runs, log)


def bench_codec_memory(release: str, work: str, runs: int, log, size: str = "full-2.5") -> dict:
    """Peak RssAnon of ``convert.py semantic-codec`` on a 2.5 ``codec.pth`` (its optimizer
    state is never read), and of a naive converter that ``torch.load``s the whole file."""
    src = inputs.release_files(release, size)["codec"]
    res = _peak_memory("semantic-codec", src, work, runs, log, naive_key="model")
    import torch

    ck = torch.load(src, map_location="meta", weights_only=True, mmap=True)
    nbytes = lambda x: sum(t.numel() * t.element_size() for t in x)  # noqa: E731
    return {**res, "source_bytes": os.path.getsize(src), "model_bytes": nbytes(ck["model"].values()),
            "optimizer_bytes": nbytes(t for st in ck["optimizer"]["state"].values() for t in st.values())}


def bench_check(out_dir: str, runs: int, log) -> dict:
    files = [os.path.join(out_dir, n) for n in OUT_NAMES.values()]
    warm(files)
    ts = [timed([PY, CONVERT, "check", *files]) for _ in range(runs)]
    log(f"check: {', '.join(f'{t:.2f}' for t in ts)} s")
    return {"files": len(files), "bytes": sum(map(os.path.getsize, files)), "wall_s": [round(t, 3) for t in ts], "median_s": median(ts)}


LOADER = r"""
import json, sys, time
import torch
from safetensors.torch import load_file

def touch(sd):
    # Read every byte of every tensor once, as a copy to a device reads host memory:
    # piece by piece through one small reused staging buffer (1 MiB, it stays in the
    # CPU cache), so mmap-backed pages are faulted in and read, and no second full
    # copy is written to host memory.
    step = 1 << 20
    scratch = torch.empty(step, dtype=torch.uint8)
    for t in sd.values():
        b = t.reshape(-1).view(torch.uint8)
        for i in range(0, b.numel(), step):
            piece = b[i:i + step]
            scratch[:piece.numel()].copy_(piece)

def flatten(obj, prefix=""):
    out = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out

def upstream(kind, paths, prov, device):
    if kind == "w2v-bert":   # upstream ships safetensors here already: read it fully too
        sd = load_file(paths["main"], device=device)
        if device == "cpu":
            touch(sd)
        sd.update({"stats/" + k: v for k, v in torch.load(paths["stats"], map_location=device, weights_only=True).items()})
    else:
        obj = torch.load(paths["main"], map_location=device, weights_only=True)
        sd = flatten(obj["net"]) if kind == "s2mel" else obj.get("generator", obj)
    from converters.format import ops
    ready = {}
    for name, p in prov.items():
        if p["from"]:
            ready[name] = ops.apply(p["op"], [sd[s] for s in p["from"]]).contiguous()
    return ready

def canonical(path, device):
    sd = load_file(path, device=device)
    if device == "cpu":
        touch(sd)   # on a GPU the tensors are already copied in by load_file
    return sd

side, kind, path, extra, device = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
if device == "cuda":
    torch.zeros(1, device="cuda")  # CUDA context created before the clock starts, on both sides
t = time.perf_counter()
if side == "canonical":
    sd = canonical(path, device)
else:
    sd = upstream(kind, extra["paths"], extra["prov"], device)
if device == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"s": time.perf_counter() - t, "tensors": len(sd)}))
"""


def bench_load(release: str, out_dir: str, runs: int, log, device: str = "cpu", size: str = "full") -> dict:
    sys.path.insert(0, ROOT)
    from converters.io import safetensors_io as stio

    files = inputs.release_files(release, size)
    res = {}
    for kind, name in OUT_NAMES.items():
        canon = os.path.join(out_dir, name)
        md = stio.read_header(canon).metadata
        prov = json.loads(md["provenance"])
        paths = {"main": files[kind]}
        if kind == "w2v-bert":
            paths["stats"] = files["stats"]
        warm([canon, *paths.values()])
        extra = json.dumps({"paths": paths, "prov": prov})
        row = {"canonical_s": [], "upstream_s": []}
        for _ in range(runs):
            for side in ("canonical", "upstream"):
                out = subprocess.run([PY, "-c", LOADER, side, kind, canon, extra, device], check=True, capture_output=True,
                                     text=True, cwd=ROOT).stdout
                row[f"{side}_s"].append(round(json.loads(out.splitlines()[-1])["s"], 3))
        row["canonical_median_s"], row["upstream_median_s"] = median(row["canonical_s"]), median(row["upstream_s"])
        row["speedup"] = round(row["upstream_median_s"] / max(row["canonical_median_s"], 1e-9), 1)
        row["upstream_format"] = "safetensors" if kind == "w2v-bert" else "pth"
        row["device"] = device
        res[kind if device == "cpu" else f"{kind} ({device})"] = row
        log(f"load {kind} on {device}: canonical {row['canonical_median_s']} s, upstream {row['upstream_median_s']} s ({row['speedup']}x)")
    return res


# ------------------------------------------------------------------ report


def verdicts(r: dict) -> dict:
    c, m, k, ld = r["convert"], r["memory"], r["check"], r["load"]
    return {
        "convert_gpt": c["gpt"]["ratio"] <= TARGETS["convert_ratio"],
        "convert_all": c["all"]["ratio"] <= TARGETS["convert_ratio"],
        **({"convert_gpt_copy_or_hash": c["gpt"]["ratio_copy_or_hash"] <= TARGETS["convert_ratio"]} if "ratio_copy_or_hash" in c["gpt"] else {}),
        **({f"no_torch_{k}": not v for k, v in r["torch_free"]["imports_torch"].items()} if "torch_free" in r else {}),
        "memory_gpt": m["converter"]["peak_rss_anon_mib"] < TARGETS["memory_mib"],
        "check": k["median_s"] < TARGETS["check_s"],
        **({"memory_codec": r["codec_memory"]["converter"]["peak_rss_anon_mib"] < TARGETS["memory_mib"]} if "codec_memory" in r else {}),
        **{f"load_{kind}": row["speedup"] >= TARGETS["load_speedup"] for kind, row in ld.items() if row["upstream_format"] == "pth"},
    }


def table(r: dict) -> str:
    c, m, k, ld, ok = r["convert"], r["memory"], r["check"], r["load"], r["verdicts"]
    mark = lambda key: "met" if ok[key] else "MISSED"  # noqa: E731
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    rows = [
        ("1. convert gpt.pth", f"{c['gpt']['convert_median_s']:.2f} s", f"cp+sync {c['gpt']['copy_median_s']:.2f} s",
         f"{c['gpt']['ratio']:.2f}x", f"<= {TARGETS['convert_ratio']}x: {mark('convert_gpt')}"),
        ("1. convert gpt.pth (issue 16)", f"{c['gpt']['convert_median_s']:.2f} s",
         f"max(cp+sync, sha256sum {c['gpt']['sha256sum_median_s']:.2f} s)", f"{c['gpt']['ratio_copy_or_hash']:.2f}x",
         f"<= {TARGETS['convert_ratio']}x: {mark('convert_gpt_copy_or_hash')}"),
        (f"1. convert all ({gib(c['input_bytes']['all'])})", f"{c['all']['convert_median_s']:.2f} s",
         f"cp+sync {c['all']['copy_median_s']:.2f} s", f"{c['all']['ratio']:.2f}x", f"<= {TARGETS['convert_ratio']}x: {mark('convert_all')}"),
        ("2. peak RssAnon, convert gpt.pth", f"{m['converter']['peak_rss_anon_mib']:.0f} MiB", "", "", f"< {TARGETS['memory_mib']} MiB: {mark('memory_gpt')}"),
        ("2. peak RssAnon, naive converter", f"{m['naive']['peak_rss_anon_mib']:.0f} MiB", "", "", "reference"),
    ]
    if "codec_memory" in r:
        cm = r["codec_memory"]
        rows += [
            (f"2. peak RssAnon, convert codec.pth ({cm['source_bytes'] / 1e6:.0f} MB)", f"{cm['converter']['peak_rss_anon_mib']:.0f} MiB",
             "", "", f"< {TARGETS['memory_mib']} MiB: {mark('memory_codec')}"),
            ("2. peak RssAnon, naive codec converter", f"{cm['naive']['peak_rss_anon_mib']:.0f} MiB", "", "", "reference"),
        ]
    rows += [
        ("3. check, 4 outputs", f"{k['median_s']:.2f} s", "", "", f"< {TARGETS['check_s']:.0f} s: {mark('check')}"),
    ]
    for kind, row in ld.items():
        base = "load_file" if row["upstream_format"] == "safetensors" else "torch.load"
        target = f">= {TARGETS['load_speedup']:.0f}x: {mark('load_' + kind)}" if f"load_{kind}" in ok else "info (upstream is safetensors)"
        rows.append((f"4. load {kind}", f"{row['canonical_median_s']:.2f} s", f"{base}+transforms {row['upstream_median_s']:.2f} s",
                     f"{row['speedup']:.1f}x", target))
    if "torch_free" in r:
        tf = r["torch_free"]
        w = tf["w2v-bert"]
        for kind, imported in tf["imports_torch"].items():
            rows.append((f"5. convert {kind}: import torch", "yes" if imported else "no",
                         f"import torch {tf['import_torch_median_s']:.2f} s", "", f"no: {mark('no_torch_' + kind)}"))
        rows.append(("5. convert w2v-bert", f"{w['convert_median_s']:.2f} s", f"cp+sync {w['copy_median_s']:.2f} s",
                     f"{w['ratio']:.2f}x", "info"))
    head = ("measurement", "ours (median)", "baseline (median)", "ratio", "target")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
    line = lambda x: "| " + " | ".join(str(v).ljust(w) for v, w in zip(x, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def describe(mc: dict) -> str:
    d = mc["disk"]
    return (f"{mc['cpus']} CPUs ({mc['cpu_model']}), {mc['memory_gib']} GiB RAM, disk {d.get('device', '?')} "
            f"({d.get('fstype', '?')}, {d.get('size_gib', '?')} GiB), Linux {mc['kernel']}, Python {mc['python']}, "
            f"torch {mc['torch']}, CUDA {'yes' if mc['cuda'] else 'no'}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.environ.get("BENCH_CACHE", "bench-cache"), help="Folder for the generated inputs (reused).")
    ap.add_argument("--results", default="bench-results", help="Folder for the JSON results.")
    ap.add_argument("--runs", type=int, default=5, help="Runs per measurement (the median is reported).")
    ap.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: the smoke test's small inputs.")
    ap.add_argument("--release", choices=("2.0", "2.5"), default="2.0",
                    help="2.5: the synthetic IndexTTS-2.5 release (full size only), plus the codec's memory row.")
    args = ap.parse_args(argv)
    if args.release == "2.5" and args.size != "full":
        ap.error("--release 2.5 has full-size inputs only")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cache = os.path.abspath(args.cache)
    size = "full-2.5" if args.release == "2.5" else args.size
    folder = {"full": "release", "tiny": "release-tiny", "full-2.5": "release-2.5"}[size]
    release = inputs.ensure(os.path.join(cache, folder), size, log)
    work = os.path.join(cache, "work")
    rmtree(work)
    os.makedirs(work)
    result: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "size": size, "runs": args.runs,
                    "machine": machine(cache)}
    log(f"machine: {describe(result['machine'])}")
    try:
        result["convert"] = bench_convert(release, work, args.runs, log, size)
        result["torch_free"] = bench_torch_free(release, work, args.runs, log, size)
        result["memory"] = bench_memory(release, work, args.runs, log, size)
        if args.release == "2.5":
            result["codec_memory"] = bench_codec_memory(release, work, args.runs, log, size)
        outs = os.path.join(work, "outputs")
        subprocess.run([PY, CONVERT, "all", "--src", release, "--out", outs, "--quiet"], check=True, stdout=subprocess.DEVNULL)
        result["check"] = bench_check(outs, args.runs if args.size == "tiny" else max(args.runs, 5), log)
        result["load"] = bench_load(release, outs, args.runs, log, size=size)
        if result["machine"]["cuda"]:  # also on the GPU, where there is one
            result["load"].update(bench_load(release, outs, args.runs, log, device="cuda", size=size))
        # issue 18: the reference loader against load_file and the machine's limits
        from . import bulk_load

        result["bulk_load"] = {"cpu": bulk_load.measure(outs, "cpu", runs=args.runs, log=log)}
        if result["machine"]["cuda"]:
            result["bulk_load"]["cuda"] = bulk_load.measure(outs, "cuda", runs=args.runs, cold=True, log=log)
        if size in ("full", "full-2.5"):  # issue 24: speech from the bundle (the reference pipeline; 30 codes, one run)
            from . import e2e

            result["e2e"] = {"cpu": e2e.measure(outs, "cpu", 30, 1, log)}
            if result["machine"]["cuda"]:
                result["e2e"]["cuda"] = e2e.measure(outs, "cuda", 30, 3, log)
    finally:
        rmtree(work)
    result["verdicts"] = ok = verdicts(result)
    result["table"] = table(result)
    os.makedirs(args.results, exist_ok=True)
    stamp = result["date"].replace(":", "")
    for name in (f"bench-{size}-{stamp}.json", f"latest-{size}.json"):
        with open(os.path.join(args.results, name), "w") as f:
            json.dump(result, f, indent=2)
    print(f"Machine: {describe(result['machine'])}")
    print(result["table"])
    for res in result.get("bulk_load", {}).values():
        print(res["table"])
    for dev, res in result.get("e2e", {}).items():
        r = res["runs"][0]
        print(f"e2e ({dev}): {r['codes']} codes, {r['audio_s']} s of audio in {r['synthesis_s']} s (RTF {r['rtf']}), "
              f"process start to audio {r['process_start_to_audio_s']} s, peak RSS {r['peak_rss_mib']} MiB; "
              f"stages {r['stages_s']}")
    print(f"targets: {sum(ok.values())} of {len(ok)} met; JSON in {os.path.join(args.results, f'latest-{size}.json')}")
    return result


if __name__ == "__main__":
    main()
