"""The complete runtime bundle (issue 13): the pipeline contract in the manifest and the
schema, the tokenizer and emotion classifier copied in, the cross-file rules in
``check`` and before ``all`` converts, the vocoder taken from config.yaml and checked,
and every missing source named in one error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from converters.release import pipeline
from converters.format import schema
from tests.helpers import ROOT, assert_refused, copy_release, manifest, metadata, rewrite, run_cli

DEMO = os.path.join(ROOT, "demo", "release")


@pytest.fixture
def bundle(demo_bundle):
    return demo_bundle  # read only (conftest)


@pytest.fixture
def release(tmp_path):
    return copy_release(DEMO, tmp_path)


def _edit_config(release, edit) -> None:
    doc = yaml.safe_load((release / "config.yaml").read_text())
    edit(doc)
    (release / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


# ------------------------------------------------------------------ pipeline contract


def test_manifest_pipeline_is_documented_by_the_schema(bundle):
    m = manifest(bundle)
    doc = schema.load_schema()["pipeline"]
    documented = {k.split(".")[0] for k in doc["keys"]}
    assert set(m["pipeline"]) == documented
    assert set(m["pipeline"]["front_ends"]) == {k.split(".")[1] for k in doc["keys"] if k.startswith("front_ends.")}
    assert doc["cross_file_rules"] == pipeline.RULES


def test_pipeline_values_come_from_the_files_and_the_release(bundle):
    p = manifest(bundle)["pipeline"]
    s2 = json.loads(metadata(str(bundle / "s2mel.safetensors"))["config"])
    gpt = json.loads(metadata(str(bundle / "gpt.safetensors"))["config"])
    mel = p["front_ends"]["s2mel_mel"]
    assert (mel["n_fft"], mel["hop_length"], mel["n_mels"], mel["sampling_rate"]) == (s2["n_fft"], s2["hop_length"], s2["n_mels"], 22050)
    w2v = p["front_ends"]["w2v_bert_features"]
    with open(os.path.join(DEMO, "w2v-bert-2.0", "preprocessor_config.json")) as f:
        pre = json.load(f)
    assert w2v["padding_value"] == pre["padding_value"] and w2v["stride"] == pre["stride"] and "preprocessor_config.json" in w2v["source"]
    assert p["sample_rates"] == {"semantic_features_hz": 16000, "speaker_fbank_hz": 16000, "mel_hz": 22050, "output_hz": 22050}
    assert p["tokens"]["stop_mel_token"] == gpt["stop_mel_token"] and p["tokens"]["codebook_size"] == 16
    steps = [f["step"] for f in p["flow"]]
    assert steps[0] == "semantic_features" and steps[-1] == "waveform"
    assert {f["file"] for f in p["flow"] if f["file"]} == {n for n in os.listdir(bundle) if n.endswith(".safetensors")} - {
        "speaker_matrix.safetensors", "emotion_matrix.safetensors"}
    assert p["inference"]["mel_frames_per_code"] == 1.72


def test_preprocessor_config_absent_is_said(release, tmp_path):
    os.unlink(release / "w2v-bert-2.0" / "preprocessor_config.json")
    out = tmp_path / "out"
    run_cli("all", "--src", release, "--out", out, "--quiet")
    src = manifest(out)["pipeline"]["front_ends"]["w2v_bert_features"]["source"]
    assert "class defaults" in src and "no preprocessor_config.json" in src


# ------------------------------------------------------------------ tokenizer and emotion classifier


def test_tokenizer_and_classifier_are_in_the_bundle(bundle):
    m = manifest(bundle)
    assert m["absent"] == {}
    tok, emo = m["bundle"]["tokenizer"], m["bundle"]["emotion_classifier"]
    assert tok["path"] == "bpe.model" and list(tok["files"]) == ["bpe.model"]
    assert emo["path"] == "qwen0.6bemo4-merge"
    want = sorted(os.path.join("qwen0.6bemo4-merge", f) for f in os.listdir(os.path.join(DEMO, "qwen0.6bemo4-merge")))
    assert sorted(emo["files"]) == want
    for entry in (tok, emo):
        for f, rec in entry["files"].items():
            data = (bundle / f).read_bytes()
            assert data == open(os.path.join(DEMO, f), "rb").read()
            import hashlib

            assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["size"] == len(data)
            assert rec["source"]["path"].endswith(f)
    # the copied tokenizer works as upstream loads it
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(bundle / "bpe.model"))
    assert sp.GetPieceSize() == json.loads(metadata(str(bundle / "gpt.safetensors"))["config"])["number_text_tokens"]


def test_release_without_them_converts_and_says_so(release, tmp_path):
    os.unlink(release / "bpe.model")
    shutil.rmtree(release / "qwen0.6bemo4-merge")
    out = tmp_path / "out"
    p = run_cli("all", "--src", release, "--out", out, "--quiet")
    assert "tokenizer: absent" in p.stdout
    m = manifest(out)
    assert m["bundle"] == {}
    assert "bpe.model (config.yaml dataset.bpe_model) is not in the release folder" == m["absent"]["tokenizer"]
    assert "qwen0.6bemo4-merge" in m["absent"]["emotion_classifier"]
    run_cli("check", out)


def test_check_hash_covers_the_copied_files(release, tmp_path):
    out = tmp_path / "out"
    run_cli("all", "--src", release, "--out", out, "--quiet")
    target = out / "qwen0.6bemo4-merge" / "config.json"
    os.unlink(target)  # break the hard link, then change the copy
    target.write_text((release / "qwen0.6bemo4-merge" / "config.json").read_text().replace("16", "17", 1))
    run_cli("check", out)  # same size: headers-only check cannot tell
    assert_refused(run_cli("check", out, "--hash", expect=None), "qwen0.6bemo4-merge/config.json (emotion_classifier) does not match")
    os.unlink(target)
    assert_refused(run_cli("check", out, expect=None), "lists qwen0.6bemo4-merge/config.json (emotion_classifier), which is missing")


# ------------------------------------------------------------------ cross-file rules


def _tamper(bundle, tmp_path, name, **changes):
    """A copy of the bundle whose one file claims other config values."""
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    p = d / name
    md = metadata(str(p))
    cfg = json.loads(md["config"])
    cfg.update(changes)
    md["config"] = json.dumps(cfg)
    rewrite(str(p), str(p), meta=md)
    return d


CASES = [
    ("bigvgan.safetensors", {"num_mels": 9}, "s2mel n_mels == bigvgan num_mels", "bigvgan num_mels = 9"),
    ("bigvgan.safetensors", {"hop_size": 16}, "s2mel hop_length == bigvgan hop_size", "bigvgan hop_size = 16"),
    ("bigvgan.safetensors", {"sampling_rate": 24000}, "s2mel sampling_rate == bigvgan sampling_rate", "bigvgan sampling_rate = 24000"),
    ("campplus.safetensors", {"embedding_size": 7}, "campplus embedding_size == s2mel style_dim", "campplus embedding_size = 7"),
    ("speaker_matrix.safetensors", {"style_dim": 7}, "campplus embedding_size == speaker-matrix style_dim", "speaker-matrix style_dim = 7"),
    ("emotion_matrix.safetensors", {"emo_num": [73]}, "speaker-matrix emo_num == emotion-matrix emo_num", "emotion-matrix emo_num = [73]"),
    ("emotion_matrix.safetensors", {"model_dim": 9}, "emotion-matrix model_dim == gpt model_dim", "emotion-matrix model_dim = 9"),
    ("semantic_codec.safetensors", {"codebook_size": 32}, "gpt mel codes other than start/stop", "semantic-codec codebook_size = 32"),
    ("w2v_bert.safetensors", {"hidden_size": 32}, "w2v-bert hidden_size == semantic-codec hidden_size", "w2v-bert hidden_size = 32"),
    # a 2.0 GPT has no speaker_embedding_dim (the rule is 2.5's); the key, once there, is checked
    ("gpt.safetensors", {"speaker_embedding_dim": 7}, "(2.5) campplus embedding_size == gpt speaker_embedding_dim",
     "gpt speaker_embedding_dim = 7"),
]


@pytest.mark.parametrize("name,changes,rule,shown", CASES, ids=[c[2].split(" ==")[0] + "/" + c[0] for c in CASES])
def test_check_refuses_files_that_do_not_belong_together(bundle, tmp_path, name, changes, rule, shown):
    d = _tamper(bundle, tmp_path, name, **changes)
    p = run_cli("check", d, expect=None)
    line = next((l for l in p.stderr.splitlines() if "do not belong together" in l), "")
    assert p.returncode == 1 and rule in line and shown in line and name in line, p.stderr


def test_every_rule_has_a_case():
    assert all(any(r.startswith(c[2]) for c in CASES) for r in pipeline.RULES)
    assert len(CASES) == len(pipeline.RULES)


def test_check_of_the_demo_bundle_passes_every_rule(bundle):
    from converters.release.release import cross_file_problems

    assert cross_file_problems(str(bundle)) == []


def test_all_refuses_sources_that_do_not_belong_together(release, tmp_path):
    """Caught from the configs before any tensor is converted."""
    _edit_config(release, lambda d: d["s2mel"]["style_encoder"].update(dim=7))
    out = tmp_path / "out"
    p = run_cli("all", "--src", release, "--out", out, expect=None)
    assert_refused(p, "the sources do not belong together, nothing was converted", "campplus embedding_size = 6",
                   "s2mel style_dim = 7")
    assert not out.exists() or not any(n.endswith(".safetensors") for n in os.listdir(out))


# ------------------------------------------------------------------ vocoder


def test_vocoder_named_by_config_that_this_bigvgan_is_not(release, tmp_path):
    _edit_config(release, lambda d: d["vocoder"].update(name="nvidia/bigvgan_v2_22khz_80band_256x"))
    p = run_cli("all", "--src", release, "--out", tmp_path / "out", expect=None)
    assert_refused(p, "this BigVGAN is not the vocoder", "nvidia/bigvgan_v2_22khz_80band_256x", "num_mels 8 is not 80",
                   "hop_size 8 is not 256")


def test_vocoder_that_disagrees_with_the_s2mel_mel(release, tmp_path):
    cfg = json.loads((release / "bigvgan" / "config.json").read_text())
    cfg["win_size"] = 24
    (release / "bigvgan" / "config.json").write_text(json.dumps(cfg))
    p = run_cli("all", "--src", release, "--out", tmp_path / "out", expect=None)
    assert_refused(p, "does not fit the s2mel mel settings", "win_size 24 vs s2mel win_length 32")


def test_vocoder_found_under_its_name_in_the_release(release, tmp_path):
    shutil.move(str(release / "bigvgan"), str(release / "vocoders-tiny"))
    _edit_config(release, lambda d: d["vocoder"].update(name="vocoders-tiny"))
    p = run_cli("all", "--src", release, "--out", tmp_path / "out", "--quiet")
    assert f"bigvgan: {release / 'vocoders-tiny'} (in the release folder)" in p.stdout


def test_config_without_vocoder_name_is_refused(release, tmp_path):
    _edit_config(release, lambda d: d.pop("vocoder"))
    assert_refused(run_cli("all", "--src", release, "--out", tmp_path / "out", expect=None), "config has no vocoder.name")


# ------------------------------------------------------------------ missing sources


def test_every_missing_source_in_one_error(release, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    os.unlink(release / "gpt.pth")
    shutil.rmtree(release / "campplus")
    shutil.rmtree(release / "w2v-bert-2.0")
    os.unlink(release / "wav2vec2bert_stats.pt")
    out = tmp_path / "out"
    p = run_cli("all", "--src", release, "--out", out, expect=None, process=True)  # huggingface_hub reads the env at import
    assert_refused(p, "4 source(s) not found, nothing was converted",
                   f"huggingface-cli download IndexTeam/IndexTTS-2 gpt.pth --local-dir {release}",
                   "huggingface-cli download funasr/campplus campplus_cn_common.bin",
                   "huggingface-cli download facebook/w2v-bert-2.0 model.safetensors config.json preprocessor_config.json",
                   f"huggingface-cli download IndexTeam/IndexTTS-2 wav2vec2bert_stats.pt --local-dir {release}",
                   "--campplus PATH", "--w2v-bert PATH")
    assert not out.exists()


def test_partial_snapshot_is_named(release, tmp_path, monkeypatch):
    """A Hugging Face snapshot without the checkpoint (an interrupted download)."""
    hub = tmp_path / "hub"
    snap = hub / "models--funasr--campplus" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "configuration.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    shutil.rmtree(release / "campplus")
    p = run_cli("all", "--src", release, "--out", tmp_path / "out", expect=None, process=True)
    assert_refused(p, f"{snap} (a partial snapshot: no campplus_cn_common.bin)")
