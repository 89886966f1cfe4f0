"""`convert.py all`: whole release, manifest, incremental runs, source discovery, verify."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import ROOT, assert_refused, copy_release, manifest, metadata, run_cli

DEMO = os.path.join(ROOT, "demo", "release")
OUTS = ["bigvgan.safetensors", "campplus.safetensors", "emotion_matrix.safetensors", "gpt.safetensors",
        "s2mel.safetensors", "semantic_codec.safetensors", "speaker_matrix.safetensors", "w2v_bert.safetensors"]
COPIED = ["bpe.model", "qwen0.6bemo4-merge"]  # the tokenizer and emotion classifier, copied unconverted


@pytest.fixture
def release(tmp_path):
    return copy_release(DEMO, tmp_path)


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _mtimes(out):
    return {n: os.stat(out / n).st_mtime_ns for n in OUTS}


def test_all_writes_manifest_and_checks(release, tmp_path):
    out = tmp_path / "out"
    p = run_cli("all", "--src", release, "--out", out, "--quiet")
    assert "in the release folder" in p.stdout
    assert sorted(os.listdir(out)) == sorted(OUTS + COPIED + ["manifest.json"])
    m = manifest(out)
    assert m["options"] == {"dtype": "keep", "allow_nonfinite": False, "profile": "full"}
    for n in OUTS:
        e = m["files"][n]
        assert e["sha256"] == _sha(out / n) and e["size"] == os.path.getsize(out / n)
        ck = e["sources"]["checkpoint"]
        assert ck["sha256"] == _sha(ck["path"]) and ck["size"] == os.path.getsize(ck["path"])
        if n != "campplus.safetensors":  # CAMPPlus has no upstream config file
            assert e["sources"]["config"]["sha256"] == _sha(e["sources"]["config"]["path"])
    assert set(m["files"]["w2v_bert.safetensors"]["sources"]) == {"checkpoint", "config", "stats/"}
    run_cli("check", out, "--hash")


def test_second_run_is_a_no_op_and_one_change_redoes_one(release, tmp_path):
    out = tmp_path / "out"
    run_cli("all", "--src", release, "--out", out, "--quiet")
    before = _mtimes(out)
    p = run_cli("all", "--src", release, "--out", out, "--quiet")
    assert p.stdout.count("up to date") == len(OUTS) + len(COPIED) and _mtimes(out) == before
    # Same bytes, new mtime: re-hashed, still up to date.
    os.utime(release / "gpt.pth", ns=(1, 1))
    p = run_cli("all", "--src", release, "--out", out, "--quiet")
    assert p.stdout.count("up to date") == len(OUTS) + len(COPIED) and _mtimes(out) == before
    # A changed source: only its output is redone.
    sd = torch.load(release / "s2mel.pth", weights_only=True)
    k = next(k for k, v in sd["net"]["cfm"].items() if v.is_floating_point())
    sd["net"]["cfm"][k] = sd["net"]["cfm"][k] + 1
    torch.save(sd, release / "s2mel.pth")
    p = run_cli("all", "--src", release, "--out", out, "--quiet")
    after = _mtimes(out)
    assert [n for n in OUTS if after[n] != before[n]] == ["s2mel.safetensors"]
    assert p.stdout.count("up to date") == len(OUTS) + len(COPIED) - 1
    run_cli("check", out, "--hash")


def test_a_changed_converter_redoes_its_output(release, tmp_path, monkeypatch):
    """The up-to-date test keys on the converter's fingerprint (its module, the ops, the
    schema section, the writer format), not on a version string nobody bumps."""
    from converters.models import registry
    from converters.release import release as rel

    out = tmp_path / "out"
    run_cli("all", "--src", release, "--out", out, "--quiet")
    m = manifest(out)
    assert all(m["files"][n]["fingerprint"] == registry.converter_fingerprint(m["files"][n]["model"]) for n in OUTS)
    before = _mtimes(out)
    real = registry.converter_fingerprint
    monkeypatch.setattr(rel, "converter_fingerprint", lambda kind: real(kind) + ("-changed" if kind == "s2mel" else ""))
    p = run_cli("all", "--src", release, "--out", out, "--quiet")
    after = _mtimes(out)
    assert [n for n in OUTS if after[n] != before[n]] == ["s2mel.safetensors"], p.stdout
    assert manifest(out)["files"]["s2mel.safetensors"]["fingerprint"].endswith("-changed")


def test_fingerprint_follows_the_code_and_the_schema(monkeypatch):
    from converters.models import registry
    from converters.format import schema

    a = registry.converter_fingerprint("bigvgan")
    registry.converter_fingerprint.cache_clear()
    spec = dict(schema.model_spec("bigvgan"), description="changed")
    monkeypatch.setattr(schema, "model_spec", lambda kind: spec if kind == "bigvgan" else schema.load_schema()["models"][kind])
    assert registry.converter_fingerprint("bigvgan") != a
    registry.converter_fingerprint.cache_clear()
    monkeypatch.undo()
    assert registry.converter_fingerprint("bigvgan") == a
    assert len({registry.converter_fingerprint(k) for k in registry.MODELS}) == len(registry.MODELS)
    registry.converter_fingerprint.cache_clear()


def test_changed_options_redo_everything(release, tmp_path):
    out = tmp_path / "out"
    run_cli("all", "--src", release, "--out", out, "--quiet")
    before = _mtimes(out)
    p = run_cli("all", "--src", release, "--out", out, "--dtype", "float32", "--quiet")
    assert not any(f"up to date: {out / n}" in p.stdout for n in OUTS)  # the copied files do not depend on options
    assert all(v != before[k] for k, v in _mtimes(out).items())


def test_foreign_file_needs_force(release, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpt.safetensors").write_bytes(b"someone else's file")
    assert_refused(run_cli("all", "--src", release, "--out", out, expect=None), "already exists", "--force")
    assert (out / "gpt.safetensors").read_bytes() == b"someone else's file"
    run_cli("all", "--src", release, "--out", out, "--force", "--quiet")


def _fake_hf_cache(tmp_path, release, repo, folder, rev="0123abcd"):
    base = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    shutil.move(str(release / folder), str(snap))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    return snap


def _name_vocoder(release, name):
    import yaml

    doc = yaml.safe_load((release / "config.yaml").read_text())
    doc["vocoder"]["name"] = name
    (release / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _all_reading_hf_env(*args):
    """``all`` in this process (run_cli), with huggingface_hub's constants, which it reads
    from the environment when first imported (the cache location among them), read
    again from the environment the test set, as a new process's import would; the
    module's values are put back afterwards.  (A ``python convert.py`` process for each
    case would pay for starting Python and importing torch, ~2 s.)"""
    import importlib

    from huggingface_hub import constants

    saved = dict(vars(constants))
    try:
        importlib.reload(constants)
        return run_cli(*args)
    finally:
        vars(constants).clear()
        vars(constants).update(saved)


def test_hugging_face_cache_discovery(release, tmp_path, monkeypatch):
    snap = _fake_hf_cache(tmp_path, release, "facebook/w2v-bert-2.0", "w2v-bert-2.0")
    _name_vocoder(release, "nvidia/bigvgan_tiny_demo")  # the vocoder config.yaml names is looked up in the cache
    _fake_hf_cache(tmp_path, release, "nvidia/bigvgan_tiny_demo", "bigvgan", rev="feed")
    _fake_hf_cache(tmp_path, release, "amphion/MaskGCT", "MaskGCT", rev="beef")
    _fake_hf_cache(tmp_path, release, "funasr/campplus", "campplus", rev="cafe")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    p = _all_reading_hf_env("all", "--src", release, "--out", out, "--quiet")  # huggingface_hub reads the env at import
    assert f"w2v-bert: {snap} (in the Hugging Face cache (facebook/w2v-bert-2.0))" in p.stdout
    for repo in ("nvidia/bigvgan_tiny_demo", "amphion/MaskGCT", "funasr/campplus"):
        assert f"(in the Hugging Face cache ({repo}))" in p.stdout
    run_cli("check", out)


def test_hf_home_fallback_and_missing_source(release, tmp_path, monkeypatch):
    shutil.rmtree(release / "bigvgan")
    _name_vocoder(release, "nvidia/bigvgan_tiny_demo")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    p = run_cli("all", "--src", release, "--out", tmp_path / "out", expect=None, process=True)
    assert_refused(p, "1 source(s) not found", "bigvgan: looked in", str(release / "bigvgan"),
                   str(tmp_path / "hfhome" / "hub" / "models--nvidia--bigvgan_tiny_demo"), "--bigvgan",
                   "huggingface-cli download nvidia/bigvgan_tiny_demo bigvgan_generator.pt config.json")
    assert not (tmp_path / "out" / "gpt.safetensors").exists()  # refused before any work


@pytest.mark.parametrize("env", ["XDG_CACHE_HOME", "HUGGINGFACE_HUB_CACHE"])
def test_cache_location_follows_huggingface_hub(release, tmp_path, monkeypatch, env):
    """The cache is where huggingface_hub looks: XDG_CACHE_HOME/huggingface/hub, and the
    legacy HUGGINGFACE_HUB_CACHE, which the hand-rolled lookup ignored."""
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    hub = tmp_path / "xdg" / "huggingface" / "hub" if env == "XDG_CACHE_HOME" else tmp_path / "legacy"
    monkeypatch.setenv(env, str(tmp_path / "xdg" if env == "XDG_CACHE_HOME" else hub))
    base = hub / "models--funasr--campplus"
    shutil.move(str(release / "campplus"), str(base / "snapshots" / "c0ffee"))  # no refs/main: the only snapshot
    p = _all_reading_hf_env("all", "--src", release, "--out", tmp_path / "out", "--quiet")
    assert f"campplus: {base / 'snapshots' / 'c0ffee'} (in the Hugging Face cache (funasr/campplus))" in p.stdout


def test_interrupted_all_says_what_it_kept(release, tmp_path, monkeypatch):
    """Ctrl-C during `all`: the outputs finished before (and the manifest) stay, and the
    message says so instead of "no output was written"."""
    from converters.release import engine

    real, done = engine.convert, []

    def convert(kind, *a, **k):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(kind)
        return real(kind, *a, **k)

    monkeypatch.setattr(engine, "convert", convert)
    out = tmp_path / "out"
    p = run_cli("all", "--src", release, "--out", out, "--quiet", expect=130)
    assert "interrupted; the file being written was discarded" in p.stderr and "are kept" in p.stderr
    m = manifest(out)
    assert sorted(m["files"]) == ["emotion_matrix.safetensors", "speaker_matrix.safetensors"]
    run_cli("check", out)


def test_explicit_flag_wins(release, tmp_path):
    other = tmp_path / "elsewhere"
    shutil.move(str(release / "bigvgan"), str(other))
    p = run_cli("all", "--src", release, "--out", tmp_path / "out", "--bigvgan", other, "--quiet")
    assert f"bigvgan: {other} (given on the command line)" in p.stdout


def test_check_validatesmanifest(demo_bundle, tmp_path):
    out = shutil.copytree(demo_bundle, tmp_path / "out")  # `all` on the demo release (conftest), a copy to edit
    shutil.copy(out / "bigvgan.safetensors", out / "stray.safetensors")
    assert_refused(run_cli("check", out, expect=None), "stray.safetensors is in the folder but not in the manifest")
    os.unlink(out / "stray.safetensors")
    os.unlink(out / "gpt.safetensors")
    assert_refused(run_cli("check", out, expect=None), "lists gpt.safetensors, which is missing")


def test_check_hash_detects_changed_bytes(demo_bundle, tmp_path):
    out = shutil.copytree(demo_bundle, tmp_path / "out")  # `all` on the demo release (conftest), a copy to edit
    data = bytearray((out / "bigvgan.safetensors").read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: headers still pass
    (out / "bigvgan.safetensors").write_bytes(bytes(data))
    run_cli("check", out)
    assert_refused(run_cli("check", out, "--hash", expect=None), "does not match its sha256")


def test_verify_passes_and_catches_a_changed_value(demo_bundle, tmp_path):
    release, out = Path(DEMO), demo_bundle  # `all` on the demo release, read only (conftest)
    p = run_cli("verify", release / "gpt.pth", out / "gpt.safetensors")
    assert "verified" in p.stdout and "max_abs_diff=0" in p.stdout
    run_cli("verify", release / "w2v-bert-2.0", out / "w2v_bert.safetensors",
            "--stats", release / "wav2vec2bert_stats.pt", "--failures-only")
    t = load_file(out / "bigvgan.safetensors")
    t["ups.0.weight"][0, 0, 0] += 1e-3
    bad = tmp_path / "bad.safetensors"
    save_file(t, bad, metadata=metadata(out / "bigvgan.safetensors"))
    p = run_cli("verify", release / "bigvgan", bad, "--failures-only", expect=None)
    assert p.returncode == 1 and "MISMATCH ups.0.weight" in p.stdout and "ok " not in p.stdout
    assert_refused(p, "1 of")


@pytest.mark.slow
def test_make_convert_default_runs_on_the_demo(tmp_path):
    """The README's set-up: `make convert` builds the chained demo and converts it, the
    bundle checks, and the README's synthesize command writes a WAV from it."""
    import subprocess
    import wave

    out = tmp_path / "canonical"
    py = os.path.join(ROOT, ".venv", "bin", "python")
    subprocess.run(["make", "-s", "convert", f"OUT={out}", f"PYTHON={py}"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["make", "-s", "check", f"OUT={out}"], cwd=ROOT, check=True, capture_output=True)
    assert sorted(os.listdir(out)) == sorted(OUTS + COPIED + ["manifest.json"])
    wav = tmp_path / "out.wav"
    subprocess.run([py, "-m", "reference", "synthesize", out, "--text", "CAB BAD DAB FACE", "--prompt",
                    os.path.join(ROOT, "demo", "chain", "prompt.wav"), "--out", wav, "--greedy", "--max-codes", "20"],
                   cwd=ROOT, check=True, capture_output=True)
    with wave.open(str(wav)) as w:
        assert w.getframerate() == 22050 and w.getnframes() > 0


def test_verify_every_demo_output(demo_bundle):
    """verify recomputes every tensor of every model (weight-norm and batch-norm folds,
    splits, regenerated buffers) from its source and finds no difference."""
    release, out = Path(DEMO), demo_bundle  # `all` on the demo release, read only (conftest)
    m = manifest(out)
    assert sorted(m["files"]) == sorted(OUTS)
    for name, entry in m["files"].items():
        src = entry["sources"]["checkpoint"]["path"]
        p = run_cli("verify", src, out / name, "--stats", release / "wav2vec2bert_stats.pt", "--failures-only")
        assert p.stdout.startswith("verified "), p.stdout


def test_up_to_date_run_hashes_nothing_and_sources_are_hashed_before_their_output(release, tmp_path, monkeypatch):
    """In process: the first run asks for every source's hash in conversion order
    before any conversion; a second, up-to-date run asks for none."""
    from converters.release import engine, release as rel
    from converters.release.discovery import ITEMS
    from converters.io.hashing import SERVICE

    asked, events = [], []
    real_request, real_convert = SERVICE.request, engine.convert
    # (the copied bundle files are hashed after the conversion sources; they are left out here)
    monkeypatch.setattr(SERVICE, "request", lambda p: (None if COPIED[1] in p else asked.append(os.path.basename(p)), real_request(p))[1])
    monkeypatch.setattr(engine, "convert", lambda kind, *a, **k: (events.append(("convert", kind, len(asked))), real_convert(kind, *a, **k))[1])
    out = tmp_path / "out"
    rel.convert_all(str(release), str(out), {}, "keep", False, True, False, echo=lambda m: None)
    first_convert = events[0][2]
    checkpoints = [a for a in asked[:first_convert] if a.endswith((".pt", ".pth", ".bin", ".safetensors"))]
    assert checkpoints[:2] == ["feat1.pt", "feat2.pt"] and checkpoints[-1] == "gpt.pth", checkpoints
    assert "wav2vec2bert_stats.pt" in checkpoints
    assert [e[1] for e in events] == [i.kind for i in ITEMS]
    asked.clear()
    m = rel.convert_all(str(release), str(out), {}, "keep", False, True, False, echo=lambda m: None)
    assert asked == [] and set(m["files"]) == set(OUTS)
