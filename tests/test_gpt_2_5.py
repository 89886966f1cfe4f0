"""IndexTTS-2.5 GPT (issue 14): conversion (``converters/models/gpt_v2_5.py``, schema ``gpt@2.5``)
and the reference runtime's 2.5 entry points against the upstream class.

Oracle: ``indextts25-inference`` 0.2.0's ``UnifiedVoice`` (IndexTTS-2.5's model code, less
``text_head``), loaded from the saved ``gpt.pth`` by its own ``load_checkpoint``
(``converters.cli.forward.gpt_2_5_model``); the teacher-forced pass is its
``prepare_gpt_inputs`` and the ``GPT2InferenceModel`` forward that ``generate`` runs.
The layout (456 tensors, 814.85M parameters at the released config) is checked against
upstream's ``model_v2_5.py`` / ``model_v2.py(spk_cond_mode="campplus")``: the package's
module plus ``text_head``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from converters.cli import forward
from converters.models import gpt_v2_5 as conv
from converters.format.schema import check_file
from reference import gpt as ref
from tests.helpers import ROOT, back_to_upstream, convert_in_process, metadata, reference_load, run_cli, swap_rows
from bench.inputs import released
from tests.upstream import gpt25 as up

DEMO = os.path.join(ROOT, "demo", "release-2.5")
ENTRY = {e.name: e for e in ref.ENTRIES_2_5}
# The released 2.5 gpt: section (IndexTTS-2.0's with 60,509 text tokens; 2.5 ignores condition_module).
RELEASED = released("indextts2_5")["gpt"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt25")
    m = up.build()
    src = up.save_release(m, str(d / "release"))
    out = convert_in_process("gpt", src, d / "gpt.safetensors")
    torch.manual_seed(99)  # another init: every value must come from the file
    return reference_load(out), forward.gpt_2_5_model(src, up.TINY), src, out, m


def inputs(w, name: str, seed: int = 0) -> dict:
    return ENTRY[name].inputs(w.config, torch.Generator().manual_seed(seed))


def compare(w, m, name: str, x: dict) -> float:
    got = ENTRY[name].run(w, None, **x)
    want = forward.gpt_2_5_run(m, name, x)
    worst = 0.0
    for k in ENTRY[name].outputs:
        assert want[k].abs().max() > 1e-2, f"{name}/{k}: near-zero signal"
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=lambda s, k=k: f"{name}/{k}: {s}")
        worst = max(worst, float((got[k] - want[k]).abs().max()))
    return worst


# ------------------------------------------------------------------ layout and conversion


def test_release_layout_at_the_released_config():
    """456 tensors, 814.85M parameters: upstream's layout (the package's module plus text_head)."""
    mv = up.module()
    with torch.device("meta"):
        m = mv.UnifiedVoice(**RELEASED)
    sd = m.state_dict()
    rows = RELEASED["number_text_tokens"] + 1
    n = len(sd) + 2
    params = sum(v.numel() for v in sd.values()) + rows * RELEASED["model_dim"] + rows
    assert n == 456 and round(params / 1e6, 2) == 814.85
    assert tuple(sd["spk_emb_proj.weight"].shape) == (1280, 192) and tuple(sd["lang_embedding.weight"].shape) == (107, 1280)
    assert not any(k.startswith(("conditioning_encoder.", "perceiver_encoder.", "speed_emb.")) for k in sd)
    cfg = conv.runtime_config(RELEASED, "config.yaml")
    assert cfg["language_vocab_size"] == 107 and cfg["languages"][:2] == ["en", "zh"]
    assert cfg["languages"] == list(up.module().LANGUAGE_DICT)


def test_conversion_round_trip_and_metadata(tiny):
    """Every canonical tensor maps back through its provenance to the release's tensor;
    text_head is the only tensor left out, with its reason; the file is 2.5's."""
    _, _, src, out, m = tiny
    md = metadata(str(out))
    assert (md["family"], md["family_version"], md["model"]) == ("indextts", "2.5", "gpt")
    assert check_file(str(out))[1] == []
    back = back_to_upstream(str(out))
    sd = up.release_state_dict(m)
    assert set(back) == set(sd) - {"text_head.weight", "text_head.bias"}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    dropped = json.loads(md["dropped"])
    assert set(dropped) == {"text_head.weight", "text_head.bias"} and "mel_head" in dropped["text_head.weight"]


