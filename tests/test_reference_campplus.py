"""Reference runtime, CAMPPlus: ``reference.campplus.embed`` on the canonical file against
upstream ``CAMPPlus`` in eval mode loaded from the saved ``campplus_cn_common.bin`` with
``load_state_dict(torch.load(...), strict=True)``, as infer_v2 loads it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from converters.release import engine
from converters.cli import forward
from converters.format import schema
from reference import campplus as ref
from tests.helpers import ROOT, convert_in_process, reference_load, swap_rows
from tests.upstream import campplus as up

DEMO = os.path.join(ROOT, "demo", "release", "campplus")

# One worker: the tiny and full-size CAMPPlus releases (module fixtures) built once, not once per worker.
pytestmark = pytest.mark.xdist_group("reference-campplus")


def upstream_from(folder: str):
    """infer_v2's loading: CAMPPlus(**args) (IndexTTS-2's, or campplus.json's), the pickled
    state dict loaded strictly, eval mode (``converters.cli.forward.campplus_model``, what
    ``verify --forward`` runs)."""
    args = None
    if os.path.exists(os.path.join(folder, "campplus.json")):
        with open(os.path.join(folder, "campplus.json")) as f:
            args = json.load(f)
    return forward.campplus_model(os.path.join(folder, "campplus_cn_common.bin"), args)


def release(d, config, seed=0):
    """Save a built model in the release layout; the upstream module read back from it and
    the converted canonical file."""
    src = up.save_release(up.build(config, seed=seed), str(d / "hf"), config)
    cfg = d / "hf" / "campplus.json"
    out = convert_in_process("campplus", src, d / "campplus.safetensors", config=cfg if cfg.exists() else None)
    return upstream_from(str(d / "hf")), out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return release(tmp_path_factory.mktemp("cp_tiny"), up.TINY)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """IndexTTS-2's CAMPPlus(feat_dim=80, embedding_size=192) at full size."""
    return release(tmp_path_factory.mktemp("cp_real"), up.REAL, seed=3)


def upstream_run(m, feat):
    """Upstream embedding and the activations the reference records, via forward hooks."""
    seen = {}

    def keep(name):
        return lambda mod, i, o: seen.__setitem__(name, o.detach().clone())  # ReLUs after run in place

    x = m.xvector
    nb = sum(1 for n, _ in x.named_children() if n.startswith("block"))
    mods = {"head": m.head, "xvector.tdnn": x.tdnn, "xvector.stats": x.stats,
            f"xvector.transit{nb}": x.out_nonlinear.batchnorm, "xvector.out_nonlinear": x.out_nonlinear}
    for b in range(1, nb + 1):
        mods[f"xvector.block{b}"] = getattr(x, f"block{b}")
        if b < nb:
            mods[f"xvector.transit{b}"] = getattr(x, f"transit{b}")
    hooks = [mod.register_forward_hook(keep(name)) for name, mod in mods.items()]
    try:
        out = forward.campplus_run(m, "embed", {"feat": feat})["style"]
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def compare(m, path, feat, atol=1e-5):
    """Assert embedding and every recorded activation match upstream; the max abs difference."""
    want, want_acts = upstream_run(m, feat)
    acts = {}
    got = ref.embed(reference_load(path), feat, acts)
    assert got.shape == want.shape == (feat.shape[0], m.xvector.dense.linear.out_channels)
    for name, t in want_acts.items():
        torch.testing.assert_close(acts[name], t, rtol=0, atol=atol, msg=lambda s, n=name: f"{n}: {s}")
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    return float((got - want).abs().max())


def fbank(batch, frames, feat_dim, seed=1):
    """Mean-normalised fbank-like features of O(1) (real ones span a few units)."""
    return up.fbank(batch, frames, feat_dim, seed) * 2.0


@pytest.mark.parametrize("frames", [250, 60, 7])
def test_embed_matches_upstream(tiny, frames):
    """250 frames: 125 after the TDNN stride, two CAM segments, the last one partial;
    60: one partial segment; 7: four frames after the stride."""
    m, path = tiny
    compare(m, path, fbank(2, frames, up.TINY["feat_dim"]))


