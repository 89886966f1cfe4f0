"""IndexTTS-2.5 releases end to end (issue 14): the version told from tensors and files
(never from config.yaml's ``version``), ``all`` on the committed 2.5 demo release (hf_cache/,
codec.pth with optimizer state, the hostile config), the bundle (tiktoken tokenizer, 2.5
pipeline, cross-file rules), ``check``, ``golden`` and ``verify --forward``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from converters.format import family, schema
from converters.release import pipeline
from tests.helpers import ROOT, assert_refused, copy_release, manifest, metadata, rewrite, run_cli

DEMO = os.path.join(ROOT, "demo", "release-2.5")

# One worker: the converted 2.5 demo (module fixture `converted`) built once, not once per worker.
pytestmark = pytest.mark.xdist_group("release-2.5")
DEMO_20 = os.path.join(ROOT, "demo", "release")
OUTS = ["bigvgan.safetensors", "campplus.safetensors", "emotion_matrix.safetensors", "gpt.safetensors",
        "s2mel.safetensors", "semantic_codec.safetensors", "speaker_matrix.safetensors", "w2v_bert.safetensors"]
TIKTOKEN = "multilingual_zh_ja_yue_char_del.tiktoken"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("b25") / "canonical"
    p = run_cli("all", "--src", DEMO, "--out", out)
    return out, p.stdout


@pytest.fixture
def release(tmp_path):
    return copy_release(DEMO, tmp_path)


# ------------------------------------------------------------------ telling the versions apart


def test_release_folders_are_told_apart_by_their_files(tmp_path):
    assert family.release_version(DEMO)[0] == "2.5"
    assert family.release_version(DEMO_20)[0] == "2.0"
    with open(os.path.join(DEMO, "config.yaml")) as f:
        assert yaml.safe_load(f)["version"] == 2.0  # the hostile config: never read
    old = tmp_path / "v1"
    old.mkdir()
    (old / "config.yaml").write_text("gpt: {}\n")
    (old / "gpt.pth").write_bytes(b"")
    (old / "dvae.pth").write_bytes(b"")
    with pytest.raises(family.Unsupported, match="IndexTTS 1.x release"):
        family.release_version(str(old))
    assert_refused(run_cli("all", "--src", old, "--out", tmp_path / "o", expect=None), "IndexTTS 1.x release", "unsupported")


def test_per_model_commands_record_the_release(tmp_path):
    """Models of one layout take the version of the release folder around them: the 2.5
    demo's s2mel and its hf_cache/ w2v-bert are 2.5; the same s2mel.pth alone is 2.0."""
    run_cli("s2mel", os.path.join(DEMO, "s2mel.pth"), tmp_path / "s.safetensors")
    assert metadata(str(tmp_path / "s.safetensors"))["family_version"] == "2.5"
    run_cli("w2v-bert", os.path.join(DEMO, "hf_cache", "w2v-bert-2.0"), tmp_path / "w.safetensors",
            "--stats", os.path.join(DEMO, "wav2vec2bert_stats.pt"))
    assert metadata(str(tmp_path / "w.safetensors"))["family_version"] == "2.5"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(DEMO, "s2mel.pth"), alone)
    shutil.copy(os.path.join(DEMO, "config.yaml"), alone)
    run_cli("s2mel", alone / "s2mel.pth", tmp_path / "a.safetensors")
    assert metadata(str(tmp_path / "a.safetensors"))["family_version"] == "2.0"
    p = run_cli("inspect", os.path.join(DEMO, "s2mel.pth"))
    assert "release: IndexTTS-2.5 (from the release folder" in p.stdout


def test_family_metadata(converted, tmp_path):
    """Every file names its family and version; a file without them (every 2.0 file) is
    read as 2.0, so a 2.5 GPT that lost them fails, and says why."""
    out, _ = converted
    f = out / "emotion_matrix.safetensors"
    md = metadata(str(f))
    assert (md["family"], md["family_version"], md["schema_version"]) == ("indextts", "2.5", schema.schema_version())
    gone = {k: v for k, v in md.items() if k not in ("family", "family_version")}
    assert schema.check_file(rewrite(str(f), str(tmp_path / "a.safetensors"), meta=gone))[1] == []
    g = out / "gpt.safetensors"
    gone = {k: v for k, v in metadata(str(g)).items() if k not in ("family", "family_version")}
    errs = schema.check_file(rewrite(str(g), str(tmp_path / "b.safetensors"), meta=gone))[1]
    assert errs and "are an IndexTTS-2.5 gpt's, but its metadata has no family_version (read as 2.0)" in errs[0]
    for key, value, said in (("family_version", "1.5", "family_version is '1.5'"), ("family", "other", "family is 'other'")):
        bad = schema.check_file(rewrite(str(f), str(tmp_path / "c.safetensors"), meta={**md, key: value}))[1]
        assert any(said in e for e in bad), bad


