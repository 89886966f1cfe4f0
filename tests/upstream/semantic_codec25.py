"""Tiny upstream IndexTTS-2.5 semantic codec (``EnhancedCodec``), saved as ``codec.pth``.

Upstream's ``indextts/codec/models.py`` builds, in this order, ``down`` (Conv1d k3 s2
p1), ``up`` (Conv1d k3 s1 p1), ``encoder`` and ``decoder`` (each ``Sequential(VocosBackbone,
Linear)``) and ``quantizer`` (``ResidualVQ(..., quantizer_type="fvq",
use_l2_normlize=True)``, weight-normed ``in_project``/``out_project``).  Its
``codec/kmeans/vocos.py`` and ``codec/amphion_codec/quantize/*`` are byte-identical to
the MaskGCT copies under ``utils/maskgct/`` that ``RepCodec`` uses (checked on the
index-tts repository), and RepCodec builds the same encoder, decoder and quantizer with
the same arguments.  So the full release layout is ``RepCodec``'s state dict (from
``indextts2-inference``) plus ``down``/``up``: 243 tensors at the released config.

The PyPI package ``indextts25-inference`` keeps only the decoding half (``quantizer``
without ``in_project``, ``decoder``, ``up``) and loads ``codec.pth`` with its own
``load_checkpoint`` (weight norm folded, ``strict=False`` but missing keys refused):
that is the oracle (:func:`oracle`).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from . import semantic_codec as v2

TINY = dict(v2.TINY)  # hidden_size 16 != codebook_dim 4: the projections exist


def build(config: dict | None = None, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """The full EnhancedCodec state dict (``down``, ``up``, ``encoder``, ``decoder``,
    ``quantizer``) with random weights, weight norm as ``weight_g``/``weight_v``."""
    cfg = dict(config or TINY)
    rep = v2.build(cfg, seed=seed)
    h = cfg["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    convs = resampling_convs(h)
    sd = OrderedDict()
    for name, conv in convs.items():
        sd[f"{name}.weight"] = torch.randn(conv.weight.shape, generator=g) / (h * 3) ** 0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(conv.bias.shape, generator=g)
    return release_order(sd, rep.state_dict())


def resampling_convs(hidden: int) -> dict:
    """EnhancedCodec's ``down`` (Conv1d k3 s2 p1) and ``up`` (Conv1d k3 s1 p1), in the
    current device context."""
    return {"down": torch.nn.Conv1d(hidden, hidden, kernel_size=3, stride=2, padding=1),
            "up": torch.nn.Conv1d(hidden, hidden, kernel_size=3, stride=1, padding=1)}


def release_order(convs_sd: dict, rep_sd: dict) -> "OrderedDict[str, torch.Tensor]":
    """codec.pth's ``model`` order: ``down``, ``up`` (``convs_sd``), then RepCodec's
    ``encoder``, ``decoder``, ``quantizer`` (``rep_sd``)."""
    sd = OrderedDict(convs_sd)
    for part in ("encoder.", "decoder.", "quantizer."):
        sd.update((k, v.detach().clone()) for k, v in rep_sd.items() if k.startswith(part))
    return sd


def meta_state_dict(config: dict) -> "OrderedDict[str, torch.Tensor]":
    """The release's ``model`` names, shapes and dtypes at ``config`` on the meta device
    (no memory, no init): RepCodec's state dict plus ``down``/``up``, in release order."""
    import warnings

    from omegaconf import OmegaConf

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        rep = v2.module().RepCodec(cfg=OmegaConf.create(dict(config)))
        convs = resampling_convs(int(config["hidden_size"]))
    return release_order({f"{n}.{k}": v for n, c in convs.items() for k, v in c.state_dict().items()}, rep.state_dict())


def optimizer_state(sd: dict, scale: int = 1) -> dict:
    """AdamW-like state for every parameter (exp_avg, exp_avg_sq, step) and its groups;
    ``scale`` repeats each moment tensor's size to make the state large."""
    state = {}
    for i, (k, v) in enumerate(sd.items()):
        n = v.numel() * scale
        state[i] = {"step": torch.tensor(5000.0), "exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
    return {"state": state, "param_groups": [{"lr": 2e-4, "betas": (0.8, 0.99), "eps": 1e-9, "weight_decay": 0.0,
                                               "params": list(range(len(sd)))}]}


def save_release(sd: dict, folder: str, config: dict | None = None, write_config: bool = True,
                 optimizer_scale: int = 1) -> str:
    """``folder/codec.pth`` = ``{"model": sd, "optimizer": ..., "scheduler": ..., "step": ...}``
    as a training run saves it, and a config.yaml with the semantic_codec section."""
    import yaml

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "codec.pth")
    torch.save({"model": sd, "optimizer": optimizer_state(sd, optimizer_scale),
                "scheduler": {"last_epoch": 5000, "base_lrs": [2e-4]}, "step": 5000}, path)
    if write_config:
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            yaml.safe_dump({"semantic_codec": dict(config or TINY)}, f)
    return path


def oracle(path: str, config: dict | None = None):
    """indextts25's ``EnhancedCodec(**cfg)`` loaded from ``codec.pth`` by its own
    ``load_checkpoint``, eval."""
    from converters.cli.forward import indextts25

    m = indextts25("codec.models").EnhancedCodec(**dict(config or TINY))
    m.load_checkpoint(path)
    return m.eval()


# The demo's codebook has one row per plain GPT mel code (18 codes, two of them start/stop).
DEMO = dict(v2.DEMO)


def demo_config() -> dict:
    return {"semantic_codec": dict(DEMO)}


def write_demo(release_dir: str, config: dict) -> None:
    """release_dir/codec.pth with its optimizer state (upstream: os.path.join(model_dir, "codec.pth"))."""
    save_release(build(config.get("semantic_codec", DEMO), seed=2026), release_dir, write_config=False)
