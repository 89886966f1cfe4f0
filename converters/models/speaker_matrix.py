"""IndexTTS-2's speaker matrix (``feat1.pt``) -> ``speaker_matrix.safetensors``.

Source: ``feat1.pt`` from the release folder (named by ``spk_matrix:`` in
``config.yaml``), a bare tensor saved with ``torch.save`` (the reader names it
``tensor``), ``[sum(emo_num), style_dim]``.

How upstream uses it (``infer_v2.py``, ``_load_emotion_matrices`` and ``infer``): the
matrix is split along rows into ``len(emo_num)`` emotion groups of ``emo_num[g]`` rows
(``torch.split(spk_matrix, emo_num)``).  For an emotion vector, each group g picks the
row most cosine-similar to the reference speaker's CAMPPlus style vector
(``style_dim`` = 192, the CAMPPlus embedding, which is also ``s2mel.style_encoder.dim``),
and that index selects the same row of the emotion matrix's group g (``feat2.pt``, see
:mod:`converters.models.emotion_matrix`).

Canonical form: the matrix unchanged as ``spk_matrix``; the grouping goes into the
metadata config as ``emo_num`` and ``emo_offsets`` (``emo_offsets[g]`` is the first row
of group g, ``emo_offsets[len(emo_num)]`` the row count), so group g is rows
``emo_offsets[g] .. emo_offsets[g+1] - 1``.  The converter refuses a matrix whose row
count is not ``sum(emo_num)`` or whose width is not ``s2mel.style_encoder.dim`` (the
schema check before writing), which also catches ``feat1.pt`` and ``feat2.pt`` passed the
wrong way round.
"""

from __future__ import annotations

from ..io.configs import load_yaml_section
from ..errors import ConvertError
from ..io.sources import BARE_TENSOR_NAME
from ..format.table import Drop, row

TENSOR = "spk_matrix"

DROPS: list[Drop] = []


def load_config(path: str) -> dict:
    return load_yaml_section(path, "s2mel")


def emo_grouping(root: dict, path: str) -> dict:
    """``emo_num`` from the top level of config.yaml, checked, with its row offsets."""
    emo_num = root.get("emo_num")
    if not isinstance(emo_num, list) or not emo_num or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in emo_num):
        raise ConvertError(f"{path}: config needs emo_num, a list of positive ints (rows per emotion group), got {emo_num!r}")
    offsets = [0]
    for n in emo_num:
        offsets.append(offsets[-1] + n)
    return {"emo_num": list(emo_num), "emo_offsets": offsets}


def runtime_config(raw: dict, path: str) -> dict:
    style = raw.get("style_encoder")
    if not isinstance(style, dict) or not isinstance(style.get("dim"), int):
        raise ConvertError(f"{path}: config lacks s2mel.style_encoder.dim (the CAMPPlus style width the speaker matrix is compared with)")
    return {**emo_grouping(raw["_root"], path), "style_dim": style["dim"]}


def table(cfg: dict):
    return [row(TENSOR, "copy", BARE_TENSOR_NAME)], {}
