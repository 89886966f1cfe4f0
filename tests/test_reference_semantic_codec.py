"""Reference runtime, semantic codec: ``reference.semantic_codec`` on the canonical file
against upstream's RepCodec built and loaded as infer_v2.py does it
(``build_semantic_codec(cfg.semantic_codec)`` + ``safetensors.torch.load_model``, weight
norm left in place), for ``quantize(x)`` and ``quantizer.vq2emb(codes.unsqueeze(1))``."""

from __future__ import annotations

import os

import pytest
import torch

from converters.cli import forward
from converters.format.schema import check_file
from reference import semantic_codec as ref
from tests.helpers import ROOT, convert_in_process, reference_load, swap_rows
from tests.upstream import semantic_codec as up

T = 13
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")


def upstream_codec(model_file, config_yaml):
    """infer_v2.py's codec: RepCodec from the config.yaml section, then load_model on the
    file (``converters.cli.forward.semantic_codec_model``, what ``verify --forward`` runs)."""
    return forward.semantic_codec_model(str(model_file), forward.config_section(str(config_yaml), "semantic_codec"))


def compare(w, codec, x):
    """Max abs differences (quantized, emb), whether the codes agree, and the tensors.
    vq2emb runs on upstream's codes of the first item, as infer_v2 feeds it one sequence
    of codes [1, T] (``codes.unsqueeze(1)``)."""
    q = forward.semantic_codec_run(codec, "quantize", {"x": x})
    want_codes, want_q = q["codes"], q["quantized"]
    want_emb = forward.semantic_codec_run(codec, "vq2emb", {"codes": want_codes[:1]})["emb"]
    codes, quantized = ref.quantize(w, x)
    emb = ref.vq2emb(w, want_codes[:1])
    return (quantized - want_q).abs().max().item(), (emb - want_emb).abs().max().item(), \
        torch.equal(codes, want_codes), (want_codes, want_q, want_emb, codes, quantized, emb)


def _input(hidden, seed=1, batch=2):
    return torch.randn(batch, T, hidden, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec")
    src = up.save_release(up.build(), str(d))
    out = convert_in_process("semantic-codec", src, d / "semantic_codec.safetensors", config=d / "config.yaml")
    return src, d / "config.yaml", out


def _check(w, codec, x):
    *_, (want_codes, want_q, want_emb, codes, quantized, emb) = compare(w, codec, x)
    assert len(set(want_codes.flatten().tolist())) > 3  # the codes are not all one entry
    assert codes.dtype == torch.int64 and codes.shape == want_codes.shape == x.shape[:2]
    assert torch.equal(codes, want_codes)
    assert quantized.shape == want_q.shape == x.shape and want_q.abs().max() > 0.5
    torch.testing.assert_close(quantized, want_q, rtol=0, atol=1e-5)
    assert emb.shape == want_emb.shape == (1, x.shape[2], x.shape[1])
    torch.testing.assert_close(emb, want_emb, rtol=0, atol=1e-5)


def test_quantize_and_vq2emb_match_upstream(tiny):
    src, cfg, out = tiny
    codec, w = upstream_codec(src, cfg), reference_load(out)
    assert hasattr(codec.quantizer.quantizers[0].in_project, "weight_g")  # weight norm as upstream runs it
    _check(w, codec, _input(up.TINY["hidden_size"]))


def test_vq2emb_of_several_codes_matches_residual_vq(tiny):
    """ResidualVQ.vq2emb's own contract ([num_quantizers, B, T] codes), batch of 3."""
    src, cfg, out = tiny
    codec, w = upstream_codec(src, cfg), reference_load(out)
    codes = torch.randint(0, up.TINY["codebook_size"], (1, 3, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = codec.quantizer.vq2emb(codes)
    torch.testing.assert_close(ref.codes_to_embedding(w, codes), want, rtol=0, atol=1e-5)


def test_demo_release_matches_upstream(tmp_path):
    rel = os.path.join(ROOT, "demo", "release")
    src, cfg = os.path.join(rel, "MaskGCT", "semantic_codec", "model.safetensors"), os.path.join(rel, "config.yaml")
    out = convert_in_process("semantic-codec", src, tmp_path / "semantic_codec.safetensors", config=cfg)
    w = reference_load(out)
    _check(w, upstream_codec(src, cfg), _input(w.config["hidden_size"], seed=3))


# Same-shape pairs ([vocos_dim] each) that a wrong table could plausibly exchange; the
# quantizer has none (in_project [d, H] and out_project [H, d] differ in shape, the
# codebook is [K, d]), so these show up in quantize (codes and quantized).
PAIRS = {
    "backbone norms": [("encoder.0.norm.weight", "encoder.0.final_layer_norm.weight"),
                       ("encoder.0.norm.bias", "encoder.0.final_layer_norm.bias")],
    "block norm vs layer scale": [("encoder.0.convnext.{i}.norm.weight", "encoder.0.convnext.{i}.gamma")],
    "block biases": [("encoder.0.convnext.{i}.dwconv.bias", "encoder.0.convnext.{i}.pwconv2.bias")],
}


@pytest.mark.parametrize("pairs", list(PAIRS.values()), ids=list(PAIRS))
def test_swapped_rows_are_caught(tiny, tmp_path, monkeypatch, pairs):
    src, cfg, _ = tiny
    swap_rows(monkeypatch, "semantic-codec", *pairs)
    out = convert_in_process("semantic-codec", src, tmp_path / "semantic_codec.safetensors", config=cfg)
    assert check_file(str(out))[1] == []  # the file is well formed; only the forward can tell
    dq, _, same, _ = compare(reference_load(out), upstream_codec(src, cfg), _input(up.TINY["hidden_size"]))
    assert dq > 1e-3 and not same


def test_entries_run_on_their_own_inputs(tiny):
    w = reference_load(tiny[2])
    g = torch.Generator().manual_seed(0)
    (qz, v2e) = ref.ENTRIES
    assert [e.name for e in ref.ENTRIES] == ["quantize", "vq2emb"]
    acts = {}
    inp = qz.inputs(w.config, g)
    assert list(inp) == list(qz.args)
    out = qz.run(w, acts, **inp)
    assert list(out) == list(qz.outputs)
    b, t, h = inp["x"].shape
    assert out["codes"].shape == (b, t) and out["codes"].dtype == torch.int64 and out["quantized"].shape == (b, t, h)
    assert {f"encoder.convnext.{i}" for i in range(w.config["vocos_num_layers"])} <= set(acts)
    assert {"encoder.embed", "encoder", "quantizer.0.codes", "quantized"} <= set(acts)
    acts = {}
    inp = v2e.inputs(w.config, g)
    assert list(inp) == list(v2e.args) and inp["codes"].dtype == torch.int64 and inp["codes"].shape[0] == 1
    out = v2e.run(w, acts, **inp)
    assert list(out) == list(v2e.outputs) and out["emb"].shape == (1, h, inp["codes"].shape[1])
    assert "emb" in acts
