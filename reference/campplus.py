"""CAMPPlus speaker encoder (``campplus.safetensors``): fbank features -> style embedding.

Entry point:
- ``embed(w, feat)``: mean-normalised Kaldi fbank ``[B, T, feat_dim]`` -> style embedding
  ``[B, embedding_size]``; upstream ``CAMPPlus.forward`` in eval mode (IndexTTS-2's
  ``infer_v2``: ``campplus_model(feat.unsqueeze(0))``).

Every conv below is plain ``conv(x, weight, bias)``: batch norms after bias-free convs are
already folded into them (the conv gains a bias).  Tensors (names 1-based as upstream):
- head (2-D, over ``[B, 1, feat_dim, T]``): ``head.conv1.*`` (3x3, then ReLU);
  ``head.layer{s}.{k}.conv1.*`` / ``.conv2.*`` (3x3) and, for k == 0,
  ``head.layer{s}.{k}.shortcut.0.*`` (1x1): a residual block, the first of each stage
  striding the frequency axis by ``head_freq_strides[s-1]``; ``head.conv2.*`` (3x3,
  frequency stride ``head_conv2_freq_stride``, then ReLU)
- ``xvector.tdnn.linear.*``: Conv1d kernel ``tdnn_kernel_size``, stride ``tdnn_stride``, then ReLU
- ``xvector.block{b}.tdnnd{l}.*``: dense layer l of block b: carried batch norm
  ``nonlinear1.batchnorm.{weight,bias,running_mean,running_var}`` + ReLU, ``linear1.*``
  (1x1, + ReLU), then the context-aware mask ``cam_layer.{linear_local,linear1,linear2}``
- ``xvector.transit{t}.nonlinear.batchnorm.*`` (carried) + ReLU, ``xvector.transit{t}.linear.weight``
  (1x1; the last one has a ``.bias`` from the folded ``out_nonlinear`` norm and a ReLU follows)
- ``xvector.dense.linear.*``: 1x1 conv on the pooled statistics -> embedding

Config: ``head_freq_strides``, ``head_conv2_freq_stride``, ``tdnn_stride``,
``block_layers``, ``block_dilations``, ``cam_seg_len``, ``bn_eps``, ``nonlinearity``
(``relu``), ``stats_pool``.

Activations recorded: ``head`` ``[B, head_out_channels, T]``, ``xvector.tdnn``,
``xvector.block{b}`` (block output, all concatenated features), ``xvector.transit{t}``
(the transit conv's output; for the last transit that is ``out_nonlinear``'s batch norm
output, the norm being folded in), ``xvector.out_nonlinear`` (after its ReLU),
``xvector.stats``, ``embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .entry import Entry, record


def batch_norm(w, p: str, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm1d over channels of ``[B, C, T]`` from its carried tensors."""
    mean, var = w[f"{p}.running_mean"][:, None], w[f"{p}.running_var"][:, None]
    scale, shift = w[f"{p}.weight"][:, None], w[f"{p}.bias"][:, None]
    return (x - mean) / torch.sqrt(var + w.config["bn_eps"]) * scale + shift


