"""The trivial load at the speed of the hardware (issue 18): canonical files resident on
a device, ``reference.load.load`` against ``safetensors.torch.load_file``.

    python -m bench.bulk_load measure DIR [--device cuda|cpu] [--runs N] [--cold] [--json FILE]
    python -m bench.bulk_load explore DIR [--device cuda] [--runs N] [--json FILE]
    python -m bench.bulk_load synth LAYOUT.json OUT_DIR

``measure`` times, each in a fresh process (imports and CUDA context creation before
the clock starts; the clock stops once every tensor is resident, after a device
synchronise), on the large canonical files of DIR (``gpt``, ``s2mel``, ``w2v-bert``,
``bigvgan``):

- ``load_file``: ``safetensors.torch.load_file(f, device)`` for each file
- ``ours``: ``reference.load.load(files, device)`` (one allocation per file, threaded
  pinned staging with per-thread streams on CUDA; memory-mapped views on the CPU)
- ``page_cache``: the same threads ``pread`` every data byte into ordinary buffers and
  nothing else: how fast the page cache can be read (the limit of any loader)
- ``h2d`` (CUDA): one pinned buffer copied to the device, repeated to the same byte
  count: the host-to-device limit

On the CPU, ``load_file`` and ``ours`` are followed by one read of every byte (through a
1 MiB buffer, as a device copy reads host memory), since mapped tensors cost nothing
until read.  ``--cold`` evicts the files from the page cache before each run
(``/proc/sys/vm/drop_caches`` where permitted, else ``posix_fadvise(DONTNEED)`` per file)
and times ``load_file`` and ``ours`` only.  Afterwards ``ours`` is run in one process
over a grid of thread counts and piece sizes (a second call reuses pinned memory torch
has cached, so those rows are a little optimistic).

``explore`` times the loader's variants (``EXPLORE``: staging, copier, threads, piece
size), each first checked byte for byte against ``load_file`` on the device, in fresh
processes alternating with ``load_file``, and names the fastest verified one.

``synth`` writes files with the layout of ``bench/full_size_layout.json`` (the large
files at the released configs, see :mod:`bench.layout`; its ``files``, IndexTTS-2.0's
four, not ``files@2.5``) and random values, for a
machine that has no bench inputs (the GPU machine).  Only torch, safetensors and
``reference`` are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _large() -> tuple[str, ...]:
    """The four large models' file names, from the schema (read as JSON: the GPU
    machine runs this without the converter's dependencies)."""
    with open(os.path.join(ROOT, "canonical_schema.json")) as f:
        models = json.load(f)["models"]
    return tuple(models[k]["file"] for k in ("gpt", "s2mel", "w2v-bert", "bigvgan"))


LARGE = _large()
GRID = [(t, p) for t in (4, 8, 16) for p in (4 << 20, 16 << 20, 64 << 20)]


def large_files(folder: str) -> list[str]:
    files = [os.path.join(folder, n) for n in LARGE if os.path.isfile(os.path.join(folder, n))]
    if not files:
        raise SystemExit(f"{folder}: none of {', '.join(LARGE)}")
    return files


# ------------------------------------------------------------------ one timed run (child)


def _touch(tensors) -> None:
    import torch

    step = 1 << 20
    scratch = torch.empty(step, dtype=torch.uint8)
    for t in tensors:
        b = t.reshape(-1).view(torch.uint8)
        for i in range(0, b.numel(), step):
            piece = b[i:i + step]
            scratch[:piece.numel()].copy_(piece)


def _page_cache(files, threads: int, piece: int) -> int:
    import threading

    from reference.header import read_header
    from reference.load import _reader

    work = []
    for f in files:
        h = read_header(f)
        work += [(f, off, min(piece, h.file_size - off)) for off in range(h.data_start, h.file_size, piece)]
    lock, pos, total = threading.Lock(), [0], [0]

    def run():
        buf = memoryview(bytearray(piece))
        readers = {}
        while True:
            with lock:
                if pos[0] == len(work):
                    break
                f, off, n = work[pos[0]]
                pos[0] += 1
            if f not in readers:
                readers[f] = _reader(f)
            got = readers[f][0](buf[:n], off)
            with lock:
                total[0] += got
        for _, close in readers.values():
            close()

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return total[0]


