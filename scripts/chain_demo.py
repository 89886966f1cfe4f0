#!/usr/bin/env python3
"""The chained demo release: the ~640 MB release of tests/upstream/chain.py (widths that
chain end to end, so ``python -m reference synthesize`` runs on its bundle), regenerated
from a few MB committed in demo/chain/.

    python scripts/chain_demo.py snapshot [--dir demo/chain] [--check]
    python scripts/chain_demo.py build OUT [--dir demo/chain]

``snapshot`` (dev-only: the upstream classes, transformers) runs
``chain.write_release(tmp, "2.0", seed=0)`` and records what it writes:

- every file that is not a weight file, byte for byte, under ``DIR/files/``;
- for every weight file (each file written by ``torch.save`` or safetensors' ``save_file``)
  its container in ``DIR/layout.json``: for a torch file the pickled object tree (dicts,
  OrderedDicts with their attributes such as the state dict's ``_metadata``, lists,
  tuples, scalars), for a safetensors file its header metadata; and each tensor's name,
  dtype and shape;
- the exact values of the tensors that are not trained-like random weights, in
  ``DIR/values.safetensors``: every tensor with at most ``MAX_SMALL`` elements, every
  tensor of a non-float dtype (``input_pos``, ``num_batches_tracked``) and every tensor
  whose name ends in the name of a persistent buffer that a module registered while the
  release was built (positional encodings ``pe``, ``freqs``, anti-alias ``filter``,
  running statistics).  Biases, norm gains, weight-norm magnitudes and BigVGAN (every
  tensor of it is small) are stored as they are, so chain.py's two nudges are kept
  as such: the shifted stop-code bias and the scaled-down BigVGAN output conv;
- for each other tensor the mean and standard deviation it has (the scale its builder
  gave it by name and fan-in: ~1/sqrt(fan-in) weights, N(0, 1) matrices, torch's own
  uniform init for CAMPPlus's convolutions) and whether it is normal or uniform;
- the voice prompt ``DIR/prompt.wav`` (``chain.write_prompt_wav``, 2 s).

``build`` (runtime dependencies only: torch, numpy, safetensors) writes the release
folder again: the stored files and values as they are, every other tensor drawn from
its recorded distribution (a NumPy SFC64 stream seeded by the file and tensor name:
the same bytes on every run, and NumPy's generators being plain C, on every machine
with the same NumPy), saved in the same containers with
the same calls, one file at a time.  ``convert.py all`` converts it as it converts
chain.py's release; only the large random weights differ.  Because they differ, the
GPT's stop-code logit needs its own shift to end the README's greedy run by itself
(``DEMO_STOP_SHIFT``, applied on top of chain.py's, which is in the stored bias).

``--check`` (with ``snapshot``) also writes the real release, builds the demo from the
new snapshot and compares the two file by file (containers, names, dtypes, shapes,
stored values bit for bit, each torch file's data.pkl and each safetensors header byte
for byte: the pickles memoize the same strings, see ``shared_strings``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(ROOT, "demo", "chain")
LAYOUT = "layout.json"
VALUES = "values.safetensors"
FILES = "files"
PROMPT = "prompt.wav"
PROMPT_SECONDS = 2.0
FORMAT = 1
MAX_SMALL = 4096  # tensors with at most this many elements are stored as they are
SOURCE = 'tests/upstream/chain.py write_release(folder, "2.0", seed=0)'
# The demo's own nudge (build only, on top of chain.py's STOP_LOGIT_SHIFT, which is in the
# stored bias): with the demo's random weights the greedy GPT repeats one code and the stop
# code never wins the argmax (30 codes of 30 for the README's text and prompt), so its
# logit (mel_head.bias[stop_mel_token]) is raised.  Measured on the README's run
# (--greedy, demo/chain/prompt.wav): +1.8 still 30 codes, +1.9 15, +2.0 7, +3.0 2; 2.0
# keeps a margin on both sides (a run stops by itself, well before --max-codes 20).
DEMO_STOP_SHIFT = 2.0
STOP_BIAS = ("gpt.pth", "mel_head.bias")


# ------------------------------------------------------------------ containers


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key(file: str, name: str) -> str:
    return f"{file}:{name}"


class _Describer:
    """One weight file's description: the container tree and its tensors (stored or random)."""

    def __init__(self, file: str, buffers: set[str], stats: bool = True):
        self.file, self.buffers, self.stats = file, buffers, stats  # stats False: random tensors get {}
        self.tensors: list[dict] = []
        self.values: dict[str, object] = {}
        self.strings: dict[str, collections.Counter] = {}  # text -> ids of the str objects holding it

    def text(self, s: str) -> str:
        self.strings.setdefault(s, collections.Counter())[id(s)] += 1
        return s

    def shared_strings(self) -> list[str]:
        """The strings the pickle memoizes: one str object in several places (interned
        literals such as "version" in ``_metadata`` or "step" in the optimizer state).
        Equal text in distinct objects is pickled again each time; build repeats both."""
        shared = []
        for s, ids in self.strings.items():
            if len(ids) == 1 and sum(ids.values()) > 1:
                shared.append(s)
            elif len(ids) > 1 and max(ids.values()) > 1:
                raise ValueError(f"{self.file}: {s!r} is one shared object in some places and distinct ones in others")
        return sorted(shared)

    def tensor(self, name: str, t) -> dict:
        import torch

        if type(t) is not torch.Tensor or t.requires_grad or t.layout != torch.strided or t.device.type != "cpu":
            raise ValueError(f"{self.file}: {name}: not a plain CPU tensor")
        entry = {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        last = name.replace("/", ".").rsplit(".", 1)[-1]
        if t.numel() <= MAX_SMALL or not t.is_floating_point() or last in self.buffers:
            entry["stored"] = True
            self.values[_key(self.file, name)] = t.detach().clone().contiguous()
        else:
            entry["random"] = distribution(t) if self.stats else {}
        self.tensors.append(entry)
        return entry

    def node(self, o, path: tuple):
        import torch

        if isinstance(o, torch.Tensor):
            self.tensor("/".join(map(str, path)), o)
            return {"tensor": len(self.tensors) - 1}
        if type(o) in (dict, collections.OrderedDict):
            for k in o:
                if type(k) not in (str, int):
                    raise ValueError(f"{self.file}: key {k!r} at {path}: only str and int keys are recorded")
            items = [[self.text(k) if type(k) is str else k, self.node(v, path + (k,))] for k, v in o.items()]
            if type(o) is dict:
                return {"dict": items}
            attrs = [[self.text(a), self.node(v, path + (f"@{a}",))] for a, v in vars(o).items()]
            return {"odict": items, "attrs": attrs}
        if type(o) in (list, tuple):
            return {type(o).__name__: [self.node(v, path + (i,)) for i, v in enumerate(o)]}
        if type(o) is str:
            return self.text(o)
        if o is None or type(o) in (bool, int) or (type(o) is float and math.isfinite(o)):
            return o
        raise ValueError(f"{self.file}: {type(o).__name__} at {path}: not recorded")


KURTOSIS_SAMPLE = 1 << 16  # elements the normal/uniform decision looks at (its error ~0.02 there)


def distribution(t) -> dict:
    """A float tensor's recorded distribution: its mean and standard deviation to 4
    digits (float64 sums), and normal or uniform by the excess kurtosis of its first
    ``KURTOSIS_SAMPLE`` elements (0 for a normal, -1.2 for a uniform)."""
    import numpy as np

    x = t.detach().contiguous().view(-1).float().numpy()
    mean = float(x.mean(dtype=np.float64))
    d = x - np.float32(mean)
    var = float(np.mean(np.square(d), dtype=np.float64))
    z = d[:KURTOSIS_SAMPLE].astype(np.float64)
    m2 = float(np.mean(z * z))
    kurt = float(np.mean(z ** 4)) / m2 ** 2 - 3 if m2 > 0 else 0.0
    return {"dist": "uniform" if kurt < -0.6 else "normal", "mean": float(f"{mean:.4g}"),
            "std": float(f"{math.sqrt(var):.4g}")}


def decode(entry: dict, tensors: list):
    """The object a torch weight file pickles, from its recorded tree: each shared string
    one object (as in the original, so the pickle memoizes the same strings), every other
    string its own object (as json.loads makes them)."""
    shared = {s: s for s in entry.get("shared_strings", [])}

    def text(s):
        return shared[s] if type(s) is str and s in shared else s

    def dec(node):
        if isinstance(node, dict):
            if "tensor" in node:
                return tensors[node["tensor"]]
            if "dict" in node:
                return {text(k): dec(v) for k, v in node["dict"]}
            if "odict" in node:
                o = collections.OrderedDict((text(k), dec(v)) for k, v in node["odict"])
                for a, v in node["attrs"]:
                    setattr(o, a, dec(v))
                return o
            if "list" in node:
                return [dec(v) for v in node["list"]]
            if "tuple" in node:
                return tuple(dec(v) for v in node["tuple"])
            raise ValueError(f"unknown node {sorted(node)}")
        return text(node)

    return dec(entry["tree"])


# ------------------------------------------------------------------ snapshot (dev-only)


class Recording:
    """What chain.write_release saves, recorded as it is saved (``torch.save`` and
    safetensors' ``save_file`` intercepted); with ``write`` False the weight files are
    not written at all (the test compares a recording with the snapshot without
    writing 640 MB)."""

    def __init__(self):
        self.weights: dict[str, dict] = {}
        self.values: dict[str, object] = {}
        self.buffers: set[str] = set()
        self.random_names: dict[str, str] = {}  # last name component of a random tensor -> one such tensor

    def record(self, folder: str, write: bool = False, version: str = "2.0", seed: int = 0) -> "Recording":
        import safetensors.torch as st
        import torch
        import transformers.modeling_utils as mu

        from tests.upstream import chain

        real = {"torch": torch.save, "st": st.save_file, "mu": mu.safe_save_file,
                "buffer": torch.nn.Module.register_buffer}

        def rel(path) -> str:
            r = os.path.relpath(os.fspath(path), folder)
            if r.startswith("..") or r in self.weights:
                raise ValueError(f"unexpected weight file {path}")
            return r.replace(os.sep, "/")

        def register_buffer(mod, name, tensor, persistent=True):
            if persistent and tensor is not None:
                self.buffers.add(name)
            return real["buffer"](mod, name, tensor, persistent)

        def torch_save(obj, f, *args, **kwargs):
            file = rel(f)
            d = _Describer(file, self.buffers)
            tree = d.node(obj, ())
            self._add(file, {"container": "torch", "tree": tree, "shared_strings": d.shared_strings(),
                             "tensors": d.tensors}, d)
            if write:
                real["torch"](obj, f, *args, **kwargs)

        def save_file(tensors, filename, metadata=None):
            file = rel(filename)
            d = _Describer(file, self.buffers)
            for k, v in tensors.items():
                d.tensor(k, v)
            self._add(file, {"container": "safetensors", "metadata": metadata, "tensors": d.tensors}, d)
            if write:
                real["st"](tensors, filename, metadata=metadata)

        torch.save, st.save_file, mu.safe_save_file = torch_save, save_file, save_file
        torch.nn.Module.register_buffer = register_buffer
        try:
            chain.write_release(folder, version, seed=seed)
        finally:
            torch.save, st.save_file, mu.safe_save_file = real["torch"], real["st"], real["mu"]
            torch.nn.Module.register_buffer = real["buffer"]
        late = sorted(set(self.random_names) & self.buffers)
        if late:  # a buffer name registered after a file with a big tensor of that name was saved
            raise RuntimeError(f"buffer names seen too late: {late} ({[self.random_names[n] for n in late]})")
        return self

    def _add(self, file: str, entry: dict, d: _Describer) -> None:
        self.weights[file] = entry
        self.values.update(d.values)
        for t in d.tensors:
            if "random" in t:
                self.random_names.setdefault(t["name"].replace("/", ".").rsplit(".", 1)[-1], f"{file}:{t['name']}")

    def layout(self, folder: str) -> dict:
        files = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                       for d, _, fs in os.walk(folder) for f in fs)
        return {
            "format": FORMAT,
            "source": SOURCE,
            "max_small": MAX_SMALL,
            "buffer_names": sorted(self.buffers),
            "files": [f for f in files if f not in self.weights],
            "weights": {f: self.weights[f] for f in sorted(self.weights)},
        }


