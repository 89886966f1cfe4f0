"""`--profile indextts2` for w2v-bert: only the layers IndexTTS-2 runs, with its feature
statistics folded into the last layer norm.  Oracle: transformers' Wav2Vec2BertModel."""

from __future__ import annotations

import json

import pytest
import torch

from converters.format import schema
from tests.helpers import back_to_upstream, load_canonical, manifest, metadata, run_cli
from tests.upstream import w2v_bert as up

H = up.TINY["hidden_size"]
K = 17  # IndexTTS-2 reads hidden_states[17]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    m = up.build()
    folder = up.save_plain(m, str(d / "w2v-bert-2.0"))
    st = up.stats(H)
    st["var"] = st["var"] + 0.5  # well away from zero, far from 1
    stats_path = up.write_stats(str(d / "wav2vec2bert_stats.pt"), st)
    out = d / "w2v_bert.safetensors"
    run_cli("w2v-bert", folder, out, "--stats", stats_path, "--profile", "indextts2", "--quiet")
    return m, st, out


def _profile_model(out):
    """A fresh 17-layer Wav2Vec2BertModel loaded (strictly, but for the training-only
    mask vector) with the profile's tensors mapped back through provenance."""
    cfg = dict(up.TINY, num_hidden_layers=K)
    fresh = up.build(cfg, seed=99)
    res = fresh.load_state_dict(back_to_upstream(str(out)), strict=False)
    assert res.missing_keys == ["masked_spec_embed"] and not res.unexpected_keys
    return fresh.eval()


def test_profile_equals_normalised_hidden_state_17(case):
    m, st, out = case
    x, mask = up.features()
    full = up.hidden_states(m, x, mask)[K]
    want = (full - st["mean"]) / torch.sqrt(st["var"])  # IndexTTS-2's get_emb
    got = up.hidden_states(_profile_model(out), x, mask)[-1]
    valid = mask.bool()
    assert want[valid].abs().max() > 0.5  # non-trivial features
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_profile_is_sensitive_to_the_fold(case):
    """Without the fold (plain layer norm), the output is not the normalised feature."""
    m, st, out = case
    x, mask = up.features()
    fresh = _profile_model(out)
    ln = fresh.encoder.layers[K - 1].final_layer_norm
    with torch.no_grad():
        ln.weight.copy_(m.encoder.layers[K - 1].final_layer_norm.weight)
        ln.bias.copy_(m.encoder.layers[K - 1].final_layer_norm.bias)
    want = (up.hidden_states(m, x, mask)[K] - st["mean"]) / torch.sqrt(st["var"])
    assert not torch.allclose(up.hidden_states(fresh, x, mask)[-1], want, atol=1e-3)


def test_profile_file(case):
    m, st, out = case
    t, prov = load_canonical(out)
    md = metadata(out)
    cfg = json.loads(md["config"])
    assert cfg["profile"] == "indextts2" and cfg["num_hidden_layers"] == K
    assert cfg["source_num_hidden_layers"] == up.TINY["num_hidden_layers"]
    assert not any(n.startswith("semantic_stats.") for n in t)
    assert not any(n.startswith(f"encoder.layers.{K}.") for n in t)
    ln = f"encoder.layers.{K - 1}.final_layer_norm"
    sd = m.state_dict()
    torch.testing.assert_close(t[f"{ln}.weight"], sd[f"{ln}.weight"] / torch.sqrt(st["var"]))
    torch.testing.assert_close(t[f"{ln}.bias"], (sd[f"{ln}.bias"] - st["mean"]) / torch.sqrt(st["var"]))
    assert prov[f"{ln}.bias"] == {"from": [f"{ln}.bias", "stats/mean", "stats/var"], "op": "normalize_shift"}
    dropped = json.loads(md["dropped"])
    assert f"encoder.layers.{K}.ffn1.output_dense.weight" in dropped
    assert schema.check_file(str(out))[1] == []
    run_cli("verify", out.parent / "w2v-bert-2.0", out, "--stats", out.parent / "wav2vec2bert_stats.pt", "--failures-only")


def test_all_with_profile(tmp_path):
    import os
    import shutil

    from tests.helpers import ROOT

    rel = tmp_path / "release"
    shutil.copytree(os.path.join(ROOT, "demo", "release"), rel)
    out = tmp_path / "out"
    run_cli("all", "--src", rel, "--out", out, "--profile", "indextts2", "--quiet")
    m = manifest(out)
    assert m["files"]["w2v_bert.safetensors"]["options"]["profile"] == "indextts2"
    assert "profile" not in m["files"]["gpt.safetensors"]["options"]
    assert json.loads(metadata(out / "w2v_bert.safetensors")["config"])["profile"] == "indextts2"
    p = run_cli("all", "--src", rel, "--out", out, "--quiet")  # back to the full profile: only w2v-bert is redone
    assert p.stdout.count("up to date") == len(m["files"]) + len(m["bundle"]) - 1  # (bundle: the copied tokenizer, classifier)
    run_cli("check", out)