def child(method: str, files: list[str], device: str, threads: int, piece: int) -> dict:
    import torch

    from reference import load as rl

    cuda = device.startswith("cuda")
    nbytes = sum(os.path.getsize(f) for f in files)
    if cuda:
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if method == "load_file":
        from safetensors.torch import load_file

        sds = [load_file(f, device=device) for f in files]
        if not cuda:
            _touch(t for sd in sds for t in sd.values())
    elif method == "ours" or method.startswith("ours-"):
        timings: dict = {}
        out = rl.load(files, device=device, threads=threads, piece_bytes=piece, timings=timings, **_variant(method))
        if not cuda:
            _touch(t for f in out.values() for t in f.tensors.values())
        else:
            torch.cuda.synchronize()
        return {"s": time.perf_counter() - t0, "bytes": nbytes, "timings": {k: round(v, 4) if isinstance(v, float) else v for k, v in timings.items()}}
    elif method.startswith("verify-"):
        timings = {}
        r = same_as_library(files, device, threads=threads, piece_bytes=piece, timings=timings,
                            **_variant("ours-" + method[len("verify-"):]))
        return {**r, "timings": timings}
    elif method == "page_cache":
        nbytes = _page_cache(files, threads, piece)
    elif method == "h2d":
        size = min(1 << 30, nbytes)
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            n = min(size, nbytes - done)
            dev[:n].copy_(host[:n], non_blocking=True)
            done += n
    elif method.startswith("grid"):
        variant = _variant("ours" + method[len("grid"):])
        rows = []
        for th, pc in GRID:
            times = []
            for _ in range(2):
                torch.cuda.synchronize() if cuda else None
                t = time.perf_counter()
                out = rl.load(files, device=device, threads=th, piece_bytes=pc, **variant)
                torch.cuda.synchronize() if cuda else None
                times.append(time.perf_counter() - t)
                del out
            rows.append({"threads": th, "piece_mib": pc >> 20, "s": [round(x, 4) for x in times],
                         "gb_s": round(nbytes / min(times) / 1e9, 1)})
        return {"grid": rows}
    else:
        raise SystemExit(f"unknown method {method}")
    if cuda:
        torch.cuda.synchronize()
    s = time.perf_counter() - t0
    return {"s": s, "bytes": nbytes}


def _variant(method: str) -> dict[str, str]:
    """``ours``, ``ours-STAGING`` or ``ours-STAGING-COPIER`` -> the loader's keyword
    arguments (what is not named stays the loader's default)."""
    return dict(zip(("staging", "copier"), method.split("-")[1:]))


def same_as_library(paths: list[str], device: str, **options) -> dict:
    """``reference.load.load(paths, device, **options)`` against
    ``safetensors.torch.load_file`` on the same device, byte for byte, every tensor."""
    import torch
    from safetensors.torch import load_file

    from reference.load import load

    ours = load(paths, device=device, **options)
    by_path = {f.path: f for f in ours.values()}
    bad, n = [], 0
    for p in paths:
        lib = load_file(p, device=device)
        mine = by_path[p]
        if sorted(lib) != sorted(mine.tensors):
            bad.append(f"{p}: names differ")
            continue
        for name, t in lib.items():
            n += 1
            a, b = mine[name], t
            if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device or not torch.equal(
                    a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
                bad.append(f"{p}: {name}")
        del lib
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"tensors": n, "files": len(paths), "mismatches": bad}


# ------------------------------------------------------------------ the measurement (parent)


