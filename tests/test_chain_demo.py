"""The chained demo (scripts/chain_demo.py, demo/chain/): the committed snapshot is what
``snapshot`` would write today, and ``build`` turns it back into a release with every
name, dtype, shape, container and stored value of it.

The first test records a fresh ``chain.write_release`` with the weight files not
written (``Recording(write=False)``: the objects handed to ``torch.save`` and safetensors
are described as they are saved), so nothing of the 640 MB reaches the disk.  The
synthesis itself is not run here: tests/test_e2e_upstream.py compares the pipeline
with upstream on chain.py's own release.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from tests.helpers import ROOT

DIR = os.path.join(ROOT, "demo", "chain")
SAMPLE = 1 << 16  # elements of each random tensor whose distribution the build test checks


def _load_script():
    spec = importlib.util.spec_from_file_location("chain_demo", os.path.join(ROOT, "scripts", "chain_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cd = _load_script()


@pytest.fixture(scope="module")
def layout():
    return cd.load_layout(DIR)


def _split(layout: dict):
    """The layout without the random tensors' statistics, and those statistics by key."""
    stats, weights = {}, {}
    for f, e in layout["weights"].items():
        tensors = []
        for t in e["tensors"]:
            t = dict(t)
            if "random" in t:
                stats[cd._key(f, t["name"])] = t.pop("random")
            tensors.append(t)
        weights[f] = {**e, "tensors": tensors}
    return {**layout, "weights": weights}, stats


def _close(a: dict, b: dict, key: str) -> None:
    """Two recorded distributions agree (to the rounding of their 4 digits)."""
    assert a["dist"] == b["dist"], key
    assert math.isclose(a["std"], b["std"], rel_tol=1e-3), key
    assert abs(a["mean"] - b["mean"]) <= 1e-3 * a["std"] + 1e-12, key


@pytest.mark.slow
def test_the_snapshot_is_current(tmp_path, layout):
    from tests.upstream import chain

    release = tmp_path / "release"
    rec = cd.Recording().record(str(release), write=False)
    fresh = rec.layout(str(release))
    (a, stats_a), (b, stats_b) = _split(fresh), _split(layout)
    assert a == b  # files, containers, names, dtypes, shapes, what is stored, the buffer names
    assert stats_a.keys() == stats_b.keys()
    for k in stats_a:
        _close(stats_a[k], stats_b[k], k)
    assert not [f for f in os.listdir(release) if f.endswith((".pt", ".pth", ".bin", ".safetensors"))]
    for f in fresh["files"]:
        with open(release / f, "rb") as x, open(os.path.join(DIR, cd.FILES, f), "rb") as y:
            assert x.read() == y.read(), f
    with safe_open(os.path.join(DIR, cd.VALUES), "pt") as v:
        assert sorted(v.keys()) == sorted(rec.values)
        for k, t in rec.values.items():
            x = v.get_tensor(k)
            assert x.dtype == t.dtype and torch.equal(x, t), k
    prompt = chain.write_prompt_wav(tmp_path / "prompt.wav", cd.PROMPT_SECONDS, seed=0)
    with open(prompt, "rb") as x, open(os.path.join(DIR, cd.PROMPT), "rb") as y:
        assert x.read() == y.read()
    # what is stored: every small or integer tensor, the buffers, nothing else
    for f, e in layout["weights"].items():
        for t in e["tensors"]:
            last = t["name"].replace("/", ".").rsplit(".", 1)[-1]
            small = math.prod(t["shape"]) <= cd.MAX_SMALL or not t["dtype"].startswith(("float", "bfloat"))
            assert t.get("stored", False) == (small or last in layout["buffer_names"]), (f, t["name"])
    assert {"pe", "input_pos", "running_mean", "running_var", "num_batches_tracked", "filter"} <= set(layout["buffer_names"])


