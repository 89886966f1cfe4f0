"""CAMPPlus speaker encoder end to end against the upstream class (the oracle tier),
and the batch-norm folding ops it uses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from converters.format import ops, schema
from tests.helpers import assert_refused, back_to_upstream, load_canonical, metadata, run_cli
from tests.upstream import campplus as up

EPS = 1e-5


def _forward(m, x):
    with torch.no_grad():
        return m(x)


def _load_back(path, config=None):
    """A fresh upstream CAMPPlus (other seed) loaded with the canonical tensors mapped
    back through provenance, strictly.  Folded batch norms come back as identity norms
    carrying the folded bias (see ops.py); the dropped num_batches_tracked counters may be
    absent (BatchNorm's loader fills them in itself, so strict=True accepts that)."""
    fresh = up.build(config, seed=123)
    fresh.load_state_dict(back_to_upstream(path), strict=True)
    return fresh.eval()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """IndexTTS-2's CAMPPlus(feat_dim=80, embedding_size=192) at its real size, converted."""
    d = tmp_path_factory.mktemp("campplus")
    m = up.build()
    src = up.save_release(m, str(d / "hf"))
    out = d / "campplus.safetensors"
    run_cli("campplus", src, out, "--quiet")
    return m, src, out


def test_forward_matches_upstream_real_size(real):
    m, _, out = real
    x = up.fbank(2, 150, 80)  # > 100 frames after the head: CAM segment pooling has 2 segments
    ref = _forward(m, x)
    got = _forward(_load_back(out), x)
    assert ref.shape == (2, 192) and ref.abs().max() > 1e-2
    # Folding a batch norm into a conv changes float32 rounding (w*s summed vs. sum then
    # scaled); through ~60 layers that stays within 1e-4 relative of outputs of size ~1.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_oracle_is_sensitive(real):
    """One wrong tensor (a carried batch norm's mean) changes the embedding."""
    m, _, out = real
    x = up.fbank(1, 120, 80)
    ref = _forward(m, x)
    sd = back_to_upstream(out)
    k = "xvector.block2.tdnnd5.nonlinear1.batchnorm.running_mean"
    sd[k] = sd[k].flip(0)
    fresh = up.build(seed=5)
    fresh.load_state_dict(sd, strict=False)
    assert not torch.allclose(_forward(fresh.eval(), x), ref, atol=1e-3)


def test_canonical_values_and_provenance(real):
    """Folded tensors follow the documented formulas; carried norms are the source's."""
    m, _, out = real
    t, prov = load_canonical(out)
    sd = m.state_dict()
    bn = "head.layer1.0.shortcut.1"
    scale = sd[f"{bn}.weight"] / torch.sqrt(sd[f"{bn}.running_var"] + EPS)
    torch.testing.assert_close(t["head.layer1.0.shortcut.0.weight"], sd["head.layer1.0.shortcut.0.weight"] * scale[:, None, None, None])
    torch.testing.assert_close(t["head.layer1.0.shortcut.0.bias"], sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale)
    d = "xvector.dense.nonlinear.batchnorm"
    inv = 1 / torch.sqrt(sd[f"{d}.running_var"] + EPS)
    torch.testing.assert_close(t["xvector.dense.linear.weight"], sd["xvector.dense.linear.weight"] * inv[:, None, None])
    torch.testing.assert_close(t["xvector.dense.linear.bias"], -sd[f"{d}.running_mean"] * inv)
    o = "xvector.out_nonlinear.batchnorm"
    torch.testing.assert_close(t["xvector.transit3.linear.bias"],
                               sd[f"{o}.bias"] - sd[f"{o}.running_mean"] * sd[f"{o}.weight"] / torch.sqrt(sd[f"{o}.running_var"] + EPS))
    for p in ("weight", "bias", "running_mean", "running_var"):
        k = f"xvector.block3.tdnnd16.nonlinear1.batchnorm.{p}"
        assert torch.equal(t[k], sd[k])
    assert "xvector.transit1.linear.bias" not in t and "head.bn1.weight" not in t
    assert prov["xvector.tdnn.linear.bias"] == {
        "from": [f"xvector.tdnn.nonlinear.batchnorm.{p}" for p in ("weight", "bias", "running_mean", "running_var")],
        "op": "fold_bn_bias(eps=1e-05)"}
    dropped = json.loads(metadata(out)["dropped"])
    assert set(dropped) == {k for k in sd if k.endswith("num_batches_tracked")}
    cfg = json.loads(metadata(out)["config"])
    assert (cfg["feat_dim"], cfg["embedding_size"], cfg["bn_eps"]) == (80, 192, EPS)
    assert cfg["block_in_channels"] == [128, 256, 512] and cfg["out_channels"] == 512
    assert schema.check_file(str(out))[1] == []


@pytest.mark.parametrize("variant", ["bin", "safetensors", "module-prefix", "config-flag"])
def test_tiny_variants(tmp_path, variant):
    """Non-IndexTTS-2 sizes via campplus.json (or --config), a safetensors dump, DDP prefixes."""
    m = up.build(up.TINY)
    x = up.fbank(2, 40, up.TINY["feat_dim"])
    ref = _forward(m, x)
    folder = tmp_path / "hf"
    src = up.save_release(m, str(folder), up.TINY)
    args = []
    if variant == "safetensors":
        src = str(folder / "campplus.safetensors")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, src)
    elif variant == "module-prefix":
        torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, src)
    elif variant == "config-flag":
        os.rename(folder / "campplus.json", tmp_path / "args.json")
        args = ["--config", tmp_path / "args.json"]
    out = tmp_path / "o.safetensors"
    run_cli("campplus", src, out, "--quiet", *args)
    torch.testing.assert_close(_forward(_load_back(out, up.TINY), x), ref, rtol=1e-5, atol=1e-5)
    assert schema.check_file(str(out))[1] == []


