"""CLI error paths: every refusal is one `error:` line, a non-zero exit, no traceback,
and nothing new or damaged at the output path."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import assert_refused, run_cli
from tests.upstream import bigvgan as up


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    up.save_release(up.build(), str(d / "bigvgan"))
    return d / "bigvgan"


def _state(release):
    return torch.load(release / "bigvgan_generator.pt", weights_only=True)["generator"]


def _variant(tmp_path, release, sd):
    d = tmp_path / "variant"
    d.mkdir()
    torch.save({"generator": sd}, d / "bigvgan_generator.pt")
    (d / "config.json").write_text((release / "config.json").read_text())
    return d


def test_missing_source(tmp_path):
    assert_refused(run_cli("bigvgan", tmp_path / "nope", tmp_path / "o.safetensors", expect=None), "no such file")


def test_folder_without_checkpoint(tmp_path):
    assert_refused(run_cli("bigvgan", tmp_path, tmp_path / "o.safetensors", expect=None), "bigvgan_generator.pt")


def test_missing_config(tmp_path, release):
    (tmp_path / "g.pt").write_bytes((release / "bigvgan_generator.pt").read_bytes())
    assert_refused(run_cli("bigvgan", tmp_path / "g.pt", tmp_path / "o.safetensors", expect=None), "config.json", "--config")


def test_existing_output_needs_force(tmp_path, release):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    assert_refused(run_cli("bigvgan", release, out, expect=None), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    run_cli("bigvgan", release, out, "--force", "--quiet")
    assert out.read_bytes() != b"precious"


def test_failed_run_keeps_existing_output(tmp_path, release):
    sd = _state(release)
    del sd["conv_pre.bias"]
    src = _variant(tmp_path, release, sd)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    assert_refused(run_cli("bigvgan", src, out, "--force", expect=None), "conv_pre.bias")
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors", "variant"]


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink"])
def test_output_is_input(tmp_path, release, how):
    d = tmp_path / "s"
    d.mkdir()
    src = d / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _state(release).items()}, str(src))
    (d / "config.json").write_text((release / "config.json").read_text())
    before = src.read_bytes()
    out = src if how == "same" else d / "out.safetensors"
    if how == "hardlink":
        os.link(src, out)
    elif how == "symlink":
        os.symlink(src, out)
    assert_refused(run_cli("bigvgan", src, out, "--force", expect=None), "input")
    assert src.read_bytes() == before


def test_output_folder_missing_or_file(tmp_path, release):
    assert_refused(run_cli("bigvgan", release, tmp_path / "no" / "o.safetensors", expect=None), "does not exist")
    (tmp_path / "f").write_text("x")
    assert_refused(run_cli("bigvgan", release, tmp_path / "f" / "o.safetensors", expect=None), "not a folder")


def test_canonical_input_refused(tmp_path, release):
    out = tmp_path / "o.safetensors"
    run_cli("bigvgan", release, out, "--quiet")
    shutil_cfg = tmp_path / "config.json"
    shutil_cfg.write_text((release / "config.json").read_text())
    assert_refused(run_cli("bigvgan", out, tmp_path / "again.safetensors", expect=None), "already a canonical file")
    assert not (tmp_path / "again.safetensors").exists()


def test_missing_and_unexpected_tensors_named(tmp_path, release):
    sd = _state(release)
    del sd["ups.1.0.weight_v"]
    sd["ups.9.0.bias"] = torch.zeros(3)
    src = _variant(tmp_path, release, sd)
    p = run_cli("bigvgan", src, tmp_path / "o.safetensors", expect=None)
    assert_refused(p, "missing tensors", "ups.1.0")


def test_unexpected_tensor_named(tmp_path, release):
    sd = _state(release)
    sd["ups.9.0.bias"] = torch.zeros(3)
    src = _variant(tmp_path, release, sd)
    assert_refused(run_cli("bigvgan", src, tmp_path / "o.safetensors", expect=None), "unexpected", "ups.9.0.bias")


def test_shape_disagrees_with_config(tmp_path, release):
    d = tmp_path / "c"
    d.mkdir()
    (d / "bigvgan_generator.pt").write_bytes((release / "bigvgan_generator.pt").read_bytes())
    cfg = json.loads((release / "config.json").read_text())
    cfg["num_mels"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    assert_refused(run_cli("bigvgan", d, tmp_path / "o.safetensors", expect=None), "conv_pre.weight", "num_mels")


def test_other_models_checkpoint(tmp_path, release):
    d = tmp_path / "g"
    d.mkdir()
    torch.save({"model": {"gpt.h.0.ln_1.weight": torch.ones(4), "conditioning_encoder.x": torch.ones(1),
                          "mel_embedding.weight": torch.ones(2, 4)}}, d / "bigvgan_generator.pt")
    (d / "config.json").write_text((release / "config.json").read_text())
    assert_refused(run_cli("bigvgan", d, tmp_path / "o.safetensors", expect=None), "looks like a gpt checkpoint")


def test_nonfinite_refused_unless_allowed(tmp_path, release):
    sd = _state(release)
    sd["conv_pre.bias"][3] = float("nan")
    src = _variant(tmp_path, release, sd)
    out = tmp_path / "o.safetensors"
    assert_refused(run_cli("bigvgan", src, out, expect=None), "conv_pre.bias", "NaN", "--allow-nonfinite")
    assert not out.exists()
    run_cli("bigvgan", src, out, "--allow-nonfinite", "--quiet")
    run_cli("check", out)


def test_overflow_in_the_cast_is_refused(tmp_path, release):
    """Finite source values that --dtype float16 turns into Inf are caught too (the
    check runs on the output values), and the message says the cast did it."""
    sd = _state(release)
    sd["conv_pre.bias"][0] = 1e6  # float16 max is 65504
    src = _variant(tmp_path, release, sd)
    out = tmp_path / "o.safetensors"
    assert_refused(run_cli("bigvgan", src, out, "--dtype", "float16", expect=None), "conv_pre.bias", "after the cast to F16")
    assert not out.exists()
    run_cli("bigvgan", src, out, "--quiet")  # float32 keeps the value


def test_debug_shows_traceback(tmp_path):
    p = run_cli("bigvgan", tmp_path / "nope", tmp_path / "o.safetensors", "--debug", expect=None, process=True)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_inspect_source_and_canonical(tmp_path, release):
    p = run_cli("inspect", release)
    assert "looks like: bigvgan" in p.stdout and "fold_weight_norm(dim=0)" in p.stdout
    out = tmp_path / "o.safetensors"
    run_cli("bigvgan", release, out, "--quiet")
    p = run_cli("inspect", out)
    assert "canonical bigvgan file" in p.stdout and "schema check: ok" in p.stdout