def test_stored_pe_is_kept_not_regenerated(tiny):
    """The emotion Conformer's pe is stored as the sinusoid rounded through bfloat16 and
    upstream runs with the stored values: the canonical file carries them, not a fresh table."""
    w, _, _, out, m = tiny
    stored = m.emo_conditioning_encoder.embed.pos_enc.pe[0]
    fresh = conv.sinusoid_table(*stored.shape)
    assert not torch.equal(stored, fresh)
    name = "emo_conditioning_encoder.embed.pos_enc.pe"
    assert torch.equal(w[name], stored)
    assert json.loads(metadata(str(out))["provenance"])[name] == {"from": [name], "op": "squeeze(dim=0)"}


def test_other_source_forms_convert_the_same(tiny, tmp_path):
    """{"model": ...} and a naive safetensors dump give the same tensors as the plain state dict."""
    _, _, src, out, m = tiny
    from safetensors.torch import load_file

    want = load_file(str(out))
    for fmt in ("wrapped", "safetensors"):
        s = up.save_release(m, str(tmp_path / fmt), fmt=fmt)
        got = load_file(str(convert_in_process("gpt", s, tmp_path / f"{fmt}.safetensors")))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), fmt


def test_a_2_0_file_never_passes_as_2_5_or_back(tiny, tmp_path):
    from tests.helpers import rewrite
    from tests.upstream import gpt as up20

    _, _, _, out, _ = tiny
    md = metadata(str(out))
    bad = rewrite(str(out), str(tmp_path / "as20.safetensors"), meta={**md, "family_version": "2.0"})
    errs = check_file(bad)[1]
    assert errs and "are an IndexTTS-2.5 gpt's, but its metadata says family_version 2.0" in errs[0]
    src20 = up20.save_release(up20.build(), str(tmp_path / "r20"))
    out20 = convert_in_process("gpt", src20, tmp_path / "gpt20.safetensors")
    md20 = metadata(str(out20))
    assert md20["family_version"] == "2.0"
    bad = rewrite(str(out20), str(tmp_path / "as25.safetensors"), meta={**md20, "family_version": "2.5"})
    errs = check_file(bad)[1]
    assert errs and "are an IndexTTS-2.0 gpt's, but its metadata says family_version 2.5" in errs[0]


def test_1x_gpt_is_unsupported(tmp_path):
    """IndexTTS 1.x's UnifiedVoice (a speaker conditioning encoder, no emotion encoder)."""
    d = tmp_path / "r"
    d.mkdir()
    torch.save({"gpt.h.0.ln_1.weight": torch.ones(4), "conditioning_encoder.init.weight": torch.ones(2),
                "mel_embedding.weight": torch.ones(2, 4), "text_embedding.weight": torch.ones(2, 4)}, d / "gpt.pth")
    up.write_config(str(d))
    p = run_cli("gpt", d / "gpt.pth", tmp_path / "o.safetensors", expect=None)
    assert p.returncode == 1 and "IndexTTS 1.x GPT" in p.stderr and "unsupported" in p.stderr
    p = run_cli("inspect", d / "gpt.pth", expect=None)
    assert p.returncode == 1 and "unsupported" in p.stderr


# ------------------------------------------------------------------ reference against upstream


@pytest.mark.parametrize("name", list(ENTRY))
def test_matches_upstream(tiny, name):
    w, m = tiny[:2]
    for seed in range(2):
        compare(w, m, name, inputs(w, name, seed))


def test_padding_and_single_items(tiny):
    """One item alone, and a heavily padded one (left-padded prompt), agree with upstream."""
    w, m = tiny[:2]
    x = inputs(w, "forward_latents", 3)
    compare(w, m, "forward_latents", {k: v[:1] for k, v in x.items()})
    x["text_lengths"], x["code_lengths"] = torch.tensor([1, 6]), torch.tensor([1, 2])
    compare(w, m, "forward_latents", x)


def test_language_embedding_is_used(tiny):
    w = tiny[0]
    x = inputs(w, "forward_latents")
    a = ref.forward_latents_2_5(w, **x)[1]
    x["lang"] = (x["lang"] + 1) % len(w.config["languages"])
    b = ref.forward_latents_2_5(w, **x)[1]
    assert (a - b).abs().max() > 1e-3


def test_demo_release_matches_upstream(tmp_path):
    """The committed 2.5 demo release (float16 gpt.pth) through `verify --forward`."""
    out = convert_in_process("gpt", DEMO, tmp_path / "gpt.safetensors")
    p = run_cli("verify", DEMO, out, "--forward")
    assert "forward-verified" in p.stdout and p.stdout.count("ok  forward") + p.stdout.count("ok forward") == 5


