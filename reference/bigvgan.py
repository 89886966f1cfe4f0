"""BigVGAN v2 vocoder (``bigvgan.safetensors``): mel spectrogram -> waveform.

Entry point:
- ``vocode(w, mel)``: mel ``[B, num_mels, T]`` -> waveform ``[B, 1, T * prod(upsample_rates)]``
  in [-1, 1]; upstream ``BigVGAN.forward`` after ``remove_weight_norm()`` (IndexTTS-2's
  ``infer_v2`` calls ``self.bigvgan(mel)``).

Tensors (weight norm already folded; every conv has a bias unless noted):
- ``conv_pre.weight`` ``[ch0, num_mels, 7]``, ``conv_pre.bias``: input conv
- ``ups.{u}.weight`` ``[C, C/2, k_u]`` (ConvTranspose1d layout), ``ups.{u}.bias``: upsampler u,
  stride ``upsample_rates[u]``, padding ``(k_u - rate) // 2``
- ``resblocks.{r}.convs1.{c}.*`` (dilation ``resblock_dilation_sizes[r % nk][c]``) and
  ``resblocks.{r}.convs2.{c}.*`` (dilation 1): the AMP block r = stage * nk + kernel index
- ``resblocks.{r}.activations.{a}.{alpha,beta,upsample_filter,downsample_filter}``: the
  anti-aliased snake before ``convs1[a // 2]`` (a even) or ``convs2[a // 2]`` (a odd)
- ``activation_post.*``: the same for the final activation
- ``conv_post.weight`` ``[1, ch_last, 7]`` (``conv_post.bias`` when ``use_bias_at_final``)

Config: ``num_mels``, ``upsample_rates``, ``upsample_kernel_sizes``,
``resblock_kernel_sizes``, ``resblock_dilation_sizes``, ``activation`` (``snake``: alpha
also divides; ``snakebeta``: beta divides), ``snake_logscale`` (false: alpha/beta are
linear scale), ``snake_eps``, ``use_tanh_at_final`` (else clamp to [-1, 1]),
``anti_alias_ratio``, ``anti_alias_taps``, ``anti_alias_pad_mode``, ``anti_alias_up_pad``,
``anti_alias_up_trim``, ``anti_alias_down_pad``.

Activations recorded: ``conv_pre``, ``ups.{u}`` (after upsampler u and the mean of its
stage's AMP blocks), ``conv_post`` (before tanh / clamp), ``waveform``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .entry import Entry, record


def same_padding(kernel: int, dilation: int = 1) -> int:
    """Padding that keeps the length of a stride-1 conv with an odd kernel."""
    return dilation * (kernel - 1) // 2


def conv1d(x, weight, bias=None, dilation: int = 1):
    """Stride-1 'same' Conv1d; the kernel size comes from the weight."""
    return F.conv1d(x, weight, bias, padding=same_padding(weight.shape[-1], dilation), dilation=dilation)


# ------------------------------------------------------------------ anti-aliased snake


def snake(w, p: str, x: torch.Tensor) -> torch.Tensor:
    """``x + sin(alpha x)^2 / (beta + eps)`` per channel; plain snake uses alpha for beta."""
    cfg = w.config
    if cfg["snake_logscale"]:
        raise ValueError(f"{w.path}: snake_logscale is true; canonical alpha/beta are linear scale")
    alpha = w[f"{p}.alpha"][None, :, None]
    beta = w[f"{p}.beta"][None, :, None] if cfg["activation"] == "snakebeta" else alpha
    return x + (1.0 / (beta + cfg["snake_eps"])) * torch.sin(x * alpha).pow(2)


def upsample(w, filt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Anti-aliased up-sampling by ``anti_alias_ratio``: edge-pad, depthwise transposed
    conv with the filter, scale by the ratio, trim the ends."""
    cfg = w.config
    ratio = cfg["anti_alias_ratio"]
    x = F.pad(x, tuple(cfg["anti_alias_up_pad"]), mode=cfg["anti_alias_pad_mode"])
    y = ratio * F.conv_transpose1d(x, filt.expand(x.shape[1], -1, -1), stride=ratio, groups=x.shape[1])
    left, right = cfg["anti_alias_up_trim"]
    return y[..., left:y.shape[-1] - right]