def snapshot(out_dir: str, check: bool = False) -> None:
    from safetensors.torch import save_file

    from tests.upstream import chain

    with tempfile.TemporaryDirectory(prefix="chain-release-") as tmp:
        release = os.path.join(tmp, "release")
        rec = Recording().record(release, write=check)
        layout = rec.layout(release)
        if check:
            missing = [f for f in layout["files"] if f.endswith((".pt", ".pth", ".bin", ".safetensors"))]
            if missing:
                raise RuntimeError(f"weight files written past the recording: {missing}")
        os.makedirs(out_dir, exist_ok=True)
        shutil.rmtree(os.path.join(out_dir, FILES), ignore_errors=True)
        for f in layout["files"]:
            dst = os.path.join(out_dir, FILES, f)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(release, f), dst)
        with open(os.path.join(out_dir, LAYOUT), "w") as fh:
            fh.write(dumps(layout) + "\n")
        save_file(rec.values, os.path.join(out_dir, VALUES))
        chain.write_prompt_wav(os.path.join(out_dir, PROMPT), PROMPT_SECONDS, seed=0)
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
        n = sum(len(e["tensors"]) for e in layout["weights"].values())
        print(f"wrote {out_dir} ({total / 1e6:.2f} MB; {len(layout['weights'])} weight files, {n} tensors, "
              f"{len(rec.values)} stored)")
        if check:
            built = os.path.join(tmp, "built")
            build(built, out_dir, stop_shift=0.0)
            problems = compare_releases(release, built, layout)
            for p in problems:
                print("check:", p)
            if problems:
                raise SystemExit(1)
            print("check: the built release has chain.py's files, containers, names, dtypes, shapes and stored values")


