"""The speaker and emotion matrices' upstream adapters: infer_v2's
``_load_emotion_matrices`` and the two ways it uses them."""

from __future__ import annotations

from ...errors import ConvertError
from .common import config_section, indextts, need_config_reader


def matrix_model(path: str, emo_num):
    """infer_v2's ``_load_emotion_matrices``: ``torch.split(torch.load(path), cfg.emo_num)``."""
    import torch

    return torch.split(torch.load(path), list(emo_num))


def speaker_matrix_run(groups, name: str, x: dict, config=None) -> dict:
    """infer_v2: ``[find_most_similar_cosine(style, tmp) for tmp in self.spk_matrix]``."""
    import torch

    if name == "select_rows":
        find = indextts("emotion").find_most_similar_cosine
        return {"index": torch.stack([find(x["style"], tmp) for tmp in groups]).to(torch.int64)}
    raise ConvertError(f"speaker-matrix: no upstream call for reference entry {name!r}")


def emotion_matrix_run(groups, name: str, x: dict, config=None) -> dict:
    """infer_v2's mix of the given rows: ``sum(weights.unsqueeze(1) * cat(tmp[i]), 0)``."""
    import torch

    if name == "mix":
        picked = torch.cat([tmp[int(i)].unsqueeze(0) for i, tmp in zip(x["index"], groups)], 0)
        return {"emovec_mat": torch.sum(x["weights"].unsqueeze(1) * picked, 0).unsqueeze(0)}
    raise ConvertError(f"emotion-matrix: no upstream call for reference entry {name!r}")


def imports_speaker() -> None:
    need_config_reader()
    indextts("emotion")


def imports_emotion() -> None:
    need_config_reader()  # the mix is plain torch: nothing of upstream's to import


def load(src_file: str, cfg_file: str | None, extra: dict[str, str]):
    return matrix_model(src_file, config_section(cfg_file, "emo_num")), "torch.split(torch.load(...), cfg.emo_num) (infer_v2)"
