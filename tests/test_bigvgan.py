"""BigVGAN end to end against the upstream class (the oracle tier)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from converters.format import schema
from tests.helpers import assert_dtype_policy, back_to_upstream, load_canonical, metadata, run_cli
from tests.upstream import bigvgan as up


def _forward(m, mel):
    with torch.no_grad():
        return m(mel)


def _reference_and_mel(m):
    torch.manual_seed(1)
    mel = torch.randn(2, up.TINY["num_mels"], 12)
    return _forward(m, mel), mel


def _load_back(path, config=None):
    """A fresh upstream model (other random init, weight norm removed) loaded strictly
    with the canonical tensors mapped back through provenance."""
    fresh = up.folded_copy(up.build(config, seed=123))
    missing_unexpected = fresh.load_state_dict(back_to_upstream(path), strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    return fresh.eval()


@pytest.mark.parametrize("variant", ["pt", "safetensors", "parametrizations", "prefolded"])
def test_forward_matches_upstream(tmp_path, variant):
    m = up.build(parametrizations=variant == "parametrizations")
    ref, mel = _reference_and_mel(m)
    if variant == "prefolded":
        m = up.folded_copy(m)  # upstream's loader accepts checkpoints without weight norm too
    src = up.save_release(m, str(tmp_path / "bigvgan"), fmt="safetensors" if variant == "safetensors" else "pt")
    out = tmp_path / "bigvgan.safetensors"
    run_cli("bigvgan", os.path.dirname(src), out, "--quiet")
    got = _forward(_load_back(out), mel)
    assert ref.abs().max() > 1e-3  # the comparison is not between two near-zero signals
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_oracle_is_sensitive(tmp_path):
    """The comparison above can fail: one wrong tensor changes the output."""
    m = up.build()
    ref, mel = _reference_and_mel(m)
    up.save_release(m, str(tmp_path / "bv"))
    out = tmp_path / "o.safetensors"
    run_cli("bigvgan", tmp_path / "bv", out, "--quiet")
    sd = back_to_upstream(out)
    sd["ups.0.0.weight"] = sd["ups.0.0.weight"].transpose(0, 1).reshape(sd["ups.0.0.weight"].shape)
    fresh = up.folded_copy(up.build(seed=5))
    fresh.load_state_dict(sd, strict=True)
    assert not torch.allclose(_forward(fresh.eval(), mel), ref, atol=1e-3)


def test_canonical_values(tmp_path):
    """Folding and snake scaling are the documented formulas, tensor by tensor."""
    m = up.build()
    up.save_release(m, str(tmp_path / "bv"))
    out = tmp_path / "o.safetensors"
    run_cli("bigvgan", tmp_path / "bv", out, "--quiet")
    t, prov = load_canonical(out)
    sd = m.state_dict()
    g, v = sd["ups.1.0.weight_g"], sd["ups.1.0.weight_v"]  # ConvTranspose1d: [in, out, k], g over dim 0
    torch.testing.assert_close(t["ups.1.weight"], g * v / v.norm(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(t["resblocks.2.activations.3.beta"], sd["resblocks.2.activations.3.act.beta"].exp())
    assert prov["ups.1.weight"] == {"from": ["ups.1.0.weight_g", "ups.1.0.weight_v"], "op": "fold_weight_norm(dim=0)"}
    cfg = json.loads(metadata(out)["config"])
    assert cfg["snake_logscale"] is False and cfg["upsample_rates"] == up.TINY["upsample_rates"]


def test_deterministic(tmp_path):
    up.save_release(up.build(), str(tmp_path / "bv"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_cli("bigvgan", tmp_path / "bv", a, "--quiet")
    run_cli("bigvgan", tmp_path / "bv", b, "--quiet")
    assert a.read_bytes() == b.read_bytes()


def test_dtype_option(tmp_path):
    up.save_release(up.build(), str(tmp_path / "bv"))
    out = tmp_path / "h.safetensors"
    run_cli("bigvgan", tmp_path / "bv", out, "--dtype", "bfloat16", "--quiet")
    t, _ = load_canonical(out)
    assert {x.dtype for x in t.values()} == {torch.bfloat16, torch.float32}  # snake alpha/beta stay float32
    assert {n.rsplit(".", 1)[1] for n, x in t.items() if x.dtype == torch.float32} == {"alpha", "beta"}
    assert_dtype_policy(out, "BF16")


def test_source_recorded(tmp_path):
    src = up.save_release(up.build(), str(tmp_path / "bv"))
    out = tmp_path / "o.safetensors"
    run_cli("bigvgan", tmp_path / "bv", out, "--quiet")
    import hashlib

    info = json.loads(metadata(out)["source"])
    assert info == {"file": "bigvgan_generator.pt", "size": os.path.getsize(src),
                    "sha256": hashlib.sha256(open(src, "rb").read()).hexdigest()}
