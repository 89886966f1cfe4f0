"""Reference runtime, w2v-bert: ``reference.w2v_bert`` on the canonical file (profiles
``full`` and ``indextts2``) against transformers' Wav2Vec2BertModel and IndexTTS-2's
``get_emb``, with the model and statistics loaded by upstream's
``build_semantic_model`` from the saved source files."""

from __future__ import annotations

import os
import types

import pytest
import torch

from converters.cli import forward
from converters.format.schema import check_file
from reference import w2v_bert as ref
from tests.helpers import ROOT, convert_in_process, reference_load, swap_rows
from tests.upstream import w2v_bert as up

K = 17  # IndexTTS-2 reads hidden_states[17]


def upstream_get_emb():
    """``IndexTTS2.get_emb`` compiled from upstream's infer_v2.py source (importing the
    module would pull in the whole inference stack: librosa, torchaudio, ...)."""
    return forward.upstream_get_emb()


def upstream_model(model_dir, stats_path):
    """``maskgct_utils.build_semantic_model(stats_path)`` with its hard-coded hub name
    ("facebook/w2v-bert-2.0") pointed at the saved folder: from_pretrained, eval, and
    mean / sqrt(var) from the .pt file.  Returns an object get_emb can run on
    (``converters.cli.forward.w2v_bert_model``, what ``verify --forward`` runs)."""
    return forward.w2v_bert_model(str(model_dir), str(stats_path))


def upstream_hidden_states(tts, x, mask):
    return forward.w2v_bert_hidden_states(tts, x, mask)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 18-layer model in the release layout, its upstream load, and both profiles."""
    d = tmp_path_factory.mktemp("w2v")
    folder = up.save_plain(up.build(), str(d / "w2v-bert-2.0"))
    st = up.stats(up.TINY["hidden_size"])
    st["var"] = st["var"] + 0.5  # far from 1, away from 0
    stats = up.write_stats(str(d / "wav2vec2bert_stats.pt"), st)
    full = convert_in_process("w2v-bert", folder, d / "full.safetensors", extra={"stats": stats})
    prof = convert_in_process("w2v-bert", folder, d / "indextts2.safetensors", extra={"stats": stats},
                              options={"profile": "indextts2"})
    tts = upstream_model(folder, stats)
    x, mask = _features()
    return types.SimpleNamespace(folder=folder, stats=stats, full=full, prof=prof, tts=tts, x=x, mask=mask,
                                 hidden_states=upstream_hidden_states(tts, x, mask),
                                 get_emb=upstream_get_emb()(tts, x, mask))


def _features():
    """Lengths 11 and 7 against the tiny window (left 5, right 3): both items reach the
    clamp on both sides."""
    x, mask = up.features(lengths=(11, 7))
    assert mask.sum(1).min() > up.TINY["left_max_position_embeddings"] + 1
    return x, mask


def test_hidden_states_match_upstream(tiny):
    x, mask, want = tiny.x, tiny.mask, tiny.hidden_states
    w = reference_load(tiny.full)
    assert w.config["profile"] == "full"
    got = ref.hidden_states(w, x, mask)
    assert got.shape == (up.TINY["num_hidden_layers"] + 1, *x.shape[:2], up.TINY["hidden_size"])
    for k in range(len(want)):
        assert want[k].abs().max() > 0.5, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=lambda m: f"hidden_states[{k}]: {m}")
    # padding matters: the short item alone (no padding) gives the same real frames
    n = int(mask[1].sum())
    alone = ref.hidden_states(w, x[1:, :n], mask[1:, :n])
    torch.testing.assert_close(alone[:, 0], got[:, 1, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("profile", ["full", "indextts2"])
def test_semantic_features_match_get_emb(tiny, profile):
    x, mask, want = tiny.x, tiny.mask, tiny.get_emb
    w = reference_load(tiny.full if profile == "full" else tiny.prof)
    assert w.config["profile"] == profile
    assert ("semantic_stats.mean" in w) == (profile == "full")
    got = ref.semantic_features(w, x, mask)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_indextts2_profile_hidden_states(tiny):
    """The profile's hidden states: upstream's first 17, then the normalised feature."""
    x, mask, want = tiny.x, tiny.mask, tiny.hidden_states
    w = reference_load(tiny.prof)
    got = ref.hidden_states(w, x, mask)
    assert got.shape[0] == K + 1
    torch.testing.assert_close(got[:K], want[:K], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[K], (want[K] - tiny.tts.semantic_mean) / tiny.tts.semantic_std, rtol=0, atol=1e-5)


def test_demo_release_matches_upstream(tmp_path):
    """The committed demo (w2v-bert-2.0's real window 64/8, kernel 31, 24 layers, input
    160), on the entry's own inputs (long enough to reach the clamp on both sides)."""
    rel = os.path.join(ROOT, "demo", "release")
    folder, stats = os.path.join(rel, "w2v-bert-2.0"), os.path.join(rel, "wav2vec2bert_stats.pt")
    tts = upstream_model(folder, stats)
    out = convert_in_process("w2v-bert", folder, tmp_path / "w2v_bert.safetensors", extra={"stats": stats})
    w = reference_load(out)
    inp = ref.ENTRIES[0].inputs(w.config, torch.Generator().manual_seed(0))
    x, mask = inp["input_features"], inp["attention_mask"]
    assert int(mask.sum(1).min()) > w.config["left_max_position_embeddings"] + 1 and int(mask.sum(1).min()) < x.shape[1]
    want = upstream_hidden_states(tts, x, mask)
    torch.testing.assert_close(ref.hidden_states(w, x, mask), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.semantic_features(w, x, mask), upstream_get_emb()(tts, x, mask), rtol=0, atol=1e-5)


