"""The dtype policy (issue 15): under --dtype float16/bfloat16 (and for half-precision
sources), the schema's 'float32'-class tensors (norm affines, running statistics,
positional and frequency tables, snake parameters, the w2v-bert statistics) stay
float32; check enforces it; rebuilt buffers take their class's dtype."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from converters.format import schema
from tests.helpers import ROOT, assert_dtype_policy, assert_refused, load_canonical, metadata, rewrite, run_cli

DEMO = os.path.join(ROOT, "demo", "release")

# One worker: the two half-precision bundles (module fixture `half`) converted once, not once per worker.
pytestmark = pytest.mark.xdist_group("dtype-policy")
FILES = ["gpt", "s2mel", "w2v_bert", "bigvgan", "campplus", "semantic_codec", "speaker_matrix", "emotion_matrix"]


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def half(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    run_cli("all", "--src", DEMO, "--out", out, "--dtype", request.param, "--quiet")
    return out, {"float16": "F16", "bfloat16": "BF16"}[request.param]


def test_half_bundles_keep_the_float32_classes(half):
    out, dt = half
    for f in FILES:
        assert_dtype_policy(out / f"{f}.safetensors", dt)
    run_cli("check", out)


def test_reference_runs_on_half_files(half):
    """Mixed dtypes in one file load and run (golden files are written and checked)."""
    out, _ = half
    run_cli("golden", out)
    run_cli("check", out)


def test_check_refuses_a_half_norm(half, tmp_path):
    out, dt = half
    t, _ = load_canonical(str(out / "gpt.safetensors"))
    t["gpt.ln_f.weight"] = t["gpt.ln_f.weight"].to(t["gpt.h.0.attn.q.weight"].dtype)
    bad = rewrite(str(out / "gpt.safetensors"), str(tmp_path / "gpt.safetensors"), tensors=t)
    errs = schema.check_file(bad)[1]
    assert any("'gpt.ln_f.weight' is " + dt in e and "dtype class float32 keeps it F32" in e for e in errs), errs
    assert_refused(run_cli("check", bad, expect=None), "gpt.ln_f.weight", "the dtype policy")


def test_float32_bundle_is_unchanged_by_the_policy(tmp_path):
    out = tmp_path / "out"
    run_cli("all", "--src", DEMO, "--out", out, "--dtype", "float32", "--quiet")
    for f in FILES:
        t, _ = load_canonical(str(out / f"{f}.safetensors"))
        assert {x.dtype for x in t.values() if x.is_floating_point()} == {torch.float32}, f


def test_half_source_without_a_rebuilt_buffer_converts(tmp_path):
    """The demo gpt.pth is float16; without its `pe` buffers the converter rebuilds them
    (float32, their class) instead of refusing "mixed float dtypes" under --dtype keep."""
    src = tmp_path / "rel"
    os.makedirs(src)
    sd = torch.load(os.path.join(DEMO, "gpt.pth"), weights_only=True)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    torch.save({k: v for k, v in sd.items() if not k.endswith("pos_enc.pe")}, src / "gpt.pth")
    shutil.copy(os.path.join(DEMO, "config.yaml"), src / "config.yaml")
    out = tmp_path / "gpt.safetensors"
    run_cli("gpt", src, out, "--quiet")
    t, prov = load_canonical(str(out))
    assert prov["conditioning_encoder.embed.pos_enc.pe"]["from"] == []
    assert t["conditioning_encoder.embed.pos_enc.pe"].dtype == torch.float32
    assert_dtype_policy(out, "F16")
    # the rebuilt table equals the one the source carried (upstream's sinusoid), upcast
    full = torch.load(os.path.join(DEMO, "gpt.pth"), weights_only=True)["conditioning_encoder.embed.pos_enc.pe"][0]
    assert torch.allclose(t["conditioning_encoder.embed.pos_enc.pe"], full.float(), atol=1e-3)
    assert json.loads(metadata(str(out))["config"])["model_dim"] == 8
