"""Speaker and emotion matrices (feat1.pt, feat2.pt) against upstream's own use of them
(infer_v2.py's emotion-vector mix), and the reader's bare-tensor files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from converters.format import schema
from converters.errors import ConvertError
from converters.io.pth_reader import Stored
from converters.io.sources import BARE_TENSOR_NAME, Source, unwrap
from tests.helpers import assert_refused, back_to_upstream, load_canonical, metadata, run_cli
from tests.upstream import speaker_matrix as up

STYLE, MODEL_DIM = 192, 1280  # the released widths (CAMPPlus embedding, gpt.model_dim)
ROWS = sum(up.EMO_NUM)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("mat")
    spk, emo = up.build(ROWS, STYLE, 0), up.build(ROWS, MODEL_DIM, 1)
    up.save_release(str(d), spk, emo)
    run_cli("speaker-matrix", d, d / "speaker_matrix.safetensors", "--quiet")
    run_cli("emotion-matrix", d, d / "emotion_matrix.safetensors", "--quiet")
    return d


def _canonical(folder):
    spk = load_file(str(folder / "speaker_matrix.safetensors"))["spk_matrix"]
    emo = load_file(str(folder / "emotion_matrix.safetensors"))["emo_matrix"]
    off = json.loads(metadata(str(folder / "emotion_matrix.safetensors"))["config"])["emo_offsets"]
    return spk, emo, off


def runtime_emovec(spk, emo, off, style: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What a runtime does with the canonical tensors and the metadata's emo_offsets alone."""
    out = torch.zeros(emo.shape[1])
    for g in range(len(off) - 1):
        rows = spk[off[g]:off[g + 1]]
        i = int(torch.argmax(torch.nn.functional.cosine_similarity(style, rows, dim=1)))
        out += weights[g] * emo[off[g] + i]
    return out.unsqueeze(0)


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, STYLE, generator=g), torch.rand(len(up.EMO_NUM), generator=g)


def test_emotion_mix_matches_upstream(converted):
    d = converted
    for seed in range(3):
        style, weights = _case(seed)
        ref = up.upstream_emovec(str(d / "feat1.pt"), str(d / "feat2.pt"), up.EMO_NUM, style, weights)
        torch.testing.assert_close(runtime_emovec(*_canonical(d), style, weights), ref, rtol=1e-5, atol=1e-5)


def test_oracle_is_sensitive(converted):
    """One wrong tensor (the emotion matrix off by one row) changes the result."""
    d = converted
    style, weights = _case(7)
    ref = up.upstream_emovec(str(d / "feat1.pt"), str(d / "feat2.pt"), up.EMO_NUM, style, weights)
    spk, emo, off = _canonical(d)
    assert not torch.allclose(runtime_emovec(spk, emo.roll(1, 0), off, style, weights), ref, atol=1e-3)


def test_round_trip_and_metadata(converted):
    d = converted
    for kind, name, feat in (("speaker-matrix", "spk_matrix", "feat1.pt"), ("emotion-matrix", "emo_matrix", "feat2.pt")):
        out = d / f"{kind.replace('-', '_')}.safetensors"
        assert schema.check_file(str(out)) == (kind, [])
        back = back_to_upstream(str(out))
        assert list(back) == [BARE_TENSOR_NAME] and torch.equal(back[BARE_TENSOR_NAME], torch.load(d / feat))
        _, prov = load_canonical(str(out))
        assert prov == {name: {"from": [BARE_TENSOR_NAME], "op": "copy"}}
        cfg = json.loads(metadata(str(out))["config"])
        assert cfg["emo_num"] == up.EMO_NUM and cfg["emo_offsets"][-1] == ROWS and len(cfg["emo_offsets"]) == len(up.EMO_NUM) + 1
        assert json.loads(metadata(str(out))["source"])["file"] == feat


def test_refusals(tmp_path):
    spk, emo = up.build(ROWS, 6, 0), up.build(ROWS, 10, 1)
    up.save_release(str(tmp_path), spk, emo)
    # the two files the wrong way round
    assert_refused(run_cli("speaker-matrix", tmp_path / "feat2.pt", tmp_path / "o.safetensors", expect=None),
                   "spk_matrix", "[73, 10]", "style_dim")
    # rows that do not add up to emo_num
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["emo_num"] = up.EMO_NUM[:-1]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(run_cli("emotion-matrix", tmp_path, tmp_path / "o.safetensors", expect=None), "emo_matrix", "emo_offsets")
    cfg["emo_num"] = [3, 0, 70]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(run_cli("emotion-matrix", tmp_path, tmp_path / "o.safetensors", expect=None), "emo_num", "positive ints")
    # a state dict where a bare tensor belongs
    torch.save({"w": spk}, tmp_path / "feat1.pt")
    cfg["emo_num"] = up.EMO_NUM
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(run_cli("speaker-matrix", tmp_path, tmp_path / "o.safetensors", expect=None), "missing tensors", BARE_TENSOR_NAME)


def test_reader_bare_tensor():
    src = Source("x.pt", "pth-zip", {}, {})
    t = Stored(np.arange(6.0, dtype=np.float32).reshape(2, 3), "F32")
    assert unwrap(t, src) == {BARE_TENSOR_NAME: t}
    assert any("bare tensor" in n for n in src.notes)
    with pytest.raises(ConvertError, match="holds a list"):
        unwrap([t], Source("y.pt", "pth-zip", {}, {}))