def _evict(files) -> str:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def _warm(files) -> None:
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def _run_child(method, files, device, threads, piece, timeout=None) -> dict:
    cmd = [sys.executable, "-m", "bench.bulk_load", "_child", method, device, str(threads), str(piece), *files]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def explore(folder: str, device: str = "cuda", variants=None, runs: int = 3, log=print) -> dict:
    """Loader variants ``(staging, copier, threads, piece MiB)``, each first checked
    byte for byte against ``load_file`` on the device, then timed in fresh processes
    (alternating with ``load_file``).  The result names the fastest verified variant."""
    files = large_files(folder)
    nbytes = sum(os.path.getsize(f) for f in files)
    variants = variants or EXPLORE
    res: dict = {"device": device, "bytes": nbytes, "verify": {}, "warm": {}, "timings": {}, "failed": {}}
    _warm(files)
    for st, cp in sorted({(v[0], v[1]) for v in variants}):
        key = f"{st}-{cp}"
        try:
            r = _run_child(f"verify-{key}", files, device, 16, 8 << 20, timeout=120)
            res["verify"][key] = r
            log(f"verify {key}: {r['tensors'] - len(r['mismatches'])}/{r['tensors']} tensors identical to load_file "
                f"(pinned {r['timings'].get('pinned')}, {r['timings'].get('copier')})"
                + (f" BAD {r['mismatches'][:10]}" if r["mismatches"] else ""))
        except (subprocess.SubprocessError, ValueError, IndexError) as e:
            err = getattr(e, "stderr", "") or str(e)
            res["failed"][key] = str(err)[-600:]
            log(f"verify {key}: FAILED {str(err)[-600:]}")
    ok = {k for k, r in res["verify"].items() if not r["mismatches"] and r["tensors"]}
    # name -> (child method, threads, piece bytes, the variant)
    plan = {"load_file": ("load_file", 16, 8 << 20, None)}
    plan.update({f"{st}-{cp}-{th}x{pc}": (f"ours-{st}-{cp}", th, pc << 20, (st, cp, th, pc))
                 for st, cp, th, pc in variants if f"{st}-{cp}" in ok})
    for _ in range(runs):
        for name, (method, th, pc, _v) in plan.items():
            if name in res["failed"]:
                continue
            try:
                r = _run_child(method, files, device, th, pc, timeout=120)
            except (subprocess.SubprocessError, ValueError, IndexError) as e:
                res["failed"][name] = str(getattr(e, "stderr", "") or e)[-600:]
                log(f"{name}: FAILED {res['failed'][name]}")
                continue
            res["warm"].setdefault(name, []).append(round(r["s"], 4))
            if "timings" in r:
                res["timings"].setdefault(name, []).append(r["timings"])
            log(f"{name}: {r['s']:.3f} s ({nbytes / r['s'] / 1e9:.1f} GB/s) {r.get('timings', '')}")
    med = {k: statistics.median(v) for k, v in res["warm"].items() if k not in res["failed"]}
    base = med.get("load_file")
    lines = [f"| loader | median s | GB/s | vs load_file | runs |", "|---|---|---|---|---|"]
    for k, m in sorted(med.items(), key=lambda kv: kv[1]):
        lines.append(f"| {k} | {m:.3f} | {nbytes / m / 1e9:.1f} | {base / m:.1f}x | {res['warm'][k]} |" if base else
                     f"| {k} | {m:.3f} | {nbytes / m / 1e9:.1f} | | {res['warm'][k]} |")
    res["table"] = "\n".join(lines)
    ours = {k: m for k, m in med.items() if k != "load_file"}
    if ours:
        best = min(ours, key=ours.get)
        st, cp, th, pc = plan[best][3]
        res["best"] = {"name": best, "staging": st, "copier": cp, "threads": th, "piece_mib": pc,
                       "median_s": round(ours[best], 4)}
    log(res["table"])
    log(f"best: {res.get('best')}")
    return res


EXPLORE = [("pinned", "torch", 16, 8), ("pinned", "torch", 16, 4), ("pinned", "cudart", 16, 8),
           ("pinned", "cudart", 16, 4), ("pinned", "cudart", 16, 2), ("pinned", "cudart", 8, 4)]


def measure(folder: str, device: str = "cuda", runs: int = 5, cold: bool = False, threads: int | None = None,
            piece: int | None = None, grid: bool = True, log=print, methods: list[str] | None = None,
            staging: str | None = None, copier: str | None = None) -> dict:
    """``staging``/``copier``: the loader's options for ``ours`` (default: its defaults)."""
    from reference.load import MAX_THREADS, PIECE_BYTES

    files = large_files(folder)
    threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
    piece = piece or PIECE_BYTES
    nbytes = sum(os.path.getsize(f) for f in files)
    variant = f"ours-{staging or 'pinned'}-{copier or 'auto'}" if staging or copier else "ours"
    res = {"device": device, "files": [os.path.basename(f) for f in files], "bytes": nbytes, "threads": threads,
           "piece_mib": piece >> 20, "variant": variant, "warm": {}, "cold": {}}
    methods = methods or ["load_file", "ours", "page_cache"] + (["h2d"] if device.startswith("cuda") else [])
    _warm(files)
    for _ in range(runs):  # alternate, so a noisy neighbour hurts every method alike
        for m in methods:
            r = _run_child(variant if m == "ours" else m, files, device, threads, piece)
            res["warm"].setdefault(m, []).append(round(r["s"], 4))
            if "timings" in r:
                res.setdefault("timings", {}).setdefault(m, []).append(r["timings"])
    if cold:
        for _ in range(runs):
            for m in ("load_file", "ours"):
                res["evict"] = _evict(files)
                r = _run_child(variant if m == "ours" else m, files, device, threads, piece)
                res["cold"].setdefault(m, []).append(round(r["s"], 4))
    for which in ("warm", "cold"):
        for m, xs in list(res[which].items()):
            med = statistics.median(xs)
            res[which][m] = {"s": xs, "median_s": round(med, 4), "gb_s": round(nbytes / med / 1e9, 2)}
    if grid and device.startswith("cuda"):  # on the CPU the loader maps the files: nothing to tune
        _warm(files)
        res["grid"] = _run_child("grid" + variant[len("ours"):], files, device, threads, piece)["grid"]
    res["table"] = table(res)
    log(res["table"])
    return res


