"""IndexTTS-2's emotion matrix (``feat2.pt``); see :mod:`tests.upstream.speaker_matrix`."""

from __future__ import annotations

import os

import torch

from .speaker_matrix import EMO_NUM, build


def demo_config() -> dict:
    return {"emo_matrix": "feat2.pt", "spk_matrix": "feat1.pt", "emo_num": list(EMO_NUM)}


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/feat2.pt: [sum(emo_num), gpt.model_dim]."""
    dim = config["gpt"]["model_dim"]
    os.makedirs(release_dir, exist_ok=True)
    torch.save(build(sum(config["emo_num"]), dim, seed=12), os.path.join(release_dir, config.get("emo_matrix", "feat2.pt")))
