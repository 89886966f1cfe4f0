"""Speaker and emotion matrices (``speaker_matrix.safetensors``,
``emotion_matrix.safetensors``): IndexTTS-2's emotion-vector mix.

Tensors:
- ``spk_matrix`` ``[sum(emo_num), style_dim]``: per emotion group, reference speaker
  styles (CAMPPlus embeddings)
- ``emo_matrix`` ``[sum(emo_num), model_dim]``: the emotion vectors in the GPT's space,
  row for row beside the speaker matrix

Config (both files): ``emo_num`` (rows per group) and ``emo_offsets`` (group g is rows
``emo_offsets[g] .. emo_offsets[g+1] - 1``).

Upstream (``infer_v2.py``, an explicit ``emo_vector`` without ``use_random``): per group
g, pick the speaker row most cosine-similar to the reference style, take the emotion row
with the same index, and sum them weighted by the user's per-group weights.  The GPT
then uses ``mix + (1 - sum(weights)) * its own emotion vector``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .entry import Entry, record


def select_rows(spk, style: torch.Tensor, acts: dict | None = None) -> torch.Tensor:
    """Per emotion group, the index (within the group) of the speaker row most
    cosine-similar to ``style`` ``[1, style_dim]`` (upstream computes in float32).
    Returns int64 ``[groups]``."""
    off = spk.config["emo_offsets"]
    m = spk["spk_matrix"].float()
    picked = []
    for g in range(len(off) - 1):
        sim = F.cosine_similarity(style.float(), m[off[g]:off[g + 1]], dim=1)
        record(acts, f"similarity.{g}", sim)
        picked.append(int(torch.argmax(sim)))
    return torch.tensor(picked, dtype=torch.int64)


def mix(emo, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_g weights[g] * emo_matrix[emo_offsets[g] + index[g]]``, as ``[1, model_dim]``."""
    off = emo.config["emo_offsets"]
    m = emo["emo_matrix"]
    rows = torch.stack([m[off[g] + int(index[g])] for g in range(len(off) - 1)])
    return (weights.to(rows.dtype).unsqueeze(1) * rows).sum(0).unsqueeze(0)


def emotion_mix(spk, emo, style: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """infer_v2's ``emovec_mat`` from a style vector and per-group weights."""
    return mix(emo, select_rows(spk, style), weights)


def _style_input(cfg, g):
    return {"style": torch.randn(1, cfg["style_dim"], generator=g)}


def _mix_input(cfg, g):
    n = cfg["emo_num"]
    index = torch.tensor([int(torch.randint(k, (), generator=g)) for k in n], dtype=torch.int64)
    return {"index": index, "weights": torch.rand(len(n), generator=g)}


SPEAKER_ENTRIES = (
    Entry("select_rows", "infer_v2: [find_most_similar_cosine(style, group) for group in split(spk_matrix, emo_num)]",
          ("style",), ("index",), _style_input,
          lambda w, acts, style: {"index": select_rows(w, style, acts)}),
)
EMOTION_ENTRIES = (
    Entry("mix", "infer_v2: sum(weight_vector.unsqueeze(1) * cat(group[index] for each emo_matrix group), 0)",
          ("index", "weights"), ("emovec_mat",), _mix_input,
          lambda w, acts, index, weights: {"emovec_mat": mix(w, index, weights)}),
)
