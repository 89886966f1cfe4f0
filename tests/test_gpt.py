"""GPT (UnifiedVoice v2) end to end against the upstream class (the oracle tier)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from converters.format import schema
from tests.helpers import assert_refused, back_to_upstream, load_canonical, metadata, rewrite, run_cli
from tests.upstream import gpt as up

B, T_COND, T_EMO = 2, 11, 9


def _inputs(cfg: dict) -> dict:
    g = torch.Generator().manual_seed(7)
    d, cd, ed = cfg["model_dim"], cfg["condition_module"]["output_size"], cfg["emo_condition_module"]["output_size"]
    return {
        "h": torch.randn(B, 6, d, generator=g),
        "cond": torch.randn(B, T_COND, 1024, generator=g),
        "cond_lens": torch.tensor([T_COND, T_COND - 4]),  # second item padded: masks are exercised
        "emo": torch.randn(B, T_EMO, 1024, generator=g),
        "emo_lens": torch.tensor([T_EMO - 3, T_EMO]),
        "ctx": torch.randn(B, 5, cd, generator=g),
        "ctx_mask": torch.tensor([[True] * (32 + 5), [True] * (32 + 3) + [False] * 2]),
        "emo_ctx": torch.randn(B, 4, ed, generator=g),
        "emo_ctx_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
        "text": torch.randint(2, cfg["number_text_tokens"], (B, 5), generator=g),
        "text_lens": torch.tensor([5, 3]),
        "mel": torch.randint(0, cfg["start_mel_token"], (B, 7), generator=g),
        "mel_lens": torch.tensor([7, 6]),
    }


def _outputs(m, x: dict) -> dict[str, torch.Tensor]:
    """Every forward the issue names, plus the whole model and its heads."""
    with torch.no_grad():
        out = {
            "gpt_block0": m.gpt.h[0](x["h"]),
            "gpt_stack": m.gpt(inputs_embeds=x["h"], return_dict=True).last_hidden_state,
            "conditioning_encoder": m.conditioning_encoder(x["cond"], x["cond_lens"])[0],
            "emo_conditioning_encoder": m.emo_conditioning_encoder(x["emo"], x["emo_lens"])[0],
            "perceiver_encoder": m.perceiver_encoder(x["ctx"], x["ctx_mask"]),
            "emo_perceiver_encoder": m.emo_perceiver_encoder(x["emo_ctx"], x["emo_ctx_mask"]),
            "unified_voice": m(x["cond"], x["text"], x["text_lens"], x["mel"], x["mel_lens"], x["emo"],
                               cond_mel_lengths=x["cond_lens"], emo_cond_mel_lengths=x["emo_lens"],
                               use_speed=torch.zeros(B, dtype=torch.long), do_spk_cond=True),
        }
        h = m.final_norm(out["gpt_stack"])
        out["mel_head"], out["text_head"] = m.mel_head(h), m.text_head(h)
    return out


def _load_back(path, cfg=None, seed=123):
    """A fresh upstream model (another random init) loaded strictly with the canonical
    tensors mapped back through provenance."""
    fresh = up.build(cfg, seed=seed)
    res = fresh.load_state_dict(back_to_upstream(str(path)), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    return fresh.eval()


def _convert(tmp_path, m, fmt="pth", cfg=None, name="gpt"):
    src = up.save_release(m, str(tmp_path / name), cfg, fmt=fmt)
    out = tmp_path / f"{name}.safetensors"
    run_cli("gpt", src, out, "--quiet")
    return src, out


def _assert_same(got: dict, ref: dict):
    for k in ref:
        assert ref[k].abs().max() > 1e-3, k  # not a comparison of near-zero signals
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """One converted tiny release (plain state dict), shared by the value tests."""
    tmp = tmp_path_factory.mktemp("gpt")
    m = up.build()
    src, out = _convert(tmp, m)
    return m, src, out


# ------------------------------------------------------------------ oracle


@pytest.mark.parametrize("variant", ["pth", "wrapped", "safetensors", "ddp"])
def test_forward_matches_upstream(tmp_path, variant):
    m = up.build()
    x = _inputs(up.TINY)
    ref = _outputs(m, x)
    if variant == "ddp":  # a DataParallel-trained checkpoint: module. prefixes, {"model": ...}
        os.makedirs(tmp_path / "gpt")
        torch.save({"model": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "gpt" / "gpt.pth")
        up.write_config(str(tmp_path / "gpt"))
        out = tmp_path / "gpt.safetensors"
        run_cli("gpt", tmp_path / "gpt", out, "--quiet")
    else:
        _, out = _convert(tmp_path, m, fmt=variant)
    assert schema.check_file(str(out))[1] == []
    assert run_cli("check", out).returncode == 0
    fresh = _load_back(out)
    # every upstream tensor comes back bit for bit (all ops here are exact)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    _assert_same(_outputs(fresh, x), ref)


@pytest.mark.parametrize("swap", [
    ("gpt.h.0.attn.q.weight", "gpt.h.0.attn.k.weight", "gpt_block0"),
    ("conditioning_encoder.encoders.0.conv_module.pointwise_conv1.value.weight",
     "conditioning_encoder.encoders.0.conv_module.pointwise_conv1.gate.weight", "conditioning_encoder"),
    ("emo_perceiver_encoder.layers.1.attn.to_k.weight", "emo_perceiver_encoder.layers.1.attn.to_v.weight", "emo_perceiver_encoder"),
    ("perceiver_encoder.layers.0.ff.value.weight", "perceiver_encoder.layers.0.ff.gate.weight", "perceiver_encoder"),
])
def test_oracle_is_sensitive(tmp_path, release, swap):
    """The comparison can fail: a converter that put two parts in the wrong order
    (same shapes, so no schema check notices) changes the outputs."""
    m, _, out = release
    a, b, which = swap
    t, _ = load_canonical(out)
    t[a], t[b] = t[b], t[a]
    bad = rewrite(str(out), str(tmp_path / "bad.safetensors"), tensors=t)
    assert schema.check_file(bad)[1] == []
    x = _inputs(up.TINY)
    got, ref = _outputs(_load_back(bad), x), _outputs(m, x)
    assert not torch.allclose(got[which], ref[which], atol=1e-3)


# ------------------------------------------------------------------ canonical values


def test_canonical_values(release):
    """Each split/transpose is the documented formula, tensor by tensor."""
    m, _, out = release
    t, prov = load_canonical(out)
    sd = m.state_dict()
    d = up.TINY["model_dim"]
    w, bias = sd["gpt.h.1.attn.c_attn.weight"], sd["gpt.h.1.attn.c_attn.bias"]  # Conv1D [in, 3d]
    for i, n in enumerate("qkv"):
        assert torch.equal(t[f"gpt.h.1.attn.{n}.weight"], w[:, i * d:(i + 1) * d].T)
        assert torch.equal(t[f"gpt.h.1.attn.{n}.bias"], bias[i * d:(i + 1) * d])
    assert torch.equal(t["gpt.h.0.mlp.fc.weight"], sd["gpt.h.0.mlp.c_fc.weight"].T)
    assert prov["gpt.h.1.attn.k.weight"] == {"from": ["gpt.h.1.attn.c_attn.weight"], "op": "split(dim=1,index=1,parts=3)|transpose"}
    ed = up.TINY["emo_condition_module"]["output_size"]
    pw = sd["emo_conditioning_encoder.encoders.0.conv_module.pointwise_conv1.weight"]  # [2d, d, 1]
    assert torch.equal(t["emo_conditioning_encoder.encoders.0.conv_module.pointwise_conv1.gate.weight"], pw[ed:, :, 0])
    inner = 64 * up.TINY["emo_condition_module"]["attention_heads"]
    assert torch.equal(t["emo_perceiver_encoder.layers.0.attn.to_v.weight"], sd["emo_perceiver_encoder.layers.0.0.to_kv.weight"][inner:])
    assert t["conditioning_encoder.embed.pos_enc.pe"].shape == (5000, up.TINY["condition_module"]["output_size"])


def test_canonical_tensors_work_as_stored(release):
    """A runtime uses the canonical tensors as plain linears: GPT-2 q/k/v, the GLU and
    the GEGLU computed from them equal what the upstream modules compute."""
    m, _, out = release
    t, _ = load_canonical(out)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # GPT-2: query/key/value of block 1
        x = torch.randn(2, 4, up.TINY["model_dim"], generator=g)
        fused = m.gpt.h[1].attn.c_attn(x)
        mine = torch.cat([F.linear(x, t[f"gpt.h.1.attn.{n}.weight"], t[f"gpt.h.1.attn.{n}.bias"]) for n in "qkv"], -1)
        torch.testing.assert_close(mine, fused, rtol=1e-5, atol=1e-6)
        # Conformer conv module: GLU of the pointwise conv, as two linears
        cm = m.conditioning_encoder.encoders[1].conv_module
        p = "conditioning_encoder.encoders.1.conv_module.pointwise_conv1"
        x = torch.randn(2, 5, up.TINY["condition_module"]["output_size"], generator=g)
        ref = F.glu(cm.pointwise_conv1(x.transpose(1, 2)), dim=1).transpose(1, 2)
        mine = F.linear(x, t[f"{p}.value.weight"], t[f"{p}.value.bias"]) * torch.sigmoid(F.linear(x, t[f"{p}.gate.weight"], t[f"{p}.gate.bias"]))
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
        # Perceiver GEGLU feed-forward
        ff = m.perceiver_encoder.layers[0][1]
        p = "perceiver_encoder.layers.0.ff"
        x = torch.randn(2, 3, up.TINY["model_dim"], generator=g)
        mine = F.linear(F.linear(x, t[f"{p}.value.weight"], t[f"{p}.value.bias"]) * F.gelu(F.linear(x, t[f"{p}.gate.weight"], t[f"{p}.gate.bias"])),
                        t[f"{p}.out.weight"], t[f"{p}.out.bias"])
        torch.testing.assert_close(mine, ff(x), rtol=1e-5, atol=1e-6)


def test_runtime_config(release):
    """The metadata config carries what a runtime needs, matching the upstream modules."""
    m, _, out = release
    cfg = json.loads(metadata(out)["config"])
    gc = m.gpt.config
    assert (cfg["model_dim"], cfg["layers"], cfg["heads"]) == (gc.n_embd, gc.n_layer, gc.n_head)
    assert cfg["gpt_activation"] == gc.activation_function and cfg["gpt_layer_norm_epsilon"] == gc.layer_norm_epsilon
    assert cfg["gpt_n_inner"] == m.gpt.h[0].mlp.c_fc.nf
    assert cfg["text_vocab_size"] == m.text_embedding.num_embeddings
    assert cfg["mel_positions"] == m.mel_pos_embedding.emb.num_embeddings
    assert cfg["text_positions"] == m.text_pos_embedding.emb.num_embeddings
    assert cfg["final_norm_eps"] == m.final_norm.eps
    for stack in ("conditioning_encoder", "emo_conditioning_encoder"):
        enc, c = getattr(m, stack), cfg[stack]
        attn = enc.encoders[0].self_attn
        assert (c["attention_heads"], c["head_dim"]) == (attn.h, attn.d_k)
        assert c["output_size"] == enc.output_size() and c["num_blocks"] == len(enc.encoders)
        assert c["cnn_module_kernel"] == enc.encoders[0].conv_module.depthwise_conv.kernel_size[0]
        assert c["pos_enc_max_len"] == enc.embed.pos_enc.max_len
        assert c["layer_norm_eps"] == enc.after_norm.eps == enc.encoders[0].norm_ff.eps
    assert cfg["conditioning_encoder"]["attention_heads"] != cfg["emo_conditioning_encoder"]["attention_heads"]
    for stack in ("perceiver_encoder", "emo_perceiver_encoder"):
        p, c = getattr(m, stack), cfg[stack]
        assert (c["num_latents"], c["dim"]) == tuple(p.latents.shape)
        assert c["depth"] == len(p.layers) and c["heads"] == p.layers[0][0].heads
        assert c["ff_inner"] * 2 == p.layers[0][1][0].out_features
    for k in ("start_text_token", "stop_text_token", "start_mel_token", "stop_mel_token", "number_text_tokens", "number_mel_codes"):
        assert cfg[k] == getattr(m, k)


# ------------------------------------------------------------------ variants


def test_fine_tune_other_vocab(tmp_path):
    """Community fine-tunes change number_text_tokens: they convert and pass check; the
    shapes come from the config, so a mismatched config is refused, naming the tensor."""
    cfg = up.config(number_text_tokens=37)
    m = up.build(cfg)
    src, out = _convert(tmp_path, m, cfg=cfg)
    assert schema.check_file(str(out))[1] == []
    t, _ = load_canonical(out)
    assert t["text_embedding.weight"].shape[0] == 38 and t["text_head.bias"].shape == (38,)
    x = _inputs(cfg)
    _assert_same(_outputs(_load_back(out, cfg), x), _outputs(m, x))
    up.write_config(str(tmp_path / "gpt"), up.TINY)  # the base model's config beside the fine-tune
    p = run_cli("gpt", src, tmp_path / "wrong.safetensors", "--quiet", expect=None)
    assert_refused(p, "text_embedding.weight")


def test_pe_regenerated_when_absent(tmp_path, release):
    """A dump without the sinusoid buffers still converts: pe is rebuilt from the config,
    equal to upstream's buffer, with empty provenance."""
    m, _, _ = release
    from safetensors.torch import save_file

    os.makedirs(tmp_path / "g")
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("pos_enc.pe")}
    save_file(sd, str(tmp_path / "g" / "gpt.safetensors"))
    up.write_config(str(tmp_path / "g"))
    out = tmp_path / "o.safetensors"
    run_cli("gpt", tmp_path / "g", out, "--quiet")
    t, prov = load_canonical(out)
    for stack in ("conditioning_encoder", "emo_conditioning_encoder"):
        name = f"{stack}.embed.pos_enc.pe"
        assert prov[name]["from"] == [] and "sin" in prov[name]["op"]
        assert torch.equal(t[name], m.state_dict()[name][0])
    assert schema.check_file(str(out))[1] == []


