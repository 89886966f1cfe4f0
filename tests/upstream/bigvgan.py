"""Tiny upstream BigVGAN v2 (IndexTTS-2's copy of NVIDIA's class)."""

from __future__ import annotations

import json
import os
import warnings

import torch


# The released config's structure (resblock 1, snakebeta, log-scale snake, no bias and
# no tanh at the end) at tiny widths.
TINY = {
    "resblock": "1",
    "num_mels": 8,
    "upsample_rates": [4, 2],
    "upsample_kernel_sizes": [8, 4],
    "upsample_initial_channel": 16,
    "resblock_kernel_sizes": [3, 7],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3]],
    "activation": "snakebeta",
    "snake_logscale": True,
    "use_tanh_at_final": False,
    "use_bias_at_final": False,
    "sampling_rate": 22050,
    "hop_size": 8,
}


def module():
    from . import indextts

    return indextts("s2mel.modules.bigvgan.bigvgan")


def build(config: dict | None = None, seed: int = 0, parametrizations: bool = False):
    """A BigVGAN with random weights where g != ||v|| and non-trivial snake params."""
    bv = module()
    from . import indextts

    AttrDict = indextts("s2mel.modules.bigvgan.env").AttrDict
    h = AttrDict(dict(config or TINY))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = bv.BigVGAN(h)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight_g"):
                p.copy_(torch.rand_like(p) * 2 + 0.5)  # far from ||v||
            elif name.endswith(("alpha", "beta")):
                p.copy_(torch.randn_like(p) * 0.3)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    if parametrizations:
        m = to_parametrizations(m)
    return m.eval()


def to_parametrizations(m):
    """Re-express every old-style weight norm with torch.nn.utils.parametrizations,
    keeping the same g and v (so the state dict uses original0/original1)."""
    from torch.nn.utils import parametrizations, remove_weight_norm

    for mod in list(m.modules()):
        if hasattr(mod, "weight_g"):
            g, v = mod.weight_g.detach().clone(), mod.weight_v.detach().clone()
            remove_weight_norm(mod)
            parametrizations.weight_norm(mod, dim=0)
            with torch.no_grad():
                mod.parametrizations.weight.original0.copy_(g)
                mod.parametrizations.weight.original1.copy_(v)
    return m


def save_release(m, folder: str, config: dict | None = None, fmt: str = "pt") -> str:
    """Save as the HF snapshot does: bigvgan_generator.pt = {"generator": sd} + config.json."""
    os.makedirs(folder, exist_ok=True)
    sd = m.state_dict()
    if fmt == "pt":
        path = os.path.join(folder, "bigvgan_generator.pt")
        torch.save({"generator": sd}, path)
    else:
        from safetensors.torch import save_file

        path = os.path.join(folder, "bigvgan_generator.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config or TINY), f, indent=2)
    return path


def folded_copy(m):
    """The model with weight norm removed, in place (what inference runs)."""
    from torch.nn.utils import parametrize

    for mod in m.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.remove_weight_norm()
    return m


# The demo vocoder's mel settings are the demo s2mel's (tests/upstream/s2mel.py DEMO_SPECT).
DEMO = {**TINY, "n_fft": 32, "win_size": 32, "fmin": 0, "fmax": None}
DEMO_NAME = "bigvgan"  # config.yaml vocoder.name: the release's own bigvgan/ folder


def demo_config() -> dict:
    return {"vocoder": {"type": "bigvgan", "name": DEMO_NAME}}


def write_demo(release_dir: str, config: dict) -> None:
    save_release(build(DEMO, seed=2026), os.path.join(release_dir, config["vocoder"]["name"]), DEMO)
