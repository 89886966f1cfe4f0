"""BigVGAN v2 vocoder (``nvidia/bigvgan_v2_22khz_80band_256x``) -> ``bigvgan.safetensors``.

Source: ``bigvgan_generator.pt`` = ``{"generator": state_dict}`` (or a safetensors dump
of the state dict) with ``config.json`` beside it.  Upstream module:
``indextts.s2mel.modules.bigvgan.bigvgan.BigVGAN`` (the same as PyPI ``bigvgan``).

Canonical form:
- every weight-normed conv is folded (``dim=0``; for the ``ConvTranspose1d``
  upsamplers that is the input-channel dim) and named ``<layer>.weight``
- the nested ``ups.{u}.0`` becomes ``ups.{u}``
- snake/snake-beta ``alpha``/``beta`` are stored in linear scale (``exp`` applied when
  the source config has ``snake_logscale: true``); the metadata then says
  ``snake_logscale: false``
- the anti-alias low-pass filters are kept per activation, as upstream stores them
"""

from __future__ import annotations

from ..io.configs import load_json, require
from ..errors import ConvertError
from ..format.table import Drop, row, wn


# Constants of upstream's Activation1d (alias_free_activation/torch/act.py): 2x
# up-sampling and 2x down-sampling with 12-tap Kaiser-windowed sinc filters.
ANTI_ALIAS_RATIO = 2
ANTI_ALIAS_TAPS = 12
SNAKE_EPS = 1e-9


def anti_alias_padding(ratio: int, taps: int) -> dict:
    """The edge handling of upstream's UpSample1d / DownSample1d (resample.py, filter.py)
    for ``taps``-tap filters, written out so a runtime need not re-derive it:

    - up: replicate-pad ``anti_alias_up_pad`` samples each side, transposed conv (stride
      ``ratio``) times ``ratio``, then drop ``anti_alias_up_trim`` samples from each end
    - down: replicate-pad ``anti_alias_down_pad`` samples, strided (``ratio``) conv
    """
    pad = taps // ratio - 1
    even = int(taps % 2 == 0)
    return {
        "anti_alias_taps": taps,
        "anti_alias_pad_mode": "replicate",
        "anti_alias_up_pad": [pad, pad],
        "anti_alias_up_trim": [pad * ratio + (taps - ratio) // 2, pad * ratio + (taps - ratio + 1) // 2],
        "anti_alias_down_pad": [taps // 2 - even, taps // 2],
    }


DROPS: list[Drop] = []


def load_config(path: str) -> dict:
    return load_json(path)


def runtime_config(raw: dict, path: str) -> dict:
    """The hyperparameters a runtime needs, with upstream's defaults made explicit."""
    need = ("num_mels", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
            "resblock", "resblock_kernel_sizes", "resblock_dilation_sizes", "activation", "snake_logscale")
    require(raw, need, path, "BigVGAN")
    if str(raw["resblock"]) != "1":
        raise ConvertError(f"{path}: resblock type {raw['resblock']!r} is not supported (BigVGAN v2 uses type '1')")
    if raw["activation"] not in ("snake", "snakebeta"):
        raise ConvertError(f"{path}: activation {raw['activation']!r} is not snake or snakebeta")
    if len(raw["upsample_rates"]) != len(raw["upsample_kernel_sizes"]):
        raise ConvertError(f"{path}: upsample_rates and upsample_kernel_sizes differ in length")
    if len(raw["resblock_kernel_sizes"]) != len(raw["resblock_dilation_sizes"]):
        raise ConvertError(f"{path}: resblock_kernel_sizes and resblock_dilation_sizes differ in length")
    cfg = {k: raw[k] for k in need}
    cfg["resblock"] = "1"
    cfg["source_snake_logscale"] = bool(raw["snake_logscale"])
    cfg["snake_logscale"] = False  # canonical alpha/beta are linear scale
    cfg["snake_eps"] = SNAKE_EPS
    cfg["use_tanh_at_final"] = bool(raw.get("use_tanh_at_final", True))
    cfg["use_bias_at_final"] = bool(raw.get("use_bias_at_final", True))
    cfg["anti_alias_ratio"] = ANTI_ALIAS_RATIO
    cfg.update(anti_alias_padding(ANTI_ALIAS_RATIO, ANTI_ALIAS_TAPS))
    for k in ("sampling_rate", "hop_size", "n_fft", "win_size", "fmin", "fmax"):
        if k in raw:
            cfg[k] = raw[k]
    return cfg


def _snake(canon: str, src: str, cfg: dict, beta: bool) -> list:
    scale = "exp" if cfg["source_snake_logscale"] else "copy"
    rows = [row(f"{canon}.alpha", scale, f"{src}.act.alpha")]
    if beta:
        rows.append(row(f"{canon}.beta", scale, f"{src}.act.beta"))
    rows += [
        row(f"{canon}.upsample_filter", "copy", f"{src}.upsample.filter"),
        row(f"{canon}.downsample_filter", "copy", f"{src}.downsample.lowpass.filter"),
    ]
    return rows


def table(cfg: dict):
    nk = len(cfg["resblock_kernel_sizes"])
    beta = cfg["activation"] == "snakebeta"
    rows = [
        wn("conv_pre.weight", "conv_pre", 0),
        row("conv_pre.bias", "copy", "conv_pre.bias"),
        wn("ups.{u}.weight", "ups.{u}.0", 0),
        row("ups.{u}.bias", "copy", "ups.{u}.0.bias"),
        wn("resblocks.{r}.convs1.{c}.weight", "resblocks.{r}.convs1.{c}", 0),
        row("resblocks.{r}.convs1.{c}.bias", "copy", "resblocks.{r}.convs1.{c}.bias"),
        wn("resblocks.{r}.convs2.{c}.weight", "resblocks.{r}.convs2.{c}", 0),
        row("resblocks.{r}.convs2.{c}.bias", "copy", "resblocks.{r}.convs2.{c}.bias"),
        *_snake("resblocks.{r}.activations.{a}", "resblocks.{r}.activations.{a}", cfg, beta),
        *_snake("activation_post", "activation_post", cfg, beta),
        wn("conv_post.weight", "conv_post", 0),
    ]
    if cfg["use_bias_at_final"]:
        rows.append(row("conv_post.bias", "copy", "conv_post.bias"))
    loops = {
        "u": len(cfg["upsample_rates"]),
        "r": len(cfg["upsample_rates"]) * nk,
        "c": lambda b: len(cfg["resblock_dilation_sizes"][b["r"] % nk]),
        "a": lambda b: 2 * len(cfg["resblock_dilation_sizes"][b["r"] % nk]),
    }
    return rows, loops