L = "encoder.layers.{i}"
PAIRS = {
    "glu value/gate": [(f"{L}.conv_module.pointwise_conv1.value.weight", f"{L}.conv_module.pointwise_conv1.gate.weight")],
    "attention q/k": [(f"{L}.self_attn.linear_q.weight", f"{L}.self_attn.linear_k.weight"),
                      (f"{L}.self_attn.linear_q.bias", f"{L}.self_attn.linear_k.bias")],
}


@pytest.mark.parametrize("pairs", list(PAIRS.values()), ids=list(PAIRS))
def test_swapped_rows_are_caught(tiny, tmp_path, monkeypatch, pairs):
    swap_rows(monkeypatch, "w2v-bert", *pairs)
    out = convert_in_process("w2v-bert", tiny.folder, tmp_path / "w2v_bert.safetensors", extra={"stats": tiny.stats})
    assert check_file(str(out))[1] == []  # well formed; only the forward can tell
    acts = {}
    got = ref.semantic_features(reference_load(out), tiny.x, tiny.mask, acts)
    assert max_diff(acts["encoder.0"], tiny.hidden_states[1]) > 1e-3  # wrong from the first layer on
    assert max_diff(got, tiny.get_emb) > 1e-3


@pytest.mark.parametrize("profile", ["full", "indextts2"])
def test_entries_run_on_their_own_inputs(tiny, profile):
    w = reference_load(tiny.full if profile == "full" else tiny.prof)
    layers = w.config["num_hidden_layers"]
    assert [e.name for e in ref.ENTRIES] == ["hidden_states", "semantic_features"]
    for e in ref.ENTRIES:
        inp = e.inputs(w.config, torch.Generator().manual_seed(0))
        assert list(inp) == list(e.args) and inp["attention_mask"].dtype == torch.int64
        b, t, _ = inp["input_features"].shape
        acts = {}
        out = e.run(w, acts, **inp)
        assert list(out) == list(e.outputs)
        h = w.config["hidden_size"]
        if e.name == "hidden_states":
            assert out["hidden_states"].shape == (layers + 1, b, t, h)
            assert {f"encoder.{i}" for i in range(layers)} | {"feature_projection"} <= set(acts)
        else:
            assert out["semantic_features"].shape == (b, t, h)
            assert {f"encoder.{i}" for i in range(K)} <= set(acts) and f"encoder.{K}" not in acts
