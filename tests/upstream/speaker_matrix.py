"""IndexTTS-2's speaker and emotion matrices (``feat1.pt``, ``feat2.pt``) and the
upstream code that reads them.

There is no upstream class: ``infer_v2.py`` ``torch.load``s each file as a bare tensor,
splits it by ``emo_num`` and, per emotion group, picks the speaker-matrix row most
cosine-similar to the CAMPPlus style (``indextts.emotion.find_most_similar_cosine``) and
the emotion-matrix row at the same index.  :func:`upstream_emovec` repeats those steps
with upstream's own function (``converters.cli.forward``), as the oracle.
"""

from __future__ import annotations

import os

import torch
import yaml

EMO_NUM = [3, 17, 2, 8, 4, 5, 10, 24]  # the released grouping (config.yaml emo_num)


def build(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g)


def save_release(folder: str, spk: torch.Tensor, emo: torch.Tensor, emo_num=None, style_dim=None, model_dim=None) -> None:
    """feat1.pt and feat2.pt as bare tensors, and a config.yaml with the keys the
    converters read (emo_num, s2mel.style_encoder.dim, gpt.model_dim)."""
    os.makedirs(folder, exist_ok=True)
    torch.save(spk, os.path.join(folder, "feat1.pt"))
    torch.save(emo, os.path.join(folder, "feat2.pt"))
    cfg = {
        "gpt": {"model_dim": model_dim or emo.shape[1]},
        "s2mel": {"style_encoder": {"dim": style_dim or spk.shape[1]}},
        "emo_matrix": "feat2.pt",
        "spk_matrix": "feat1.pt",
        "emo_num": list(emo_num or EMO_NUM),
    }
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)


def upstream_emovec(spk_path: str, emo_path: str, emo_num, style: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """infer_v2.py's emotion-vector mix (the use_random=False path), on the upstream files:
    :mod:`converters.cli.forward`'s two steps, as ``verify --forward`` runs them."""
    from converters.cli import forward

    index = forward.speaker_matrix_run(forward.matrix_model(spk_path, emo_num), "select_rows", {"style": style})["index"]
    return forward.emotion_matrix_run(forward.matrix_model(emo_path, emo_num), "mix",
                                      {"index": index, "weights": weights})["emovec_mat"]


def demo_config() -> dict:
    return {"emo_matrix": "feat2.pt", "spk_matrix": "feat1.pt", "emo_num": list(EMO_NUM)}


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/feat1.pt: [sum(emo_num), s2mel.style_encoder.dim]."""
    dim = config["s2mel"]["style_encoder"]["dim"]
    os.makedirs(release_dir, exist_ok=True)
    torch.save(build(sum(config["emo_num"]), dim, seed=11), os.path.join(release_dir, config.get("spk_matrix", "feat1.pt")))