def test_refusals(tmp_path):
    src = up.save_release(up.build(up.TINY), str(tmp_path / "hf"))  # no campplus.json: IndexTTS-2's sizes assumed
    p = run_cli("campplus", src, tmp_path / "o.safetensors", expect=None)
    assert_refused(p, "would not match the schema", "xvector.block1.tdnnd1.linear1.weight")
    (tmp_path / "bad.json").write_text(json.dumps({"feat_dim": 8, "embeding_size": 6}))
    p = run_cli("campplus", src, tmp_path / "o.safetensors", "--config", tmp_path / "bad.json", expect=None)
    assert_refused(p, "unknown CAMPPlus arguments", "embeding_size")
    sd = up.build(up.TINY).state_dict()
    del sd["xvector.block1.tdnnd2.nonlinear2.batchnorm.running_var"]
    torch.save(sd, src)
    p = run_cli("campplus", src, tmp_path / "o.safetensors", "--config", tmp_path / "hf" / "x.json", expect=None)
    assert_refused(p, "config not found")
    (tmp_path / "tiny.json").write_text(json.dumps(up.TINY))
    p = run_cli("campplus", src, tmp_path / "o.safetensors", "--config", tmp_path / "tiny.json", expect=None)
    assert_refused(p, "missing tensors", "xvector.block1.tdnnd2.nonlinear2.batchnorm.running_var")


# ------------------------------------------------------------------ the ops


@pytest.mark.parametrize("affine", [True, False])
def test_bn_fold_ops_are_exact_and_invertible(affine):
    """conv -> eval batch norm equals the folded conv, and the inverse (identity norm
    carrying the bias) reproduces the same function."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(5, 4, 3, bias=False)
    bn = torch.nn.BatchNorm1d(4, affine=affine, eps=EPS)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.3)
        if affine:
            bn.weight.copy_(torch.randn(4))
            bn.bias.copy_(torch.randn(4))
    bn.eval()
    x = torch.randn(2, 5, 9)
    ref = bn(conv(x))
    if affine:
        wop, bop = "fold_bn_weight(eps=1e-05)", "fold_bn_bias(eps=1e-05)"
        wsrc, bsrc = ["c.weight", "n.weight", "n.running_var"], ["n.weight", "n.bias", "n.running_mean", "n.running_var"]
    else:
        wop, bop = "fold_bn_weight_noaffine(eps=1e-05)", "fold_bn_bias_noaffine(eps=1e-05)"
        wsrc, bsrc = ["c.weight", "n.running_var"], ["n.running_mean", "n.running_var"]
    src = {"c.weight": conv.weight.detach(), **{f"n.{k}": v.detach() for k, v in bn.state_dict().items()}}
    w = ops.apply(wop, [src[s] for s in wsrc])
    b = ops.apply(bop, [src[s] for s in bsrc])
    assert ops.out_shape(wop, [src[s].shape for s in wsrc]) == (4, 5, 3)
    assert ops.out_shape(bop, [src[s].shape for s in bsrc]) == (4,)
    torch.testing.assert_close(torch.nn.functional.conv1d(x, w, b), ref, rtol=1e-5, atol=1e-5)
    back = ops.invert({"w": {"from": wsrc, "op": wop}, "b": {"from": bsrc, "op": bop}}, {"w": w, "b": b})
    conv2, bn2 = torch.nn.Conv1d(5, 4, 3, bias=False), torch.nn.BatchNorm1d(4, affine=affine, eps=EPS)
    conv2.load_state_dict({"weight": back["c.weight"]})
    bn2.load_state_dict({k[2:]: v for k, v in back.items() if k.startswith("n.")}, strict=False)
    torch.testing.assert_close(bn2.eval()(conv2(x)), ref, rtol=1e-5, atol=1e-5)


def test_bn_fold_op_grammar():
    assert str(ops.parse("fold_bn_bias(eps=0.001)")[0]) == "fold_bn_bias(eps=0.001)"
    with pytest.raises(ops.OpError):
        ops.parse("copy|fold_bn_weight(eps=1e-05)")  # many-to-one: first step only
    with pytest.raises(ops.OpError):
        ops.parse("split(dim=0.5,index=0,parts=2)")  # other args stay ints
    with pytest.raises(ops.OpError):
        ops.out_shape("fold_bn_weight(eps=1e-05)", [(4, 5, 3), (3,), (3,)])  # channel mismatch


def test_demo_release_converts(tmp_path):
    """The demo builder's file (tiny, float16, campplus.json beside it) converts and checks."""
    up.write_demo(str(tmp_path), {"s2mel": {"style_encoder": {"dim": 6}}})
    out = tmp_path / "campplus.safetensors"
    run_cli("campplus", tmp_path / "campplus", out, "--quiet")
    assert metadata(out)["dtype"] == "F16" and json.loads(metadata(out)["config"])["embedding_size"] == 6
    assert schema.check_file(str(out))[1] == []