# ------------------------------------------------------------------ all, check, bundle


def test_all_converts_the_demo_release(converted):
    out, stdout = converted
    assert "release: IndexTTS-2.5" in stdout and "config.yaml's version key is not read" in stdout
    for kind, where in (("gpt", "gpt_checkpoint"), ("s2mel", "s2mel_checkpoint")):
        line = next(l for l in stdout.splitlines() if l.startswith(f"{kind}: "))
        assert f"config.yaml {where} names /cubefs/" in line and "which does not exist" in line, line
    for kind, rel in (("w2v-bert", "hf_cache/w2v-bert-2.0"), ("campplus", "hf_cache/campplus_cn_common.bin"),
                      ("bigvgan", "hf_cache/bigvgan"), ("semantic-codec", "codec.pth")):
        assert f"{kind}: {os.path.join(DEMO, rel)} (in the release folder)" in stdout, kind
    assert "hf_cache/semantic_codec_model.safetensors: not converted" in stdout
    m = manifest(out)
    assert m["family_version"] == "2.5" and sorted(m["files"]) == OUTS
    assert all(e["family_version"] == "2.5" for e in m["files"].values())
    assert m["files"]["semantic_codec.safetensors"]["sources"]["checkpoint"]["path"].endswith("codec.pth")
    for n in OUTS:
        assert metadata(str(out / n))["family_version"] == "2.5"
    p = run_cli("check", out)
    assert p.stdout.count(": IndexTTS-2.5") == len(OUTS)


def test_second_run_is_up_to_date(converted):
    out, _ = converted
    p = run_cli("all", "--src", DEMO, "--out", out)
    assert p.stdout.count("up to date:") == len(OUTS) + 2


def test_bundle_has_the_tiktoken_tokenizer(converted):
    """infer_v2_5 reads <model_dir>/multilingual_zh_ja_yue_char_del.tiktoken (no config key
    names it; the config's dataset.bpe_model is 2.0's and is not read)."""
    out, _ = converted
    m = manifest(out)
    assert m["absent"] == {}
    tok = m["bundle"]["tokenizer"]
    assert tok["path"] == TIKTOKEN and list(tok["files"]) == [TIKTOKEN] and "tiktoken" in tok["role"]
    from converters.cli.forward import indextts25

    enc = indextts25("utils.tokenizer").get_encoding(TIKTOKEN[: -len(".tiktoken")], model_dir=str(out))
    ids = enc.encode("<|en|> cab face", allowed_special="all")
    assert enc.decode(ids) == "<|en|> cab face" and ids[0] >= 256  # the language tag is one special token


def test_pipeline_2_5(converted):
    out, _ = converted
    p = manifest(out)["pipeline"]
    doc = schema.load_schema()["pipeline"]
    assert set(p) - {"unused"} == {k.split(".")[0] for k in doc["keys"]}
    steps = [f["step"] for f in p["flow"]]
    assert "code_features" in steps and "speech_conditioning" in steps
    assert not {"semantic_codes", "latents", "latent_projection", "code_embeddings"} & set(steps)
    gpt = json.loads(metadata(str(out / "gpt.safetensors"))["config"])
    assert p["tokens"]["languages"] == gpt["languages"] and p["tokens"]["tokenizer"]["file"] == TIKTOKEN
    assert p["inference"]["mel_frames_per_decoded_frame"] == 1.72 and p["inference"]["decoded_frames_per_code"] == 2
    assert {f["file"] for f in p["flow"] if f["file"]} == set(OUTS) - {"speaker_matrix.safetensors", "emotion_matrix.safetensors"}


def _tamper(out, tmp_path, name, config=None, **meta):
    d = tmp_path / "b"
    shutil.copytree(out, d)
    p = d / name
    md = metadata(str(p))
    if config:
        md["config"] = json.dumps({**json.loads(md["config"]), **config})
    md.update(meta)
    rewrite(str(p), str(p), meta=md)
    return d


