"""MaskGCT semantic codec (RepCodec) end to end against the upstream class (the oracle
tier): the two entry points IndexTTS-2 calls, quantize() and quantizer.vq2emb()."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from converters.format import schema
from tests.helpers import assert_refused, back_to_upstream, load_canonical, metadata, run_cli
from tests.upstream import bigvgan as up_bigvgan
from tests.upstream import semantic_codec as up

T = 11


def _forward(m, x):
    """What infer_v2.py runs: quantize(features) and vq2emb(codes.unsqueeze(1))."""
    with torch.no_grad():
        codes, quantized = m.quantize(x)
        emb = m.quantizer.vq2emb(codes[:1].unsqueeze(1))
    return codes, quantized, emb


def _input(config=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, T, (config or up.TINY)["hidden_size"], generator=g)


def _load_back(sd, config=None):
    """A fresh RepCodec (other seed, weight norm removed) whose encoder and quantizer
    load the canonical tensors strictly; nothing else comes back (the decoder was dropped)."""
    fresh = up.folded(up.build(config, seed=123))
    assert {k.split(".")[0] for k in sd} == {"encoder", "quantizer"}
    for part in ("encoder", "quantizer"):
        getattr(fresh, part).load_state_dict({k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}, strict=True)
    return fresh.eval()


def _convert(tmp_path, m, config=None, *args):
    src = up.save_release(m, str(tmp_path / "rel"), config)
    out = tmp_path / "semantic_codec.safetensors"
    run_cli("semantic-codec", src, out, "--config", tmp_path / "rel" / "config.yaml", "--quiet", *args)
    return out


@pytest.mark.parametrize("variant", ["weight_g", "parametrizations"])
def test_forward_matches_upstream(tmp_path, variant):
    m = up.build()
    x = _input()
    ref = _forward(m, x)
    if variant == "parametrizations":  # newer torch's weight-norm spelling, same g and v
        m = up_bigvgan.to_parametrizations(m)
    out = _convert(tmp_path, m)
    got = _forward(_load_back(back_to_upstream(out)), x)
    assert len(set(ref[0].flatten().tolist())) > 3  # the codes are not all one entry
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
    assert schema.check_file(str(out))[1] == []


def test_oracle_is_sensitive(tmp_path):
    m = up.build()
    x = _input()
    ref = _forward(m, x)
    sd = back_to_upstream(_convert(tmp_path, m))
    k = "encoder.0.convnext.1.gamma"
    sd[k] = sd[k].flip(0)
    got = _forward(_load_back(sd), x)
    assert not torch.allclose(got[1], ref[1], atol=1e-3)


def test_canonical_values_and_drops(tmp_path):
    m = up.build()
    out = _convert(tmp_path, m)
    t, prov = load_canonical(out)
    sd = m.state_dict()
    q = "quantizer.quantizers.0.in_project"
    g, v = sd[f"{q}.weight_g"], sd[f"{q}.weight_v"]  # [4, 1, 1], [4, 16, 1]
    torch.testing.assert_close(t[f"{q}.weight"], (g * v / v.norm(dim=(1, 2), keepdim=True)).squeeze(2))
    assert prov[f"{q}.weight"]["op"] == "fold_weight_norm(dim=0)|squeeze(dim=2)"
    assert torch.equal(t["quantizer.quantizers.0.codebook.weight"], sd["quantizer.quantizers.0.codebook.weight"])
    dropped = json.loads(metadata(out)["dropped"])
    assert set(dropped) == {k for k in sd if k.startswith("decoder.")}
    assert all("vq2emb" in why for why in dropped.values())
    cfg = json.loads(metadata(out)["config"])
    assert {k: cfg[k] for k in up.TINY} == up.TINY and cfg["num_quantizers"] == 1 and cfg["has_projections"]


def test_runtime_config_follows_upstream_defaults():
    """Keys the section leaves out resolve as RepCodec resolves them, including its quirk:
    vocos_intermediate_dim and vocos_num_layers are read only when vocos_dim is present."""
    from omegaconf import OmegaConf

    from converters.models import semantic_codec as conv

    section = {"codebook_size": 16, "hidden_size": 8, "codebook_dim": 8, "vocos_intermediate_dim": 24, "vocos_num_layers": 1}
    cfg = conv.runtime_config(section, "config.yaml")
    m = up.module().RepCodec(cfg=OmegaConf.create(section))
    for k in ("codebook_size", "hidden_size", "codebook_dim", "vocos_dim", "vocos_intermediate_dim", "vocos_num_layers",
              "num_quantizers", "downsample_scale"):
        assert cfg[k] == getattr(m, k), k
    assert cfg["has_projections"] is False  # hidden_size == codebook_dim: identity projections upstream


def test_identity_projections(tmp_path):
    """hidden_size == codebook_dim: upstream has no in/out projections, nor does the file."""
    config = dict(up.TINY, hidden_size=4, codebook_dim=4)
    m = up.build(config)
    x = _input(config)
    ref = _forward(m, x)
    out = _convert(tmp_path, m, config)
    t, _ = load_canonical(out)
    assert not any("project" in k for k in t)
    got = _forward(_load_back(back_to_upstream(out), config), x)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path):
    m = up.build()
    src = up.save_release(m, str(tmp_path / "hf"), write_config=False)
    assert_refused(run_cli("semantic-codec", src, tmp_path / "o.safetensors", expect=None), "config not found", "--config")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"semantic_codec": dict(up.TINY, downsample_scale=2)}))
    p = run_cli("semantic-codec", src, tmp_path / "o.safetensors", "--config", tmp_path / "c.yaml", expect=None)
    assert_refused(p, "downsample_scale")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"semantic_codec": dict(up.TINY, vocos_num_layers=3)}))
    p = run_cli("semantic-codec", src, tmp_path / "o.safetensors", "--config", tmp_path / "c.yaml", expect=None)
    assert_refused(p, "missing tensors", "encoder.0.convnext.2.")
