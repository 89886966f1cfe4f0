"""Tiny upstream IndexTTS-2 s2mel model (``commons.MyModel(cfg.s2mel, use_gpt_latent=True)``)."""

from __future__ import annotations

import copy
import os
import warnings

import torch

# The released s2mel section's structure (DiT with U-ViT and long skips, WaveNet head,
# continuous length regulator with 4 conv blocks) at tiny widths.  depth 5 makes layers
# 0 and 1 emit U-ViT skips, 3 and 4 receive them, and 2 do neither.  The GPT-latent MLP
# (gpt_layer) is hard-coded upstream at 1280 -> 256 -> 128 -> 1024, so the length
# regulator keeps in_channels 1024 to accept its output.
TINY = {
    "preprocess_params": {
        "sr": 22050,
        "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256, "n_mels": 8, "fmin": 0, "fmax": "None"},
    },
    "dit_type": "DiT",
    "reg_loss_type": "l1",
    "style_encoder": {"dim": 6},
    "length_regulator": {
        "channels": 16,
        "is_discrete": False,
        "in_channels": 1024,
        "content_codebook_size": 32,
        "sampling_ratios": [1, 1, 1, 1],
        "vector_quantize": False,
        "n_codebooks": 1,
        "quantizer_dropout": 0.0,
        "f0_condition": False,
        "n_f0_bins": 512,
    },
    "DiT": {
        "hidden_dim": 16,
        "num_heads": 2,
        "depth": 5,
        "class_dropout_prob": 0.1,
        "block_size": 8192,
        "in_channels": 8,
        "style_condition": True,
        "final_layer_type": "wavenet",
        "target": "mel",
        "content_dim": 16,
        "content_codebook_size": 12,
        "content_type": "discrete",
        "f0_condition": False,
        "n_f0_bins": 512,
        "content_codebooks": 1,
        "is_causal": False,
        "long_skip_connection": True,
        "zero_prompt_speech_token": False,
        "time_as_token": False,
        "style_as_token": False,
        "uvit_skip_connection": True,
        "add_resblock_in_transformer": False,
    },
    "wavenet": {"hidden_dim": 16, "num_layers": 3, "kernel_size": 5, "dilation_rate": 2, "p_dropout": 0.2, "style_condition": True},
}

SUBMODULES = ("cfm", "length_regulator", "gpt_layer")


def commons():
    from . import indextts

    return indextts("s2mel.modules.commons")


def variant(**dit) -> dict:
    """TINY with some DiT keys changed."""
    cfg = copy.deepcopy(TINY)
    cfg["DiT"].update(dit)
    return cfg


def build(config: dict | None = None, seed: int = 0):
    """MyModel with random weights: weight-norm g far from ||v||, non-trivial biases and
    norm gains, so a misplaced or unfolded tensor shows in the outputs."""
    c = commons()
    args = c.recursive_munch(copy.deepcopy(config or TINY))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = c.MyModel(args, use_gpt_latent=True)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight_g"):
                p.copy_(torch.rand_like(p) * 2 + 0.5)
            elif name.endswith("norm.weight") or name.endswith(("model.1.weight", "model.4.weight", "model.7.weight", "model.10.weight")):
                p.copy_(1 + torch.randn_like(p) * 0.2)
            elif name.endswith("bias") or "mask" in name or "embedder.weight" in name:
                p.copy_(torch.randn_like(p) * 0.2)
            else:
                fan_in = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1) if p.dim() > 1 else 1
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    return m.eval()


def net(m) -> dict[str, dict[str, torch.Tensor]]:
    return {k: m.models[k].state_dict() for k in SUBMODULES}


def save_training_checkpoint(m, path: str, module_prefix: str | None = "length_regulator", dtype=None) -> str:
    """As the release: {"net": {sub: sd}, "optimizer": ..., "scheduler": ..., "epoch", "iters"},
    with a DDP ``module.`` prefix on one sub-dict."""
    nets = {}
    for k, sd in net(m).items():
        sd = {n: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).clone() for n, t in sd.items()}
        if k == module_prefix:
            sd = {f"module.{n}": t for n, t in sd.items()}
        nets[k] = sd
    params = [p for p in m.parameters()][:4]
    optimizer = {
        "state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                  for i, p in enumerate(params)},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-9, "weight_decay": 0.0, "params": list(range(len(params)))}],
    }
    state = {"net": nets, "optimizer": optimizer, "scheduler": {"last_epoch": 3, "base_lrs": [1e-4]}, "epoch": 3, "iters": 1234}
    torch.save(state, path)
    return path


def save_flat_safetensors(m, path: str) -> str:
    """What ports make: torch.load + save_file with keys flattened to ``cfm.estimator....``."""
    from safetensors.torch import save_file

    flat = {f"{k}.{n}": t.contiguous() for k, sd in net(m).items() for n, t in sd.items()}
    save_file(flat, path)
    return path


def write_config(folder: str, config: dict | None = None) -> str:
    import yaml

    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"s2mel": copy.deepcopy(config or TINY)}, f, sort_keys=False)
    return path


def folded(m):
    """The model with every weight norm removed in place (what inference computes)."""
    from torch.nn.utils import parametrize, remove_weight_norm

    for mod in m.modules():
        if hasattr(mod, "weight_g"):
            remove_weight_norm(mod)
        elif parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return m


# The demo's mel front end: one mel frame per demo-BigVGAN hop (prod(upsample_rates) = 8
# samples), so the demo bundle's files agree with each other as a release's do.
DEMO_SPECT = {"n_fft": 32, "win_length": 32, "hop_length": 8, "n_mels": 8, "fmin": 0, "fmax": "None"}


def demo_config() -> dict:
    # depth 3 (layer 0 emits the U-ViT skip, layer 2 receives it) keeps the file small
    cfg = variant(depth=3)
    cfg["preprocess_params"]["spect_params"] = dict(DEMO_SPECT)
    return {"s2mel": cfg}


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/s2mel.pth in the release's training-checkpoint layout.  Stored in
    float16: the hard-coded 1280->256->128->1024 gpt_layer alone is 2 MB in float32."""
    m = build(config["s2mel"], seed=0)
    save_training_checkpoint(m, os.path.join(release_dir, "s2mel.pth"), module_prefix=None, dtype=torch.float16)