# The one big file (0.5 GB, 80% of the release) is built with zeros for its random tensors
# (every name, dtype, shape, stored value and the header still checked): the draws are the
# same function for every file, checked on the other nine.
BIG = "w2v-bert-2.0/model.safetensors"


def _zeros(file: str, t: dict) -> torch.Tensor:
    return torch.zeros(t["shape"], dtype=getattr(torch, t["dtype"]))


@pytest.mark.slow
def test_build_reproduces_the_snapshot(tmp_path, layout):
    rest = set(layout["weights"]) - {BIG}
    out = cd.build(str(tmp_path / "demo"), DIR, only=rest)
    big = cd.build(str(tmp_path / "big"), DIR, only={BIG}, draw=_zeros)
    for folder, files in ((out, rest), (big, {BIG})):
        listing = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                         for d, _, fs in os.walk(folder) for f in fs)
        assert listing == sorted(layout["files"] + list(files))
        for f in layout["files"]:
            with open(os.path.join(folder, f), "rb") as x, open(os.path.join(DIR, cd.FILES, f), "rb") as y:
                assert x.read() == y.read(), f
        for f in files:
            _check_file(os.path.join(folder, f), f, layout, random=folder == out)
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]
    # the same bytes every run: the random draws and torch.save's output
    again = cd.build(str(tmp_path / "again"), DIR, only={"feat2.pt", "s2mel.pth"})
    for f in ("feat2.pt", "s2mel.pth", "config.yaml"):
        with open(os.path.join(out, f), "rb") as x, open(os.path.join(again, f), "rb") as y:
            assert x.read() == y.read(), f
    for d in (out, big, again):  # 0.6 GB, removed while in the page cache (pytest keeps the last runs' folders)
        shutil.rmtree(d)


def _check_file(path: str, f: str, layout: dict, random: bool) -> None:
    """A built weight file against its layout entry: container, names, dtypes, shapes,
    stored values (the stop bias with the demo's shift), random tensors' distribution."""
    e = layout["weights"][f]
    if e["container"] == "safetensors":
        with safe_open(path, "pt") as s:
            assert s.metadata() == e["metadata"], f
            assert sorted(s.keys()) == sorted(t["name"] for t in e["tensors"]), f
            got = {t["name"]: s.get_tensor(t["name"]) for t in e["tensors"]}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        d = cd._Describer(f, set(layout["buffer_names"]), stats=False)
        assert d.node(obj, ()) == e["tree"], f  # the container: types, keys, scalars, attributes
        assert d.shared_strings() == e["shared_strings"], f
        assert [(t["name"], bool(t.get("stored"))) for t in d.tensors] == \
            [(t["name"], bool(t.get("stored"))) for t in e["tensors"]], f
        got = dict(zip((t["name"] for t in e["tensors"]), _tensors(obj)))
    with safe_open(os.path.join(DIR, cd.VALUES), "pt") as values:
        for t in e["tensors"]:
            x, key = got[t["name"]], cd._key(f, t["name"])
            assert cd._dtype_name(x.dtype) == t["dtype"] and list(x.shape) == t["shape"], key
            if t.get("stored"):
                want = values.get_tensor(key)
                if (f, t["name"]) == cd.STOP_BIAS:
                    want[cd.stop_mel_token(DIR)] += cd.DEMO_STOP_SHIFT
                assert torch.equal(x, want), key
            elif random:
                _drawn_from(x, t["random"], key)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _drawn_from(x: torch.Tensor, r: dict, key: str) -> None:
    """A random tensor's first elements look drawn from its recorded distribution."""
    s = x.flatten()[:SAMPLE].double()
    n = s.numel()
    mean, std = float(s.mean()), float(s.std())
    assert abs(mean - r["mean"]) <= 6 * r["std"] / math.sqrt(n) + 1e-3 * r["std"], key
    assert math.isclose(std, r["std"], rel_tol=0.05), key
    z = (s - mean) / std
    kurt = float((z ** 4).mean()) - 3
    assert (kurt < -0.6) == (r["dist"] == "uniform"), key