SWAPS = [
    ("forward_latents", [("gpt.h.{i}.attn.q.weight", "gpt.h.{i}.attn.k.weight"),
                         ("gpt.h.{i}.attn.q.bias", "gpt.h.{i}.attn.k.bias")]),
    ("forward_latents", [("gpt.h.{i}.attn.v.weight", "gpt.h.{i}.attn.out.weight")]),
    ("emovec", [("emo_conditioning_encoder.encoders.{eb}.conv_module.pointwise_conv1.value.weight",
                 "emo_conditioning_encoder.encoders.{eb}.conv_module.pointwise_conv1.gate.weight"),
                ("emo_conditioning_encoder.encoders.{eb}.conv_module.pointwise_conv1.value.bias",
                 "emo_conditioning_encoder.encoders.{eb}.conv_module.pointwise_conv1.gate.bias")]),
    ("emovec", [("emo_perceiver_encoder.layers.{el}.attn.to_k.weight", "emo_perceiver_encoder.layers.{el}.attn.to_v.weight")]),
    ("emovec", [("emo_perceiver_encoder.layers.{el}.ff.value.weight", "emo_perceiver_encoder.layers.{el}.ff.gate.weight"),
                ("emo_perceiver_encoder.layers.{el}.ff.value.bias", "emo_perceiver_encoder.layers.{el}.ff.gate.bias")]),
    ("merge_emovec", [("emovec_layer.bias", "emo_layer.bias")]),
]


@pytest.mark.parametrize("name,pairs", SWAPS, ids=["q/k", "v/out", "glu", "to_k/to_v", "geglu", "emo biases"])
def test_swapped_rows_are_caught(tiny, tmp_path, monkeypatch, name, pairs):
    """A 2.5 table that exchanged two same-shaped parts writes a file that passes the
    schema check and the inverse round trip; the comparison with upstream fails."""
    w, m, src = tiny[:3]
    x = inputs(w, name)
    swap_rows(monkeypatch, "gpt", *pairs, family_version="2.5")
    bad = convert_in_process("gpt", src, tmp_path / "bad.safetensors")
    assert check_file(str(bad))[1] == []
    got = ENTRY[name].run(reference_load(bad), None, **x)
    want = forward.gpt_2_5_run(m, name, x)
    assert max(float((got[k] - want[k]).abs().max()) for k in ENTRY[name].outputs) > 1e-3


def test_untransposed_conv1d_is_caught(tiny, tmp_path, monkeypatch):
    """GPT-2's Conv1D weights are [in, out]: a table that forgot the transpose of the
    square q/k/v slices still passes the schema check, and the comparison fails."""
    import dataclasses

    w, m, src = tiny[:3]
    x = inputs(w, "forward_latents")
    original = conv.table

    def table(cfg):
        rows, loops = original(cfg)
        return [dataclasses.replace(r, op=r.op.replace("|transpose", "")) if ".attn.q.weight" in r.canonical else r
                for r in rows], loops

    monkeypatch.setattr(conv, "table", table)
    bad = convert_in_process("gpt", src, tmp_path / "bad.safetensors")
    assert check_file(str(bad))[1] == []
    got = ENTRY["forward_latents"].run(reference_load(bad), None, **x)
    want = forward.gpt_2_5_run(m, "forward_latents", x)
    assert float((got["mel_logits"] - want["mel_logits"]).abs().max()) > 1e-3


def test_inputs_valid_at_full_size():
    cfg = conv.runtime_config(RELEASED, "config.yaml")
    g = torch.Generator().manual_seed(0)
    for e in ref.ENTRIES_2_5:
        x = e.inputs(cfg, g)
        assert sum(v.numel() for v in x.values()) < 200_000, e.name
    x = ENTRY["forward_latents"].inputs(cfg, g)
    assert x["cond_latents"].shape[1:] == (1, cfg["model_dim"])
    assert x["text"].shape[1] + 2 <= cfg["text_positions"] and x["codes"].shape[1] + 2 <= cfg["mel_positions"]
    assert int(x["text"].max()) < cfg["number_text_tokens"] and int(x["text"].min()) > 1
    assert int(x["lang"].max()) < cfg["language_vocab_size"]
    assert ENTRY["conditioning"].inputs(cfg, g)["style"].shape == (2, 192)


def test_wrong_release_gpt_refused_by_all(tmp_path):
    """A 2.0 gpt.pth in a 2.5 release: its tensors say 2.0, the release's files 2.5."""
    import shutil

    d = tmp_path / "r"
    shutil.copytree(DEMO, d)
    shutil.copy(os.path.join(ROOT, "demo", "release", "gpt.pth"), d / "gpt.pth")
    p = run_cli("all", "--src", d, "--out", tmp_path / "out", "--quiet", expect=None)
    assert p.returncode == 1 and "is an IndexTTS-2.0 gpt checkpoint" in p.stderr and "the release is IndexTTS-2.5" in p.stderr
