"""IndexTTS-2's emotion matrix (``feat2.pt``) -> ``emotion_matrix.safetensors``.

Source: ``feat2.pt`` from the release folder (named by ``emo_matrix:`` in
``config.yaml``), a bare tensor saved with ``torch.save`` (the reader names it
``tensor``), ``[sum(emo_num), gpt.model_dim]``.

How upstream uses it (``infer_v2.py``): split along rows into ``len(emo_num)`` groups of
``emo_num[g]`` rows, like the speaker matrix.  Given an emotion weight vector ``w``
(one weight per group), group g contributes its row ``i_g`` (the row whose speaker-matrix
twin is most cosine-similar to the reference style, or a random one), and
``emovec_mat = sum_g w[g] * emo_matrix_g[i_g]`` is added, in the GPT's ``model_dim``
space, to ``(1 - sum(w))`` times the GPT's own emotion vector.

Canonical form: the matrix unchanged as ``emo_matrix``, with ``emo_num`` and
``emo_offsets`` in the metadata config (see :mod:`converters.models.speaker_matrix`).  A row
count other than ``sum(emo_num)`` or a width other than ``gpt.model_dim`` is refused by
the schema check before writing.
"""

from __future__ import annotations

from ..io.configs import load_yaml_section
from ..errors import ConvertError
from ..io.sources import BARE_TENSOR_NAME
from .speaker_matrix import emo_grouping
from ..format.table import Drop, row

TENSOR = "emo_matrix"

DROPS: list[Drop] = []


def load_config(path: str) -> dict:
    return load_yaml_section(path, "gpt")


def runtime_config(raw: dict, path: str) -> dict:
    if not isinstance(raw.get("model_dim"), int):
        raise ConvertError(f"{path}: config lacks gpt.model_dim (the width of the emotion vectors)")
    return {**emo_grouping(raw["_root"], path), "model_dim": raw["model_dim"]}


def table(cfg: dict):
    return [row(TENSOR, "copy", BARE_TENSOR_NAME)], {}