def test_old_transformers_buffers_dropped(tmp_path, release):
    """Checkpoints saved with older transformers carry attn.bias / attn.masked_bias
    buffers: they are dropped, with the reason recorded."""
    m, _, _ = release
    sd = dict(m.state_dict())
    n = 10 + 2 + 12 + 2 + 1
    for i in range(up.TINY["layers"]):
        sd[f"gpt.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        sd[f"gpt.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    os.makedirs(tmp_path / "g")
    torch.save(sd, tmp_path / "g" / "gpt.pth")
    up.write_config(str(tmp_path / "g"))
    out = tmp_path / "o.safetensors"
    run_cli("gpt", tmp_path / "g", out, "--quiet")
    dropped = json.loads(metadata(out)["dropped"])
    assert set(dropped) == {f"gpt.h.{i}.attn.{b}" for i in range(up.TINY["layers"]) for b in ("bias", "masked_bias")}
    assert all("buffer" in r for r in dropped.values())


def test_missing_and_unexpected_tensors_refused(tmp_path, release):
    m, _, _ = release
    sd = dict(m.state_dict())
    del sd["emo_perceiver_encoder.layers.1.0.to_kv.weight"]
    os.makedirs(tmp_path / "a")
    torch.save(sd, tmp_path / "a" / "gpt.pth")
    up.write_config(str(tmp_path / "a"))
    assert_refused(run_cli("gpt", tmp_path / "a", tmp_path / "a.safetensors", expect=None),
                   "missing tensors", "emo_perceiver_encoder.layers.1.0.to_kv.weight")
    sd = dict(m.state_dict())
    sd["gpt.h.0.attn.extra"] = torch.zeros(3)
    os.makedirs(tmp_path / "b")
    torch.save(sd, tmp_path / "b" / "gpt.pth")
    up.write_config(str(tmp_path / "b"))
    assert_refused(run_cli("gpt", tmp_path / "b", tmp_path / "b.safetensors", expect=None), "gpt.h.0.attn.extra")


def test_unsupported_config_refused(tmp_path, release):
    _, src, _ = release
    cfg = up.config(condition_type="perceiver")
    os.makedirs(tmp_path / "c")
    path = up.write_config(str(tmp_path / "c"), cfg)
    p = run_cli("gpt", src, tmp_path / "o.safetensors", "--config", path, expect=None)
    assert_refused(p, "condition_type", "perceiver")


def test_demo_release(tmp_path):
    """The demo generator's gpt.pth is small, loads into upstream strictly, converts."""
    cfg = up.demo_config()
    up.write_demo(str(tmp_path), cfg)
    path = tmp_path / "gpt.pth"
    assert path.stat().st_size < 1.5e6
    up.write_config(str(tmp_path), cfg["gpt"])
    sd = torch.load(path, weights_only=True)
    up.build(cfg["gpt"], seed=1).half().load_state_dict(sd, strict=True)
    out = tmp_path / "gpt.safetensors"
    run_cli("gpt", tmp_path, out, "--quiet")
    assert schema.check_file(str(out))[1] == []
    assert metadata(out)["dtype"] == "F16"
