"""Reference runtime, speaker and emotion matrices: ``reference.matrices`` on the
canonical files against infer_v2's emotion mix on the upstream ``feat1.pt``/``feat2.pt``."""

from __future__ import annotations

import pytest
import torch

from reference import matrices
from tests.helpers import convert_in_process, reference_load
from tests.upstream import speaker_matrix as up

STYLE, MODEL_DIM = 192, 1280  # the released widths


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("mat")
    rows = sum(up.EMO_NUM)
    up.save_release(str(d), up.build(rows, STYLE, 0), up.build(rows, MODEL_DIM, 1))
    convert_in_process("speaker-matrix", d, d / "speaker_matrix.safetensors")
    convert_in_process("emotion-matrix", d, d / "emotion_matrix.safetensors")
    return d


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, STYLE, generator=g), torch.rand(len(up.EMO_NUM), generator=g)


def test_emotion_mix_matches_upstream(release):
    d = release
    spk, emo = reference_load(d / "speaker_matrix.safetensors"), reference_load(d / "emotion_matrix.safetensors")
    for seed in range(4):
        style, weights = _case(seed)
        want = up.upstream_emovec(str(d / "feat1.pt"), str(d / "feat2.pt"), up.EMO_NUM, style, weights)
        torch.testing.assert_close(matrices.emotion_mix(spk, emo, style, weights), want, rtol=0, atol=1e-5)


def test_entries_run_on_their_own_inputs(release):
    spk = reference_load(release / "speaker_matrix.safetensors")
    emo = reference_load(release / "emotion_matrix.safetensors")
    g = torch.Generator().manual_seed(0)
    (sel,), (mx,) = matrices.SPEAKER_ENTRIES, matrices.EMOTION_ENTRIES
    acts = {}
    idx = sel.run(spk, acts, **sel.inputs(spk.config, g))["index"]
    assert idx.shape == (len(up.EMO_NUM),) and sorted(acts) == sorted(f"similarity.{i}" for i in range(len(up.EMO_NUM)))
    assert all(0 <= int(i) < n for i, n in zip(idx, up.EMO_NUM))
    out = mx.run(emo, None, **mx.inputs(emo.config, g))["emovec_mat"]
    assert out.shape == (1, MODEL_DIM)


def test_wrong_grouping_is_caught(release, tmp_path, monkeypatch):
    """A speaker matrix whose rows are shifted against the emotion matrix picks other
    rows: the comparison fails (the matrices are copied, so the swap is of whole files)."""
    d = release
    spk = reference_load(d / "emotion_matrix.safetensors")  # wrong file: width differs
    with pytest.raises((KeyError, RuntimeError)):
        matrices.emotion_mix(spk, reference_load(d / "emotion_matrix.safetensors"), *_case(0))
    style, weights = _case(1)
    want = up.upstream_emovec(str(d / "feat1.pt"), str(d / "feat2.pt"), up.EMO_NUM, style, weights)
    spk = reference_load(d / "speaker_matrix.safetensors")
    emo = reference_load(d / "emotion_matrix.safetensors")
    emo.tensors["emo_matrix"] = emo["emo_matrix"].roll(1, 0)
    assert not torch.allclose(matrices.emotion_mix(spk, emo, style, weights), want, atol=1e-3)