def dumps(o, indent: int = 0, width: int = 110) -> str:
    """JSON with one line per item where the item fits in ``width`` (small diffs, small file)."""
    flat = json.dumps(o, separators=(", ", ": "))
    if len(flat) + indent <= width or not isinstance(o, (dict, list)) or not o:
        return flat
    pad = " " * (indent + 1)
    if isinstance(o, dict):
        body = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 1, width)}" for k, v in o.items()]
        return "{\n" + ",\n".join(body) + "\n" + " " * indent + "}"
    body = [pad + dumps(v, indent + 1, width) for v in o]
    return "[\n" + ",\n".join(body) + "\n" + " " * indent + "]"


def compare_releases(a: str, b: str, layout: dict) -> list[str]:
    """Differences between two release folders beyond the random values: the same files,
    the other files byte for byte, each weight file's container, names, dtypes, shapes,
    stored values; for torch files also the zip records and data.pkl byte for byte."""
    import torch
    from safetensors import safe_open

    problems = []

    def listing(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    if listing(a) != listing(b):
        return [f"files differ: {sorted(set(listing(a)) ^ set(listing(b)))}"]
    for f in layout["files"]:
        with open(os.path.join(a, f), "rb") as x, open(os.path.join(b, f), "rb") as y:
            if x.read() != y.read():
                problems.append(f"{f}: bytes differ")
    for f, entry in layout["weights"].items():
        pa, pb = os.path.join(a, f), os.path.join(b, f)
        if entry["container"] == "safetensors":
            with safe_open(pa, "pt") as x, safe_open(pb, "pt") as y:
                if x.metadata() != y.metadata() or list(x.keys()) != list(y.keys()):
                    problems.append(f"{f}: header differs")
                    continue
                for k in x.keys():
                    problems += _same_tensor(f, k, x.get_slice(k), y.get_slice(k), entry, x, y)
            with open(pa, "rb") as x, open(pb, "rb") as y:
                ha, hb = x.read(8), y.read(8)
                if x.read(int.from_bytes(ha, "little")) != y.read(int.from_bytes(hb, "little")):
                    problems.append(f"{f}: header bytes differ")
        else:
            problems += _same_zip(f, pa, pb)
            oa = torch.load(pa, map_location="cpu", weights_only=True, mmap=True)
            ob = torch.load(pb, map_location="cpu", weights_only=True, mmap=True)
            problems += _same_tree(f, oa, ob, entry)
    return problems


def _same_tensor(f, k, sa, sb, entry, x, y) -> list[str]:
    if sa.get_dtype() != sb.get_dtype() or sa.get_shape() != sb.get_shape():
        return [f"{f}:{k}: dtype/shape differ"]
    t = next(e for e in entry["tensors"] if e["name"] == k)
    if t.get("stored"):
        import torch

        if not torch.equal(x.get_tensor(k), y.get_tensor(k)):
            return [f"{f}:{k}: stored values differ"]
    return []


def _same_zip(f, pa, pb) -> list[str]:
    import zipfile

    with zipfile.ZipFile(pa) as x, zipfile.ZipFile(pb) as y:
        if x.namelist() != y.namelist():
            return [f"{f}: zip records differ"]
        pkl = next(n for n in x.namelist() if n.endswith("/data.pkl"))
        if x.read(pkl) != y.read(pkl):
            return [f"{f}: data.pkl differs"]
    return []


def _same_tree(f, oa, ob, entry, path="") -> list[str]:
    import torch

    if isinstance(oa, torch.Tensor):
        if not isinstance(ob, torch.Tensor) or oa.dtype != ob.dtype or oa.shape != ob.shape:
            return [f"{f}:{path}: tensor differs in dtype/shape"]
        t = next(e for e in entry["tensors"] if e["name"] == path)
        if t.get("stored") and not torch.equal(oa, ob):
            return [f"{f}:{path}: stored values differ"]
        return []
    if type(oa) is not type(ob):
        return [f"{f}:{path}: {type(oa).__name__} vs {type(ob).__name__}"]
    if isinstance(oa, dict):
        if list(oa) != list(ob):
            return [f"{f}:{path}: keys differ"]
        out = [] if type(oa) is dict or vars(oa) == vars(ob) else [f"{f}:{path}: attributes differ"]
        for k in oa:
            out += _same_tree(f, oa[k], ob[k], entry, f"{path}/{k}" if path else str(k))
        return out
    if isinstance(oa, (list, tuple)):
        if len(oa) != len(ob):
            return [f"{f}:{path}: lengths differ"]
        return [p for i, (u, v) in enumerate(zip(oa, ob)) for p in _same_tree(f, u, v, entry, f"{path}/{i}")]
    return [] if oa == ob else [f"{f}:{path}: {oa!r} vs {ob!r}"]


# ------------------------------------------------------------------ build (runtime dependencies only)


def seed_of(file: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"chain-demo/{file}:{name}".encode()).digest()[:8], "little")


