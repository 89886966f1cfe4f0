"""IndexTTS-2.5 semantic codec (issue 14): ``codec.pth`` (``EnhancedCodec``) converted by
``converters/models/semantic_codec_v2_5.py`` (schema ``semantic-codec@2.5``), and the reference's
``vq2emb`` and ``decode`` against upstream.

Oracle: ``indextts25-inference`` 0.2.0's ``EnhancedCodec`` (the decoding half) loaded from
``codec.pth`` by its own ``load_checkpoint`` (``tests.upstream.semantic_codec25.oracle``).
The full layout (243 tensors, 50.58M parameters at the released config) is upstream's
``indextts/codec/models.py``: RepCodec's modules plus ``down``/``up``."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from converters.models import semantic_codec_v2_5 as conv
from converters.format.schema import check_file
from reference import semantic_codec as ref
from tests.helpers import ROOT, back_to_upstream, convert_in_process, metadata, python_c, reference_load, rewrite, swap_rows
from tests.upstream import semantic_codec25 as up

ENTRY = {e.name: e for e in ref.ENTRIES_2_5}
RELEASED = {"codebook_size": 8192, "hidden_size": 1024, "codebook_dim": 8, "vocos_dim": 384,
            "vocos_intermediate_dim": 2048, "vocos_num_layers": 12}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec25")
    sd = up.build()
    src = up.save_release(sd, str(d / "release"))
    out = convert_in_process("semantic-codec", src, d / "semantic_codec.safetensors")
    return reference_load(out), up.oracle(src), src, out, sd


def run_upstream(m, name, x):
    from converters.cli.forward import semantic_codec_2_5_run

    return semantic_codec_2_5_run(m, name, x)


def test_release_layout_at_the_released_config():
    from omegaconf import OmegaConf

    from tests.upstream import semantic_codec as v2

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        sd = v2.module().RepCodec(cfg=OmegaConf.create(RELEASED)).state_dict()
    h = RELEASED["hidden_size"]
    assert len(sd) + 4 == 243
    assert round((sum(v.numel() for v in sd.values()) + 2 * (h * h * 3 + h)) / 1e6, 2) == 50.58
    keys = set(up.build().keys())
    assert {k for k in keys if k.startswith(("down.", "up."))} == {"down.weight", "down.bias", "up.weight", "up.bias"}
    from converters.cli.forward import indextts25

    trimmed = set(indextts25("codec.models").EnhancedCodec(**up.TINY).state_dict())
    folded = {k.replace("weight_g", "weight") for k in keys if not k.endswith("weight_v")}
    assert trimmed <= folded and trimmed == {k for k in folded if not k.startswith(("encoder.", "down.")) and "in_project" not in k}


def test_conversion_round_trip_and_drops(tiny):
    _, _, src, out, sd = tiny
    md = metadata(str(out))
    assert md["family_version"] == "2.5" and check_file(str(out))[1] == []
    back = back_to_upstream(str(out))
    q = "quantizer.quantizers.0.out_project"
    folded = torch._weight_norm(sd[f"{q}.weight_v"], sd[f"{q}.weight_g"], 0)
    for k, v in back.items():
        want = folded if k == f"{q}.weight" else sd[k]
        assert torch.equal(v, want), k
    dropped = json.loads(md["dropped"])
    kept = set(back) | {f"{q}.weight_g", f"{q}.weight_v"}
    assert set(dropped) == (set(sd) - kept) | {"optimizer", "scheduler", "step"}
    assert all(k.startswith(("encoder.", "down.")) or "in_project" in k for k in set(sd) - kept)
    assert "never read" in dropped["optimizer"] and "decode" in dropped["down.weight"]


@pytest.mark.parametrize("name", list(ENTRY))
def test_matches_upstream(tiny, name):
    w, m = tiny[:2]
    for seed in range(2):
        x = ENTRY[name].inputs(w.config, torch.Generator().manual_seed(seed))
        got, want = ENTRY[name].run(w, None, **x), run_upstream(m, name, x)
        for k in ENTRY[name].outputs:
            assert want[k].abs().max() > 1e-2
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)


def test_decode_shape_and_activations(tiny):
    w = tiny[0]
    x = ENTRY["decode"].inputs(w.config, torch.Generator().manual_seed(0))
    acts: dict = {}
    out = ENTRY["decode"].run(w, acts, **x)["features"]
    b, t = x["codes"].shape
    assert out.shape == (b, 2 * t, w.config["hidden_size"])
    assert {"decoder.embed", "decoder", "upsampled", *(f"decoder.convnext.{i}" for i in range(w.config["vocos_num_layers"]))} <= set(acts)


SWAPS = [
    [("decoder.0.norm.weight", "decoder.0.final_layer_norm.weight"), ("decoder.0.norm.bias", "decoder.0.final_layer_norm.bias")],
    [("decoder.0.convnext.{i}.norm.weight", "decoder.0.convnext.{i}.gamma")],
]


@pytest.mark.parametrize("pairs", SWAPS, ids=["norm/final_layer_norm", "block norm/gamma"])
def test_swapped_rows_are_caught(tiny, tmp_path, monkeypatch, pairs):
    w, m, src = tiny[:3]
    x = ENTRY["decode"].inputs(w.config, torch.Generator().manual_seed(0))
    swap_rows(monkeypatch, "semantic-codec", *pairs, family_version="2.5")
    bad = convert_in_process("semantic-codec", src, tmp_path / "bad.safetensors")
    assert check_file(str(bad))[1] == []
    got = ENTRY["decode"].run(reference_load(bad), None, **x)["features"]
    assert float((got - run_upstream(m, "decode", x)["features"]).abs().max()) > 1e-3


def test_a_2_0_codec_never_passes_as_2_5_or_back(tiny, tmp_path):
    from tests.upstream import semantic_codec as v2

    out = tiny[3]
    bad = rewrite(str(out), str(tmp_path / "as20.safetensors"), meta={**metadata(str(out)), "family_version": "2.0"})
    assert check_file(bad)[1]
    src20 = v2.save_release(v2.build(), str(tmp_path / "r20"))
    out20 = convert_in_process("semantic-codec", src20, tmp_path / "sc20.safetensors", config=tmp_path / "r20" / "config.yaml")
    assert metadata(str(out20))["family_version"] == "2.0"
    bad = rewrite(str(out20), str(tmp_path / "as25.safetensors"), meta={**metadata(str(out20)), "family_version": "2.5"})
    errs = check_file(bad)[1]
    assert errs and "an IndexTTS-2.0 semantic-codec's" in errs[0]


def test_downsample_scale_below_two_refused():
    from converters.errors import ConvertError

    with pytest.raises(ConvertError, match="downsample_scale is 1"):
        conv.runtime_config({**up.TINY, "downsample_scale": 1}, "config.yaml")


CHILD = """
import sys
sys.path.insert(0, {root!r})
from converters.release import engine
engine.convert("semantic-codec", {src!r}, {out!r}, quiet=True, force=True)
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_optimizer_state_is_never_read(tmp_path):
    """codec.pth's optimizer state (about 400 MB in the release) beside the "model"
    wrapper is dropped and never read: converting a codec.pth whose optimizer state is
    256 MiB raises the converting process's peak resident memory by far less than that."""
    sd = up.build()
    peaks = []
    for scale in (1, 4500):
        src = up.save_release(sd, str(tmp_path / f"r{scale}"), optimizer_scale=scale)
        out = str(tmp_path / f"o{scale}.safetensors")
        p = python_c(CHILD.format(root=ROOT, src=src, out=out))  # a child forked with torch imported (tests/helpers.py)
        assert p.returncode == 0, p.stderr
        peaks.append(int(p.stdout.split()[-1]))
        if scale > 1:
            assert os.path.getsize(src) > 256 << 20, os.path.getsize(src)
            os.unlink(src)  # removed while in the page cache (pytest keeps the last runs' folders)
    assert peaks[1] - peaks[0] < 32 << 20, f"peak resident memory grew by {(peaks[1] - peaks[0]) >> 20} MiB"