def test_embed_matches_upstream_at_full_size(real):
    m, path = real
    w = reference_load(path)
    (entry,) = ref.ENTRIES
    feat = entry.inputs(w.config, torch.Generator().manual_seed(0))["feat"]
    assert feat.shape == (1, 80, 80)
    want, _ = upstream_run(m, feat)
    torch.testing.assert_close(entry.run(w, None, feat=feat)["style"], want, rtol=0, atol=1e-5)
    compare(m, path, fbank(2, 210, 80, seed=2))  # two CAM segments


def test_embed_matches_upstream_on_demo_release(tmp_path):
    """The committed demo (tiny, stored float16, campplus.json beside it).  Upstream runs
    the float16 values in a float32 module; the canonical file computed in float32 (the
    batch-norm folds done on those values) matches it to 1e-5.  Kept in float16, the folded
    weights are rounded once more, so that file is only close."""
    m = upstream_from(DEMO)
    src = os.path.join(DEMO, "campplus_cn_common.bin")
    cfg = os.path.join(DEMO, "campplus.json")
    f32 = tmp_path / "campplus_f32.safetensors"
    engine.convert("campplus", src, str(f32), cfg, dtype="float32", quiet=True, force=True)
    with open(cfg) as f:
        feat = fbank(2, 230, json.load(f)["feat_dim"])
    compare(m, f32, feat)
    f16 = convert_in_process("campplus", src, tmp_path / "campplus.safetensors", config=cfg)
    assert reference_load(f16).metadata["dtype"] == "F16"
    want, _ = upstream_run(m, feat)
    torch.testing.assert_close(ref.embed(reference_load(f16), feat), want, rtol=0, atol=5e-3)  # measured 5e-4


@pytest.mark.parametrize("pairs", [
    # a carried batch norm (same [C] shape for all four tensors): running_mean <-> bias
    [("xvector.block1.tdnnd1.nonlinear1.batchnorm.running_mean", "xvector.block1.tdnnd1.nonlinear1.batchnorm.bias")],
    # two folded 3x3 convs of one head residual block: [m, m, 3, 3] and [m] alike
    [("head.layer1.1.conv1.weight", "head.layer1.1.conv2.weight"), ("head.layer1.1.conv1.bias", "head.layer1.1.conv2.bias")],
], ids=["bn-mean-bias", "head-conv1-conv2"])
def test_swapped_rows_are_caught(tmp_path, monkeypatch, pairs):
    """A table that swaps two same-shape roles still writes a file that passes the schema
    check, but the reference embedding no longer matches upstream."""
    src = up.save_release(up.build(up.TINY), str(tmp_path / "hf"), up.TINY)
    m = upstream_from(str(tmp_path / "hf"))
    swap_rows(monkeypatch, "campplus", *pairs)
    out = convert_in_process("campplus", src, tmp_path / "campplus.safetensors", config=tmp_path / "hf" / "campplus.json")
    assert schema.check_file(str(out))[1] == []
    feat = fbank(2, 120, up.TINY["feat_dim"])
    want, _ = upstream_run(m, feat)
    assert (ref.embed(reference_load(out), feat) - want).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_entries_run_on_their_own_inputs(request, which):
    _, path = request.getfixturevalue(which)
    w = reference_load(path)
    cfg = w.config
    for e in ref.ENTRIES:
        inputs = e.inputs(cfg, torch.Generator().manual_seed(0))
        assert tuple(inputs) == e.args
        acts = {}
        out = e.run(w, acts, **inputs)
        assert tuple(out) == e.outputs and out["style"].shape == (1, cfg["embedding_size"])
        nb = len(cfg["block_layers"])
        assert sorted(acts) == sorted(["head", "xvector.tdnn", "xvector.out_nonlinear", "xvector.stats", "embedding",
                                       *(f"xvector.{s}{b}" for s in ("block", "transit") for b in range(1, nb + 1))])
        assert acts["head"].shape == (1, cfg["head_out_channels"], inputs["feat"].shape[1])
        assert acts[f"xvector.block{nb}"].shape[1] == cfg["transit_in_channels"][-1]