def random_tensor(file: str, entry: dict):
    """The recorded distribution, drawn from a NumPy SFC64 stream seeded by file and name
    (the same values on every run and machine), cast to the recorded dtype."""
    import numpy as np
    import torch

    r = entry["random"]
    n = math.prod(entry["shape"])
    g = np.random.Generator(np.random.SFC64(seed_of(file, entry["name"])))
    if r["dist"] == "uniform":
        half = math.sqrt(3.0) * r["std"]
        x = g.random(n, dtype=np.float32)
        x *= np.float32(2 * half)
        x += np.float32(r["mean"] - half)
    else:
        x = g.standard_normal(n, dtype=np.float32)
        x *= np.float32(r["std"])
        x += np.float32(r["mean"])
    t = torch.from_numpy(x.reshape(entry["shape"]))
    dtype = getattr(torch, entry["dtype"])
    return t if dtype == torch.float32 else t.to(dtype)


def load_layout(src_dir: str = DEFAULT_DIR) -> dict:
    with open(os.path.join(src_dir, LAYOUT)) as f:
        layout = json.load(f)
    if layout.get("format") != FORMAT:
        raise ValueError(f"{src_dir}/{LAYOUT}: format {layout.get('format')!r}, this script reads {FORMAT}")
    return layout


def stop_mel_token(src_dir: str) -> int:
    import yaml

    with open(os.path.join(src_dir, FILES, "config.yaml")) as f:
        return int(yaml.safe_load(f)["gpt"]["stop_mel_token"])