def table(res: dict) -> str:
    lines = [f"bulk load of {', '.join(res['files'])} ({res['bytes'] / 1e9:.2f} GB) on {res['device']}, "
             f"{res['threads']} threads, {res['piece_mib']} MiB pieces, {res.get('variant', 'ours')}",
             "| cache | method | median s | GB/s | vs load_file |", "|---|---|---|---|---|"]
    for which in ("warm", "cold"):
        rows = res[which]
        base = rows.get("load_file", {}).get("median_s")
        for m, r in rows.items():
            ratio = f"{base / r['median_s']:.1f}x" if base and m != "load_file" else ""
            lines.append(f"| {which} | {m} | {r['median_s']:.3f} | {r['gb_s']:.1f} | {ratio} |")
    if res.get("evict"):
        lines.append(f"(cold: page cache evicted with {res['evict']} before each run)")
    for g in res.get("grid", []):
        lines.append(f"grid: {g['threads']} threads, {g['piece_mib']} MiB pieces: {g['gb_s']} GB/s ({g['s']})")
    return "\n".join(lines)


# ------------------------------------------------------------------ layout snapshot and synthetic files


def synth(layout: str, out_dir: str, log=print) -> list[str]:
    """Files with the snapshot's tensors (in its order, padded header) and random values:
    floats N(0, 0.02), integers zero.  Metadata: model, dtype and config (no provenance,
    so they load and run but are not canonical files ``check`` accepts)."""
    import struct

    import torch

    from reference.load import DTYPES, _bytes_view

    with open(layout) as fh:
        snap = json.load(fh)["files"]
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    written = []
    for name, spec in snap.items():
        hdr, off = {}, 0
        for n, dt, shape in spec["tensors"]:
            size = DTYPES[dt].itemsize
            for d in shape:
                size *= d
            hdr[n] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + size]}
            off += size
        hdr["__metadata__"] = {"model": spec["model"], "dtype": spec["dtype"], "config": json.dumps(spec["config"]),
                               "schema": "synthetic-layout"}
        raw = json.dumps(hdr).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        path = os.path.join(out_dir, name)
        with open(path + ".part", "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for n, dt, shape in spec["tensors"]:
                t = torch.empty(shape, dtype=DTYPES[dt])
                if t.is_floating_point():
                    t.normal_(0.0, 0.02, generator=gen)
                else:
                    t.zero_()
                if t.numel():
                    fh.write(_bytes_view(t.reshape(-1).view(torch.uint8)))
        os.replace(path + ".part", path)
        written.append(path)
        log(f"synth: {path} ({os.path.getsize(path) / 1e9:.2f} GB)")
    return written


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        method, device, threads, piece, *files = argv[1:]
        print(json.dumps(child(method, files, device, int(threads), int(piece))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("dir")
    m.add_argument("--device", default="cuda")
    m.add_argument("--runs", type=int, default=5)
    m.add_argument("--cold", action="store_true")
    m.add_argument("--no-grid", action="store_true")
    m.add_argument("--json")
    x = sub.add_parser("explore")
    x.add_argument("dir")
    x.add_argument("--device", default="cuda")
    x.add_argument("--runs", type=int, default=3)
    x.add_argument("--json")
    y = sub.add_parser("synth")
    y.add_argument("layout")
    y.add_argument("out_dir")
    args = ap.parse_args(argv)
    if args.cmd == "measure":
        res = measure(args.dir, args.device, args.runs, args.cold, grid=not args.no_grid)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
    elif args.cmd == "explore":
        res = explore(args.dir, args.device, runs=args.runs)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
    else:
        synth(args.layout, args.out_dir)


if __name__ == "__main__":
    main()
