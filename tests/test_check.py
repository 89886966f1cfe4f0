"""`convert.py check`: accepts good canonical files, rejects each kind of tampering."""

from __future__ import annotations

import json

import pytest
import torch

from converters.format import schema
from tests.helpers import assert_refused, load_canonical, metadata, rewrite, run_cli
from tests.upstream import bigvgan as up


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("bv")
    up.save_release(up.build(), str(d / "src"))
    out = d / "bigvgan.safetensors"
    run_cli("bigvgan", d / "src", out, "--quiet")
    return out


def test_accepts_good_file_and_folder(good):
    p = run_cli("check", good)
    assert "ok" in p.stdout
    run_cli("check", good.parent)


def _tampered(good, tmp_path, tensors=None, meta=None):
    return rewrite(str(good), str(tmp_path / "t.safetensors"), tensors, meta)


def _errors(path):
    return schema.check_file(str(path))[1]


def test_rejects_missing_tensor(good, tmp_path):
    t, _ = load_canonical(good)
    del t["conv_pre.bias"]
    bad = _tampered(good, tmp_path, tensors=t)
    assert any("missing tensor 'conv_pre.bias'" in e for e in _errors(bad))
    assert_refused(run_cli("check", bad, expect=None), "conv_pre.bias")


def test_rejects_unexpected_tensor(good, tmp_path):
    t, _ = load_canonical(good)
    t["extra.weight"] = torch.zeros(2)
    assert any("unexpected tensor 'extra.weight'" in e for e in _errors(_tampered(good, tmp_path, tensors=t)))


def test_rejects_reshaped_tensor(good, tmp_path):
    t, _ = load_canonical(good)
    w = t["ups.0.weight"]
    t["ups.0.weight"] = w.transpose(0, 1).contiguous()  # same numel, wrong layout
    errs = _errors(_tampered(good, tmp_path, tensors=t))
    assert any("ups.0.weight" in e and "shape" in e for e in errs), errs


def test_rejects_recast_tensor(good, tmp_path):
    t, _ = load_canonical(good)
    t["conv_post.weight"] = t["conv_post.weight"].half()
    errs = _errors(_tampered(good, tmp_path, tensors=t))
    assert any("conv_post.weight" in e and "F16" in e for e in errs), errs


def test_rejects_inconsistent_free_symbol(good, tmp_path):
    t, _ = load_canonical(good)
    t["activation_post.upsample_filter"] = torch.zeros(1, 1, 10)  # other filters have 12 taps
    errs = _errors(_tampered(good, tmp_path, tensors=t))
    assert any("aa_taps" in e for e in errs), errs


def test_rejects_config_mismatch(good, tmp_path):
    md = metadata(good)
    cfg = json.loads(md["config"])
    cfg["upsample_initial_channel"] *= 2
    md["config"] = json.dumps(cfg)
    errs = _errors(_tampered(good, tmp_path, meta=md))
    assert any("conv_pre.weight" in e for e in errs), errs


@pytest.mark.parametrize("key", ["schema", "provenance", "config", "schema_version"])
def test_rejects_missing_metadata(good, tmp_path, key):
    md = metadata(good)
    del md[key]
    assert _errors(_tampered(good, tmp_path, meta=md))


def test_rejects_no_metadata(good, tmp_path):
    t, _ = load_canonical(good)
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "plain.safetensors"))
    assert_refused(run_cli("check", tmp_path / "plain.safetensors", expect=None), "not a canonical file")


def test_rejects_incomplete_provenance(good, tmp_path):
    md = metadata(good)
    prov = json.loads(md["provenance"])
    del prov["conv_pre.weight"]
    md["provenance"] = json.dumps(prov)
    errs = _errors(_tampered(good, tmp_path, meta=md))
    assert any("'conv_pre.weight' has no provenance" in e for e in errs), errs


def test_rejects_other_schema_version(good, tmp_path):
    md = metadata(good)
    md["schema_version"] = "0"
    errs = _errors(_tampered(good, tmp_path, meta=md))
    assert any("schema version 0" in e for e in errs), errs


def test_fine_tune_with_other_sizes_passes(tmp_path):
    """Dims are symbols: another width and other kernels still pass."""
    cfg = dict(up.TINY, upsample_initial_channel=32, upsample_kernel_sizes=[8, 6], resblock_kernel_sizes=[3, 5])
    up.save_release(up.build(cfg), str(tmp_path / "src"), config=cfg)
    out = tmp_path / "o.safetensors"
    run_cli("bigvgan", tmp_path / "src", out, "--quiet")
    assert _errors(out) == []


def test_check_exit_code_with_mixed_inputs(good, tmp_path):
    t, _ = load_canonical(good)
    del t["conv_pre.bias"]
    bad = _tampered(good, tmp_path, tensors=t)
    p = run_cli("check", good, bad, expect=1)
    assert "ok" in p.stdout and "conv_pre.bias" in p.stderr