def file_tensors(file: str, entry: dict, values, src_dir: str, stop_shift: float, draw=None) -> list:
    """One weight file's tensors, in the layout's order (``draw(file, entry)`` makes the
    random ones: :func:`random_tensor` unless given)."""
    import torch

    out = []
    for t in entry["tensors"]:
        if t.get("stored"):
            x = values.get_tensor(_key(file, t["name"]))
            if list(x.shape) != t["shape"] or _dtype_name(x.dtype) != t["dtype"]:
                raise ValueError(f"{VALUES}: {file}:{t['name']} is not {t['dtype']} {t['shape']}")
        else:
            x = (draw or random_tensor)(file, t)
        if (file, t["name"]) == STOP_BIAS and stop_shift:
            x = x.clone()
            with torch.no_grad():
                x[stop_mel_token(src_dir)] += stop_shift
        out.append(x)
    return out


def build(out: str, src_dir: str = DEFAULT_DIR, stop_shift: float | None = None, only=None, draw=None) -> str:
    """Write the release folder ``out`` from the snapshot in ``src_dir``, one weight file
    at a time, into ``out.partial-PID`` first (``out`` is replaced whole, once complete).
    ``only``: just these weight files (and all other files); ``draw``: see file_tensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    stop_shift = DEMO_STOP_SHIFT if stop_shift is None else stop_shift
    layout = load_layout(src_dir)
    tmp = f"{out.rstrip('/' + os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in layout["files"]:
        dst = os.path.join(tmp, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(src_dir, FILES, f), dst)
    with safe_open(os.path.join(src_dir, VALUES), "pt") as values:
        for f, entry in layout["weights"].items():
            if only is not None and f not in only:
                continue
            path = os.path.join(tmp, f)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tensors = file_tensors(f, entry, values, src_dir, stop_shift, draw)
            if entry["container"] == "torch":
                torch.save(decode(entry, tensors), path)
            else:
                save_file({t["name"]: x for t, x in zip(entry["tensors"], tensors)}, path, metadata=entry["metadata"])
            del tensors
    if os.path.lexists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="chain_demo.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("snapshot", help="record chain.py's release into DIR (needs the upstream classes)")
    s.add_argument("--dir", default=DEFAULT_DIR)
    s.add_argument("--check", action="store_true", help="also write the real release and compare a build with it")
    b = sub.add_parser("build", help="write the release folder OUT from DIR")
    b.add_argument("out")
    b.add_argument("--dir", default=DEFAULT_DIR)
    args = p.parse_args(argv)
    if args.command == "snapshot":
        sys.path.insert(0, ROOT)
        snapshot(args.dir, check=args.check)
    else:
        build(args.out, args.dir)
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
        print(f"wrote {args.out} ({total / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