def conv2d(w, p: str, x: torch.Tensor, freq_stride: int = 1) -> torch.Tensor:
    """Conv2d over [B, C, freq, time] with 'same' padding, striding only frequency."""
    k = w[f"{p}.weight"].shape[-1]
    return F.conv2d(x, w[f"{p}.weight"], w[f"{p}.bias"], stride=(freq_stride, 1), padding=k // 2)


def conv1d(w, p: str, x: torch.Tensor, stride: int = 1, dilation: int = 1, bias: bool = True) -> torch.Tensor:
    """Conv1d with 'same' padding ((k - 1) // 2 * dilation); ``bias=False`` for the bias-free ones."""
    weight = w[f"{p}.weight"]
    pad = (weight.shape[-1] - 1) // 2 * dilation
    return F.conv1d(x, weight, w[f"{p}.bias"] if bias else None, stride=stride, padding=pad, dilation=dilation)


# ------------------------------------------------------------------ head (FCM)


def res_block(w, p: str, x: torch.Tensor, freq_stride: int, has_shortcut: bool) -> torch.Tensor:
    """BasicResBlock: relu(conv2(relu(conv1(x))) + shortcut(x))."""
    h = F.relu(conv2d(w, f"{p}.conv1", x, freq_stride))
    h = conv2d(w, f"{p}.conv2", h)
    skip = conv2d(w, f"{p}.shortcut.0", x, freq_stride) if has_shortcut else x
    return F.relu(h + skip)


def head(w, feat: torch.Tensor) -> torch.Tensor:
    """``[B, T, feat_dim]`` -> ``[B, m_channels * feat_dim // 8, T]``."""
    cfg = w.config
    x = feat.transpose(1, 2).unsqueeze(1)  # [B, 1, feat_dim, T]
    x = F.relu(conv2d(w, "head.conv1", x))
    for s, (n, stride) in enumerate(zip(cfg["head_num_blocks"], cfg["head_freq_strides"]), start=1):
        for k in range(n):  # the first block of a stage strides and has a 1x1 shortcut
            x = res_block(w, f"head.layer{s}.{k}", x, stride if k == 0 else 1, has_shortcut=k == 0)
    x = F.relu(conv2d(w, "head.conv2", x, cfg["head_conv2_freq_stride"]))
    b, c, f, t = x.shape
    return x.reshape(b, c * f, t)  # channel-major: row c * f_out + f


# ------------------------------------------------------------------ x-vector (D-TDNN)


def segment_means(x: torch.Tensor, seg_len: int) -> torch.Tensor:
    """Each frame replaced by the mean of its segment of ``seg_len`` frames (the last,
    possibly shorter, segment averages only the frames it has)."""
    parts = []
    for start in range(0, x.shape[-1], seg_len):
        seg = x[..., start:start + seg_len]
        parts.append(seg.mean(-1, keepdim=True).expand_as(seg))
    return torch.cat(parts, dim=-1)


def cam(w, p: str, x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Context-aware masking: local dilated conv times a sigmoid gate computed from the
    utterance mean plus the segment means."""
    local = conv1d(w, f"{p}.linear_local", x, dilation=dilation, bias=False)
    context = x.mean(-1, keepdim=True) + segment_means(x, w.config["cam_seg_len"])
    gate = torch.sigmoid(conv1d(w, f"{p}.linear2", F.relu(conv1d(w, f"{p}.linear1", context))))
    return local * gate


def dense_layer(w, p: str, x: torch.Tensor, dilation: int) -> torch.Tensor:
    """One CAM dense layer: its growth_rate new channels."""
    h = F.relu(batch_norm(w, f"{p}.nonlinear1.batchnorm", x))
    h = F.relu(conv1d(w, f"{p}.linear1", h))  # nonlinear2's norm folded in
    return cam(w, f"{p}.cam_layer", h, dilation)


def stats_pool(w, x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T]`` -> ``[B, 2C]``: mean and unbiased standard deviation over time."""
    if w.config["stats_pool"] != "concat(mean over time, unbiased std over time)":
        raise ValueError(f"{w.path}: unknown stats_pool {w.config['stats_pool']!r}")
    return torch.cat([x.mean(-1), x.std(-1, unbiased=True)], dim=-1)


def embed(w, feat: torch.Tensor, acts: dict | None = None) -> torch.Tensor:
    """Style embedding ``[B, embedding_size]`` from fbank ``[B, T, feat_dim]``."""
    cfg = w.config
    if cfg["nonlinearity"] != "relu":
        raise ValueError(f"{w.path}: nonlinearity {cfg['nonlinearity']!r}; only 'relu' is defined")
    x = head(w, feat)
    record(acts, "head", x)
    x = F.relu(conv1d(w, "xvector.tdnn.linear", x, stride=cfg["tdnn_stride"]))
    record(acts, "xvector.tdnn", x)
    nb = len(cfg["block_layers"])
    for b in range(1, nb + 1):
        for l in range(1, cfg["block_layers"][b - 1] + 1):  # noqa: E741
            new = dense_layer(w, f"xvector.block{b}.tdnnd{l}", x, cfg["block_dilations"][b - 1])
            x = torch.cat([x, new], dim=1)
        record(acts, f"xvector.block{b}", x)
        t = f"xvector.transit{b}"
        x = F.relu(batch_norm(w, f"{t}.nonlinear.batchnorm", x))
        x = conv1d(w, f"{t}.linear", x, bias=b == nb)  # the last carries out_nonlinear's norm
        record(acts, t, x)
    x = F.relu(x)  # out_nonlinear's ReLU
    record(acts, "xvector.out_nonlinear", x)
    stats = stats_pool(w, x)
    record(acts, "xvector.stats", stats)
    dense = w["xvector.dense.linear.weight"]  # [embedding_size, 2C, 1]
    e = F.linear(stats, dense[:, :, 0], w["xvector.dense.linear.bias"])
    record(acts, "embedding", e)
    return e


def _fbank_input(cfg, g):
    """One utterance of 80 frames (0.8 s at Kaldi's 10 ms shift), mean-normalised over time."""
    x = torch.randn(1, 80, cfg["feat_dim"], generator=g) * 2.0
    return {"feat": x - x.mean(dim=1, keepdim=True)}


ENTRIES = (
    Entry("embed", "CAMPPlus.forward(feat) in eval mode (infer_v2: campplus_model(feat.unsqueeze(0)))",
          ("feat",), ("style",), _fbank_input,
          lambda w, acts, feat: {"style": embed(w, feat, acts)}),
)
