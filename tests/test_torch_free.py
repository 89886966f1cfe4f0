"""Conversion without torch where the work is data movement (issue 16).

The numpy path (torch-free ``.pth`` reader, numpy copies, transposes, splits, squeezes,
sqrt and widening casts) must write the same bytes as the torch path it replaced
(``torch.load`` and every op and cast in torch), for every model of both demo releases
and for the dtype choices; and the gpt, w2v-bert and matrix conversions must not
import torch at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from converters.format import arrays
from converters.release import engine
from converters.io import sources
from converters.format.opspec import parse
from tests.helpers import ROOT, convert_in_process, run_cli

DEMO = os.path.join(ROOT, "demo", "release")
DEMO_2_5 = os.path.join(ROOT, "demo", "release-2.5")


def _force_torch(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(engine, "FORCE_TORCH", on)
    monkeypatch.setattr(sources, "FORCE_TORCH_READER", on)


def _outputs(folder) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")}


@pytest.mark.parametrize("release", [DEMO, DEMO_2_5], ids=["2.0", "2.5"])
def test_every_output_is_byte_identical_to_the_torch_path(tmp_path, monkeypatch, release):
    run_cli("all", "--src", release, "--out", tmp_path / "numpy", "--quiet")
    _force_torch(monkeypatch, True)
    run_cli("all", "--src", release, "--out", tmp_path / "torch", "--quiet")
    a, b = _outputs(tmp_path / "numpy"), _outputs(tmp_path / "torch")
    assert len(a) == 8 and a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_choices_are_byte_identical(tmp_path, monkeypatch, dtype):
    """Narrowing casts run in torch, widening ones in numpy: the same bytes either way."""
    for mode in ("numpy", "torch"):
        _force_torch(monkeypatch, mode == "torch")
        for kind, src in (("gpt", DEMO), ("w2v-bert", os.path.join(DEMO, "w2v-bert-2.0"))):
            run_cli(kind, src, tmp_path / f"{kind}.{mode}.safetensors", "--dtype", dtype, "--quiet")
    for kind in ("gpt", "w2v-bert"):
        assert (tmp_path / f"{kind}.numpy.safetensors").read_bytes() == (tmp_path / f"{kind}.torch.safetensors").read_bytes()


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_source_widens_in_numpy(tmp_path, monkeypatch, src_dtype):
    """A half-precision gpt.pth: its float32-class tensors (norms, pe) are widened to F32
    by numpy, with torch's bytes, and nothing is computed in torch."""
    sd = torch.load(os.path.join(DEMO, "gpt.pth"), weights_only=True)
    torch.save({k: v.to(src_dtype) if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "gpt.pth")
    cfg = os.path.join(DEMO, "config.yaml")
    p = engine.prepare("gpt", str(tmp_path / "gpt.pth"), cfg, hash_source=False)
    try:
        widened = [e.name for e in p.plan.entries if e.dtype == "F32"]
        assert widened and engine.in_torch(p) == []
    finally:
        p.src.close()
    convert_in_process("gpt", tmp_path / "gpt.pth", tmp_path / "numpy.safetensors", config=cfg)
    _force_torch(monkeypatch, True)
    convert_in_process("gpt", tmp_path / "gpt.pth", tmp_path / "torch.safetensors", config=cfg)
    assert (tmp_path / "numpy.safetensors").read_bytes() == (tmp_path / "torch.safetensors").read_bytes()


def test_what_computes_goes_to_torch():
    """Folds, exp and narrowing casts are not numpy's; moves, sqrt and exact widening are."""
    assert arrays.numpy_capable(parse("split(dim=1,index=2,parts=3)|transpose"), ["BF16"], "BF16")
    assert arrays.numpy_capable(parse("sqrt"), ["F16"], "F32")
    assert arrays.numpy_capable(parse("squeeze(dim=0)"), ["F16"], "F32")
    assert not arrays.numpy_capable(parse("copy"), ["F32"], "F16")
    assert not arrays.numpy_capable(parse("sqrt"), ["F32"], "F16")
    assert not arrays.numpy_capable(parse("exp"), ["F32"], "F32")
    assert not arrays.numpy_capable(parse("fold_weight_norm(dim=0)"), ["F32", "F32"], "F32")


SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from converters.release import engine
jobs = json.loads(sys.argv[2])
for kind, src, out in jobs:
    engine.convert(kind, src, out, quiet=True)
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""


def test_gpt_w2v_bert_and_matrices_never_import_torch(tmp_path):
    jobs = [("gpt", DEMO, "gpt"), ("gpt", DEMO_2_5, "gpt25"), ("w2v-bert", os.path.join(DEMO, "w2v-bert-2.0"), "w2v"),
            ("speaker-matrix", DEMO, "spk"), ("emotion-matrix", DEMO, "emo")]
    jobs = [(k, s, str(tmp_path / f"{o}.safetensors")) for k, s, o in jobs]
    p = subprocess.run([sys.executable, "-c", SCRIPT, ROOT, json.dumps(jobs)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
    for _, _, out in jobs:  # and they are the files the suite's other tests check against upstream
        assert os.path.getsize(out) > 0
    assert (tmp_path / "gpt.safetensors").read_bytes() == open(convert_in_process("gpt", DEMO, tmp_path / "again.safetensors"), "rb").read()


@pytest.mark.parametrize("src,out", sorted(arrays.WIDEN))
def test_widening_casts_are_torchs(src, out):
    """Every widening numpy does gives torch's bytes, over every 16-bit pattern
    (infinities, subnormals, NaNs) or random float32 bits, and 0-d inputs stay arrays.
    One exception: torch's float16 -> float32 is not consistent for signalling NaNs
    (its vectorised loop quiets the payload, its scalar tail returns 0x7fffffff); numpy
    keeps the payload.  NaNs convert only with --allow-nonfinite, so for float16 NaNs
    only NaN-ness is compared."""
    from reference.load import DTYPES

    if src in ("F16", "BF16"):
        raw = np.arange(1 << 16, dtype=np.uint16)
        x = raw.view(np.float16) if src == "F16" else raw
    else:
        x = np.random.default_rng(0).integers(0, 1 << 32, 1 << 16, dtype=np.uint32).view(np.float32)
    want = arrays.to_torch(x.copy(), src).to(DTYPES[out])
    got = arrays.apply_numpy([], x, src, out)
    want = arrays.from_torch(want)
    assert got.dtype == arrays.NUMPY[out] == want.dtype
    nan = np.isnan(got)
    assert np.array_equal(nan, np.isnan(want)) and nan.sum() == (2046 if src == "F16" else nan.sum())
    keep = ~nan if src == "F16" else np.ones_like(nan)
    assert got[keep].tobytes() == want[keep].tobytes()
    scalar = arrays.apply_numpy(parse("squeeze(dim=0)"), x[:1], src, out)
    assert isinstance(scalar, np.ndarray) and scalar.shape == () and scalar.tobytes() == got[:1].tobytes()


def test_sqrt_is_correctly_rounded_in_both_paths():
    """numpy's sqrt and the torch path's (which uses it) equal the float64 square root
    rounded to float32: exact, float64 having over twice float32's precision."""
    from converters.format import ops

    v = np.random.default_rng(1).random(4096, dtype=np.float32) * 10
    exact = np.sqrt(v.astype(np.float64)).astype(np.float32)
    assert arrays.apply_numpy(parse("sqrt"), v, "F32", "F32").tobytes() == exact.tobytes()
    assert ops.apply("sqrt", [torch.from_numpy(v)]).numpy().tobytes() == exact.tobytes()
