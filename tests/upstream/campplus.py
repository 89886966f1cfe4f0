"""Upstream CAMPPlus speaker encoder (``indextts.s2mel.modules.campplus.DTDNN``).

IndexTTS-2 builds ``CAMPPlus(feat_dim=80, embedding_size=192)`` (6.9M parameters) and
loads ``campplus_cn_common.bin`` (a pickled plain state dict).  The dense-block depths
(12, 24, 16) and the head's 32 channels are fixed in the class; ``TINY`` shrinks what
the constructor allows, for the demo and the quick variants.
"""

from __future__ import annotations

import json
import os

import torch

REAL = {"feat_dim": 80, "embedding_size": 192}
TINY = {"feat_dim": 8, "embedding_size": 6, "growth_rate": 2, "bn_size": 2, "init_channels": 4}


def module():
    from . import indextts

    return indextts("s2mel.modules.campplus.DTDNN")


def build(config: dict | None = None, seed: int = 0):
    """CAMPPlus with random weights and non-trivial batch-norm statistics and affines, in
    eval mode."""
    torch.manual_seed(seed)
    m = module().CAMPPlus(**(config or REAL))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.running_mean.copy_(torch.randn_like(mod.running_mean) * 0.2)
                mod.running_var.copy_(torch.rand_like(mod.running_var) + 0.5)
                mod.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
                if mod.affine:
                    mod.weight.copy_(torch.rand_like(mod.weight) + 0.5)
                    mod.bias.copy_(torch.randn_like(mod.bias) * 0.1)
            elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)) and mod.bias is not None:
                mod.bias.copy_(torch.randn_like(mod.bias) * 0.1)
    return m.eval()


def save_release(m, folder: str, config: dict | None = None, dtype: torch.dtype | None = None) -> str:
    """campplus_cn_common.bin (torch.save of the state dict, as the HF repo has it); a
    non-IndexTTS-2 config goes beside it as campplus.json."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "campplus_cn_common.bin")
    sd = m.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(sd, path)
    if config is not None and config != REAL:
        with open(os.path.join(folder, "campplus.json"), "w") as f:
            json.dump(config, f)
    return path


def fbank(batch: int, frames: int, feat_dim: int, seed: int = 1) -> torch.Tensor:
    """Input like infer_v2's: fbank features [B, T, feat_dim], mean-normalised over time."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, feat_dim, generator=g)
    return x - x.mean(dim=1, keepdim=True)


def demo_config() -> dict:
    return {}  # no config.yaml section: IndexTTS-2 hard-codes CAMPPlus's arguments


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/campplus/campplus_cn_common.bin at TINY size (the real size is 28 MB),
    with campplus.json naming its arguments; embedding_size follows the demo's
    s2mel.style_encoder.dim, which the style vector feeds.  Stored as float16 (about
    0.5 MB): the head's 32 channels are fixed upstream and the 937 zip records carry
    ~0.3 MB of overhead, so float32 would be 0.8 MB."""
    cfg = dict(TINY)
    style = config.get("s2mel", {}).get("style_encoder", {}).get("dim")
    if style:
        cfg["embedding_size"] = style
    save_release(build(cfg, seed=2026), os.path.join(release_dir, "campplus"), cfg, dtype=torch.float16)