def downsample(w, filt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Anti-aliased down-sampling: edge-pad, depthwise low-pass conv with stride ``anti_alias_ratio``."""
    cfg = w.config
    x = F.pad(x, tuple(cfg["anti_alias_down_pad"]), mode=cfg["anti_alias_pad_mode"])
    return F.conv1d(x, filt.expand(x.shape[1], -1, -1), stride=cfg["anti_alias_ratio"], groups=x.shape[1])


def aa_snake(w, p: str, x: torch.Tensor) -> torch.Tensor:
    """Upstream's Activation1d: up-sample, snake, down-sample (length unchanged)."""
    up_f, down_f = w[f"{p}.upsample_filter"], w[f"{p}.downsample_filter"]
    taps = w.config["anti_alias_taps"]
    if up_f.shape[-1] != taps or down_f.shape[-1] != taps:
        raise ValueError(f"{w.path}: {p} filters have {up_f.shape[-1]}/{down_f.shape[-1]} taps, config says {taps}")
    return downsample(w, down_f, snake(w, p, upsample(w, up_f, x)))


# ------------------------------------------------------------------ generator


def amp_block(w, r: int, x: torch.Tensor) -> torch.Tensor:
    """AMP block r (type 1): per dilation c, x += convs2[c](act(convs1[c](act(x))))."""
    cfg = w.config
    nk = len(cfg["resblock_kernel_sizes"])
    p = f"resblocks.{r}"
    for c, d in enumerate(cfg["resblock_dilation_sizes"][r % nk]):
        h = aa_snake(w, f"{p}.activations.{2 * c}", x)
        h = conv1d(h, w[f"{p}.convs1.{c}.weight"], w[f"{p}.convs1.{c}.bias"], dilation=d)
        h = aa_snake(w, f"{p}.activations.{2 * c + 1}", h)
        h = conv1d(h, w[f"{p}.convs2.{c}.weight"], w[f"{p}.convs2.{c}.bias"])
        x = x + h
    return x


def upsampler(w, u: int, x: torch.Tensor) -> torch.Tensor:
    """Transposed conv u: stride ``upsample_rates[u]``, output length T * rate."""
    cfg = w.config
    rate, k = cfg["upsample_rates"][u], cfg["upsample_kernel_sizes"][u]
    return F.conv_transpose1d(x, w[f"ups.{u}.weight"], w[f"ups.{u}.bias"], stride=rate, padding=(k - rate) // 2)


def vocode(w, mel: torch.Tensor, acts: dict | None = None) -> torch.Tensor:
    """Waveform ``[B, 1, T * prod(upsample_rates)]`` from mel ``[B, num_mels, T]``."""
    cfg = w.config
    if cfg["resblock"] != "1":
        raise ValueError(f"{w.path}: resblock type {cfg['resblock']!r}; only '1' (AMPBlock1) is defined")
    nk = len(cfg["resblock_kernel_sizes"])
    x = conv1d(mel, w["conv_pre.weight"], w["conv_pre.bias"])
    record(acts, "conv_pre", x)
    for u in range(len(cfg["upsample_rates"])):
        x = upsampler(w, u, x)
        blocks = amp_block(w, u * nk, x)
        for j in range(1, nk):  # the stage output is the mean of its nk AMP blocks
            blocks = blocks + amp_block(w, u * nk + j, x)
        x = blocks / nk
        record(acts, f"ups.{u}", x)
    x = aa_snake(w, "activation_post", x)
    bias = w["conv_post.bias"] if cfg["use_bias_at_final"] else None
    x = conv1d(x, w["conv_post.weight"], bias)
    record(acts, "conv_post", x)
    x = torch.tanh(x) if cfg["use_tanh_at_final"] else x.clamp(-1.0, 1.0)
    record(acts, "waveform", x)
    return x


def _mel_input(cfg, g):
    """One item of 12 frames of log-mel-like values (O(1), negative on average)."""
    return {"mel": torch.randn(1, cfg["num_mels"], 12, generator=g) - 2.0}


ENTRIES = (
    Entry("vocode", "BigVGAN.forward(mel) after remove_weight_norm() (infer_v2: self.bigvgan(mel))",
          ("mel",), ("waveform",), _mel_input,
          lambda w, acts, mel: {"waveform": vocode(w, mel, acts)}),
)
