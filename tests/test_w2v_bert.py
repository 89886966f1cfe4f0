"""w2v-bert end to end against transformers' Wav2Vec2BertModel (the oracle tier), plus
IndexTTS-2's feature statistics."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from converters.release import engine
from converters.models import registry
from converters.format import schema
from converters.errors import ConvertError
from converters.io.sources import CombinedSource, Source
from converters.format.table import resolve
from converters.io.st_read import st_dtype
from tests.helpers import assert_dtype_policy, assert_refused, assert_std_of, back_to_upstream, load_canonical, metadata, run_cli
from tests.upstream import w2v_bert as up

H = up.TINY["hidden_size"]


@pytest.fixture(scope="module")
def model():
    return up.build()


@pytest.fixture(scope="module")
def snapshot(model, tmp_path_factory):
    """An HF cache snapshot (symlinks into blobs/) and a stats file elsewhere."""
    d = tmp_path_factory.mktemp("w2v")
    snap = up.save_snapshot(model, str(d / "hub"))
    st = up.stats(H)
    (d / "release").mkdir()
    stats_path = up.write_stats(str(d / "release" / "wav2vec2bert_stats.pt"), st)
    return snap, stats_path, st


@pytest.fixture(scope="module")
def converted(snapshot, tmp_path_factory):
    snap, stats_path, _ = snapshot
    out = tmp_path_factory.mktemp("w2v_out") / "w2v_bert.safetensors"
    run_cli("w2v-bert", snap, out, "--stats", stats_path, "--quiet")
    return out


def _load_back(path, config=None, seed=123):
    """A fresh model (other random init) loaded with the canonical tensors mapped back
    through provenance.  The statistics come back as stats/mean and stats/var."""
    sd = back_to_upstream(path)
    st = {k[len("stats/"):]: sd.pop(k) for k in list(sd) if k.startswith("stats/")}
    fresh = up.build(config, seed=seed)
    res = fresh.load_state_dict(sd, strict=False)
    # masked_spec_embed is dropped on purpose (training only); the fresh model keeps its
    # own random one, so matching outputs also show inference never reads it.
    assert res.missing_keys == (["masked_spec_embed"] if hasattr(fresh, "masked_spec_embed") else [])
    assert res.unexpected_keys == []
    return fresh.eval(), st


def test_every_hidden_state_matches_upstream(model, snapshot, converted):
    snap, _, st = snapshot
    assert os.path.islink(os.path.join(snap, "model.safetensors"))  # the HF cache layout was used
    x, mask = up.features()
    ref = up.hidden_states(model, x, mask)
    fresh, got_stats = _load_back(converted)
    assert not torch.equal(fresh.masked_spec_embed, model.masked_spec_embed)
    got = up.hidden_states(fresh, x, mask)
    assert len(ref) == up.TINY["num_hidden_layers"] + 1 == len(got)
    for k, (a, b) in enumerate(zip(got, ref)):
        assert b[0].abs().max() > 0.5, k  # not a comparison of near-zero signals
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"hidden_states[{k}]: {m}")
    assert set(got_stats) == {"mean", "var"}
    torch.testing.assert_close(got_stats["var"], st["var"], rtol=1e-6, atol=0)  # inverse of sqrt round-trips
    assert run_cli("check", converted).stdout.startswith("ok ")
    assert schema.check_file(str(converted))[1] == []


def test_statistics_are_mean_and_sqrt_var(snapshot, converted):
    _, _, st = snapshot
    t, prov = load_canonical(converted)
    assert torch.equal(t["semantic_stats.mean"], st["mean"])
    assert_std_of(t["semantic_stats.std"], st["var"])  # upstream's build_semantic_model computes torch.sqrt(var)
    assert prov["semantic_stats.std"] == {"from": ["stats/var"], "op": "sqrt"}
    # the runtime's normalisation of the layer IndexTTS-2 reads, against upstream's get_emb
    cfg = json.loads(metadata(converted)["config"])
    h = torch.randn(2, 5, H)
    torch.testing.assert_close((h - t["semantic_stats.mean"]) / t["semantic_stats.std"], (h - st["mean"]) / torch.sqrt(st["var"]))
    assert cfg["indextts2_hidden_state_index"] == 17


def test_oracle_is_sensitive(model, converted):
    """The comparison above can fail: GLU value and gate swapped in one layer changes it."""
    x, mask = up.features()
    ref = up.hidden_states(model, x, mask)
    fresh, _ = _load_back(converted)
    w = fresh.encoder.layers[3].conv_module.pointwise_conv1.weight
    with torch.no_grad():
        w.copy_(torch.cat([w[H:], w[:H]]))
    got = up.hidden_states(fresh, x, mask)
    assert torch.equal(got[3], ref[3])
    assert not torch.allclose(got[4], ref[4], atol=1e-3)


def test_canonical_values(model, snapshot, converted):
    """GLU halves, kernel-1 convs as linears, and the metadata, by the documented formulas."""
    snap, _, _ = snapshot
    t, prov = load_canonical(converted)
    sd = model.state_dict()
    pre = "encoder.layers.5.conv_module."
    w1 = sd[pre + "pointwise_conv1.weight"]  # [2H, H, 1]
    value, gate = t[pre + "pointwise_conv1.value.weight"], t[pre + "pointwise_conv1.gate.weight"]
    assert torch.equal(value, w1[:H, :, 0]) and torch.equal(gate, w1[H:, :, 0])
    # the role text: glu = value(x) * sigmoid(gate(x)) equals upstream's conv + nn.GLU(dim=1)
    x = torch.randn(3, 7, H)
    conv = model.encoder.layers[5].conv_module
    with torch.no_grad():
        want = conv.glu(conv.pointwise_conv1(x.transpose(1, 2))).transpose(1, 2)
    torch.testing.assert_close(torch.nn.functional.linear(x, value) * torch.sigmoid(torch.nn.functional.linear(x, gate)), want)
    assert torch.equal(t[pre + "pointwise_conv2.weight"], sd[pre + "pointwise_conv2.weight"][:, :, 0])
    assert prov[pre + "pointwise_conv1.gate.weight"] == {"from": [pre + "pointwise_conv1.weight"], "op": "split(dim=0,index=1,parts=2)|squeeze(dim=2)"}
    assert torch.equal(t["encoder.layers.2.self_attn.distance_embedding.weight"], sd["encoder.layers.2.self_attn.distance_embedding.weight"])
    md = metadata(converted)
    assert json.loads(md["dropped"]) == {"masked_spec_embed": engine.model_module("w2v-bert").DROPS[0].reason}
    cfg, src_cfg = json.loads(md["config"]), json.load(open(os.path.join(snap, "config.json")))
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "feature_projection_input_dim",
              "left_max_position_embeddings", "right_max_position_embeddings", "conv_depthwise_kernel_size", "layer_norm_eps"):
        assert cfg[k] == src_cfg[k], k
    assert cfg["hidden_act"] == "silu" and src_cfg["hidden_act"] == "swish"
    assert cfg["conv_depthwise_left_padding"] == src_cfg["conv_depthwise_kernel_size"] - 1
    info = json.loads(md["source"])
    blob = os.path.realpath(os.path.join(snap, "model.safetensors"))
    assert info["file"] == "model.safetensors" and info["sha256"] == os.path.basename(blob)  # HF blobs are named by sha256


def test_stats_found_in_release_layout(tmp_path):
    """release/w2v-bert-2.0/ + release/wav2vec2bert_stats.pt: no --stats needed; SRC may
    be the model file; a model without masked_spec_embed loads strictly."""
    cfg = {**up.TINY, "mask_time_prob": 0.0}
    m = up.build(cfg, seed=4)
    assert not hasattr(m, "masked_spec_embed")
    rel = tmp_path / "checkpoints"
    up.save_plain(m, str(rel / "w2v-bert-2.0"))
    st = up.stats(H, seed=9)
    stats_path = up.write_stats(str(rel / "wav2vec2bert_stats.pt"), st)
    out = tmp_path / "o.safetensors"
    run_cli("w2v-bert", rel / "w2v-bert-2.0" / "model.safetensors", out, "--quiet")
    md = metadata(out)
    assert json.loads(md["dropped"]) == {}
    extra = json.loads(md["source"])["extra"]["stats/"]
    assert extra["sha256"] == hashlib.sha256(open(stats_path, "rb").read()).hexdigest()
    fresh, _ = _load_back(out, cfg, seed=8)
    x, mask = up.features(lengths=(9, 9))
    for a, b in zip(up.hidden_states(fresh, x, mask), up.hidden_states(m, x, mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    t, _ = load_canonical(out)
    assert_std_of(t["semantic_stats.std"], st["var"])


def test_all_passes_release_stats(snapshot, tmp_path):
    """`convert.py all` gives the converter <release>/wav2vec2bert_stats.pt, via
    registry.EXTRA_FILES; a stats file beside the model does not override it."""
    snap, _, _ = snapshot
    rel = tmp_path / "release"
    rel.mkdir()
    st = up.stats(H, seed=21)
    up.write_stats(str(rel / "wav2vec2bert_stats.pt"), st)
    extra = {name: os.path.join(rel, f) for name, (_, f) in registry.EXTRA_FILES["w2v-bert"].items()}
    assert extra == {"stats": str(rel / "wav2vec2bert_stats.pt")}
    out = tmp_path / "w2v_bert.safetensors"
    engine.convert("w2v-bert", snap, str(out), quiet=True, extra=extra)
    t, _ = load_canonical(out)
    assert torch.equal(t["semantic_stats.mean"], st["mean"])
    missing = {"stats": str(tmp_path / "nowhere" / "wav2vec2bert_stats.pt")}
    with pytest.raises(ConvertError, match="feature statistics file not found"):
        engine.convert("w2v-bert", snap, str(tmp_path / "x.safetensors"), quiet=True, extra=missing)


def test_stats_as_safetensors_dump(snapshot, tmp_path):
    snap, _, _ = snapshot
    st = up.stats(H, seed=3)
    p = up.write_stats(str(tmp_path / "wav2vec2bert_stats.safetensors"), st)
    out = tmp_path / "o.safetensors"
    run_cli("w2v-bert", snap, out, "--stats", p, "--quiet")
    t, _ = load_canonical(out)
    assert_std_of(t["semantic_stats.std"], st["var"])


def test_missing_stats_refused(snapshot, tmp_path):
    snap, _, _ = snapshot
    out = tmp_path / "o.safetensors"
    assert_refused(run_cli("w2v-bert", snap, out, expect=None), "wav2vec2bert_stats.pt", "--stats")
    assert not out.exists()
    assert_refused(run_cli("w2v-bert", snap, out, "--stats", tmp_path, expect=None), "is a folder")


@pytest.mark.parametrize("bad", ["short", "extra_key", "no_var", "negative_var"])
def test_bad_stats_refused(snapshot, tmp_path, bad):
    snap, _, _ = snapshot
    st = up.stats(H)
    if bad == "short":
        st = {k: v[:-1] for k, v in st.items()}
    elif bad == "extra_key":
        st["count"] = torch.tensor([3.0])
    elif bad == "no_var":
        del st["var"]
    else:
        st["var"][2] = -1.0
    p = up.write_stats(str(tmp_path / "s.pt"), st)
    out = tmp_path / "o.safetensors"
    need = {"short": "semantic_stats.mean", "extra_key": "stats/count", "no_var": "stats/var", "negative_var": "NaN"}[bad]
    assert_refused(run_cli("w2v-bert", snap, out, "--stats", p, expect=None), need)
    assert not out.exists()


@pytest.mark.parametrize("change,needle", [
    ({"position_embeddings_type": "rotary"}, "position_embeddings_type"),
    ({"num_hidden_layers": 16}, "hidden_states[17]"),
    ({"add_adapter": True}, "add_adapter"),
    ({"hidden_act": "tanh"}, "hidden_act"),
])
def test_unsupported_config_refused(snapshot, tmp_path, change, needle):
    snap, stats_path, _ = snapshot
    cfg = json.load(open(os.path.join(snap, "config.json")))
    cfg.update(change)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    p = run_cli("w2v-bert", snap, tmp_path / "o.safetensors", "--stats", stats_path, "--config", tmp_path / "c.json", expect=None)
    assert_refused(p, needle)


def test_dtype_option(snapshot, tmp_path):
    snap, stats_path, st = snapshot
    out = tmp_path / "h.safetensors"
    run_cli("w2v-bert", snap, out, "--stats", stats_path, "--dtype", "bfloat16", "--quiet")
    t, _ = load_canonical(out)
    assert {x.dtype for x in t.values()} == {torch.bfloat16, torch.float32}
    # the statistics and layer norms stay float32 under --dtype bfloat16 (the dtype policy)
    assert_std_of(t["semantic_stats.std"], st["var"])
    assert t["encoder.layers.0.final_layer_norm.weight"].dtype == torch.float32
    assert t["encoder.layers.0.ffn1.intermediate_dense.weight"].dtype == torch.bfloat16
    assert_dtype_policy(out, "BF16")


# w2v-bert-2.0's config.json (the values that shape the weights)
FULL_SIZE = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
    "feature_projection_input_dim": 160, "position_embeddings_type": "relative_key",
    "left_max_position_embeddings": 64, "right_max_position_embeddings": 8, "conv_depthwise_kernel_size": 31,
    "hidden_act": "swish", "layer_norm_eps": 1e-5, "mask_time_prob": 0.05, "add_adapter": False,
}


def test_full_size_plan_fits_schema():
    """At w2v-bert-2.0's size (773 upstream tensors, shapes from the real class on the
    meta device, no data) the plan accounts for every tensor and passes the schema."""
    from transformers import Wav2Vec2BertModel

    with torch.device("meta"):
        m = Wav2Vec2BertModel(up.hf_config(FULL_SIZE))
    sd = m.state_dict()
    assert len(sd) == 773
    main = Source("model.safetensors", "safetensors", {k: tuple(v.shape) for k, v in sd.items()}, {k: st_dtype(v.dtype) for k, v in sd.items()})
    stats = Source("wav2vec2bert_stats.pt", "pth-zip", {"mean": (1024,), "var": (1024,)}, {"mean": "F32", "var": "F32"})
    mod = engine.model_module("w2v-bert")
    cfg = mod.runtime_config(dict(FULL_SIZE), "config.json")
    rows, loops = mod.table(cfg)
    plan = resolve(CombinedSource(main, {"stats/": stats}), rows, loops, mod.DROPS, cfg, None)
    assert len(plan.entries) == 772 - 24 + 24 * 2 + 2  # pointwise_conv1 -> 2 per layer; + mean, std
    assert list(plan.dropped) == ["masked_spec_embed"]
    meta = {"schema": schema.SCHEMA_NAME, "schema_version": str(schema.schema_version()), "model": "w2v-bert",
            "config": json.dumps(cfg), "source": "{}", "converter_version": "x", "provenance": json.dumps(plan.provenance()),
            "dropped": "{}", "dtype": "F32"}
    tensors = {e.name: ("F32", e.shape) for e in plan.entries}
    assert schema.check("w2v-bert", tensors, meta, "full") == []
    shapes = dict((e.name, e.shape) for e in plan.entries)
    assert shapes["encoder.layers.23.self_attn.distance_embedding.weight"] == (73, 64)
    assert shapes["encoder.layers.0.conv_module.pointwise_conv1.gate.weight"] == (1024, 1024)