def test_campplus_width_is_the_gpt_speaker_input(converted, tmp_path):
    out, _ = converted
    d = _tamper(out, tmp_path, "campplus.safetensors", config={"embedding_size": 7})
    p = run_cli("check", d, expect=None)
    assert p.returncode == 1 and "(2.5) campplus embedding_size == gpt speaker_embedding_dim" in p.stderr
    assert "gpt speaker_embedding_dim = 192" in p.stderr


def test_files_of_two_releases_do_not_make_a_bundle(converted, tmp_path):
    out, _ = converted
    d = tmp_path / "mixed"
    shutil.copytree(out, d)
    os.unlink(d / "manifest.json")
    shutil.rmtree(d / "golden", ignore_errors=True)
    run_cli("s2mel", DEMO_20, d / "s2mel.safetensors", "--force")
    p = run_cli("check", d, expect=None)
    assert p.returncode == 1 and "the files are of different releases" in p.stderr
    assert "s2mel.safetensors is IndexTTS-2.0" in p.stderr and "gpt.safetensors is IndexTTS-2.5" in p.stderr
    # w2v-bert, BigVGAN and CAMPPlus are the same models in both releases
    e = tmp_path / "shared"
    shutil.copytree(out, e)
    os.unlink(e / "manifest.json")
    shutil.rmtree(e / "golden", ignore_errors=True)
    run_cli("bigvgan", os.path.join(DEMO_20, "bigvgan"), e / "bigvgan.safetensors", "--force")
    assert metadata(str(e / "bigvgan.safetensors"))["family_version"] == "2.0"
    assert "different releases" not in run_cli("check", e, expect=None).stderr


def test_missing_codec_is_named_with_the_2_5_repository(release, tmp_path):
    os.unlink(release / "codec.pth")  # still a 2.5 release by its tokenizer
    p = run_cli("all", "--src", release, "--out", tmp_path / "o", expect=None)
    assert_refused(p, "semantic-codec: looked in", "codec.pth", "huggingface-cli download IndexTeam/IndexTTS-2.5 codec.pth")


def test_config_checkpoint_paths_are_used_when_they_exist(release, tmp_path):
    """Upstream joins the release folder with config.yaml's gpt_checkpoint; a path that
    exists is what it loads."""
    os.rename(release / "gpt.pth", release / "gpt_renamed.pth")
    doc = yaml.safe_load((release / "config.yaml").read_text())
    doc["gpt_checkpoint"] = "gpt_renamed.pth"
    (release / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    p = run_cli("all", "--src", release, "--out", tmp_path / "o")
    assert "gpt_renamed.pth (config.yaml gpt_checkpoint)" in p.stdout


def test_golden_and_verify_forward(converted, tmp_path):
    out, _ = converted
    d = tmp_path / "g"
    shutil.copytree(out, d)
    p = run_cli("golden", d, "--models", "gpt", "--models", "semantic-codec")
    g = metadata(str(d / "golden" / "gpt.safetensors"))
    assert g["family_version"] == "2.5"
    names = [e["name"] for e in json.loads(g["entries"])]
    assert names == ["conditioning", "emovec", "merge_emovec", "forward_latents"]
    assert [e["name"] for e in json.loads(metadata(str(d / "golden" / "semantic_codec.safetensors"))["entries"])] == ["vq2emb", "decode"]
    run_cli("check", d)
    p = run_cli("verify", os.path.join(DEMO, "codec.pth"), d / "semantic_codec.safetensors", "--forward")
    assert "forward-verified" in p.stdout and "decode.features" in p.stdout


def test_make_convert_runs_on_the_2_5_demo(tmp_path):
    out = tmp_path / "canonical"
    py = os.path.join(ROOT, ".venv", "bin", "python")
    subprocess.run(["make", "-s", "convert", "SRC=demo/release-2.5", f"OUT={out}", f"PYTHON={py}"], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run(["make", "-s", "check", f"OUT={out}"], cwd=ROOT, check=True, capture_output=True)
    assert sorted(os.listdir(out)) == sorted(OUTS + [TIKTOKEN, "qwen0.6bemo4-merge", "manifest.json"])


def test_every_2_5_rule_is_in_the_schema():
    assert "(2.5) campplus embedding_size == gpt speaker_embedding_dim" in pipeline.RULES
    assert schema.load_schema()["pipeline"]["cross_file_rules"] == pipeline.RULES
    assert set(schema.load_schema()["models"]) >= {"gpt@2.5", "semantic-codec@2.5"}
