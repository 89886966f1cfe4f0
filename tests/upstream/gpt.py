"""Tiny upstream UnifiedVoice v2 (IndexTTS-2's GPT), saved as the release saves it."""

from __future__ import annotations

import copy
import os
import warnings

import torch
import yaml

# The released gpt: section's structure (conformer_perceiver, conv2d2 front ends, two
# encoders with different sizes and head counts) at tiny sizes.  UnifiedVoice fixes some
# sizes itself: the encoders' input is 1024 wide and the emotion perceiver runs at dim
# 1024 with dim_head 64, so its head count (emo attention_heads) stays 1 and its
# feed-forward multiplier small.
TINY = {
    "model_dim": 16,
    "max_mel_tokens": 12,
    "max_text_tokens": 10,
    "heads": 2,
    "use_mel_codes_as_input": True,
    "mel_length_compression": 1024,
    "layers": 2,
    "number_text_tokens": 20,
    "number_mel_codes": 18,
    "start_mel_token": 16,
    "stop_mel_token": 17,
    "start_text_token": 0,
    "stop_text_token": 1,
    "train_solo_embeddings": False,
    "condition_type": "conformer_perceiver",
    "condition_module": {
        "output_size": 8,
        "linear_units": 16,
        "attention_heads": 2,
        "num_blocks": 2,
        "input_layer": "conv2d2",
        "perceiver_mult": 2,
    },
    "emo_condition_module": {
        "output_size": 4,
        "linear_units": 12,
        "attention_heads": 1,
        "num_blocks": 1,
        "input_layer": "conv2d2",
        "perceiver_mult": 0.01,
    },
}


def module():
    from . import indextts

    return indextts("gpt.model_v2")


def config(**overrides) -> dict:
    c = copy.deepcopy(TINY)
    c.update(overrides)
    return c


def build(cfg: dict | None = None, seed: int = 0):
    """A UnifiedVoice with random weights everywhere (norms, biases, position biases and
    embeddings included), in eval mode."""
    mv = module()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        transformers.logging.set_verbosity_error()
        m = mv.UnifiedVoice(**(cfg or TINY))
    randomize(m)
    return m.eval()


def randomize(m) -> None:
    """Random values in every parameter, each kind at a trained-like scale: norm gains
    near 1, biases and position biases small, the rest ~ 1/sqrt(fan-in)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight", "gamma")) or ".norm_" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias") or "pos_bias" in name:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)


def release_state_dict(m) -> dict:
    """What ``torch.save`` of the release holds: the module's state dict."""
    return m.state_dict()


def write_config(folder: str, cfg: dict | None = None) -> str:
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"gpt": copy.deepcopy(cfg or TINY)}, f, sort_keys=False)
    return path


def save_release(m, folder: str, cfg: dict | None = None, fmt: str = "pth", dtype: torch.dtype | None = None,
                 state_dict=None, config_writer=None) -> str:
    """fmt: "pth" (plain state dict, as the release), "wrapped" ({"model": sd}) or
    "safetensors" (the naive dump ports make).  Writes config.yaml beside it.
    ``state_dict``/``config_writer`` replace this module's (2.5's builder passes its own)."""
    os.makedirs(folder, exist_ok=True)
    sd = (state_dict or release_state_dict)(m)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = os.path.join(folder, "gpt.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        path = os.path.join(folder, "gpt.pth")
        torch.save(sd if fmt == "pth" else {"model": sd}, path)
    (config_writer or write_config)(folder, cfg)
    return path


# ------------------------------------------------------------------ demo release


# The demo release is smaller still (its gpt.pth must stay well under 1.5 MB).
DEMO = config(
    model_dim=8, layers=1,
    condition_module={**TINY["condition_module"], "output_size": 4, "linear_units": 8, "num_blocks": 1},
    emo_condition_module={**TINY["emo_condition_module"], "output_size": 2, "linear_units": 4},
)


def demo_config() -> dict:
    return {"gpt": copy.deepcopy(DEMO)}


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/gpt.pth as a plain state dict.  Stored as float16: the emotion
    perceiver alone has ~0.5M parameters at any config (dim 1024 and dim_head 64 are fixed
    upstream), so float32 would not fit the demo's size budget."""
    cfg = config.get("gpt", DEMO)
    m = build(cfg, seed=0)
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in release_state_dict(m).items()}
    os.makedirs(release_dir, exist_ok=True)
    torch.save(sd, os.path.join(release_dir, "gpt.pth"))
