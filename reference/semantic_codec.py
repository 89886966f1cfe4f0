"""MaskGCT semantic codec (``semantic_codec.safetensors``): the RepCodec encoder and
residual factorized vector quantizer that IndexTTS-2 runs on its w2v-bert features.

Tensors (``{i}`` = ConvNeXt block ``0 .. vocos_num_layers - 1``, ``{q}`` = quantizer
``0 .. num_quantizers - 1``):
- ``encoder.0.embed.{weight,bias}`` ``[vocos_dim, hidden_size, embed_kernel_size]``: input
  Conv1d ("same" padding), then ``encoder.0.norm`` (LayerNorm over channels)
- ``encoder.0.convnext.{i}.``: ``dwconv`` (depthwise Conv1d, "same" padding, with bias),
  ``norm`` (LayerNorm), ``pwconv1`` (Linear up, exact GELU), ``pwconv2`` (Linear down),
  ``gamma`` (per-channel layer scale): ``x + gamma * pwconv2(gelu(pwconv1(norm(dwconv(x)))))``
- ``encoder.0.final_layer_norm``, then ``encoder.1`` (Linear ``vocos_dim -> hidden_size``)
- ``quantizer.quantizers.{q}.codebook.weight`` ``[codebook_size, codebook_dim]``, and when
  ``has_projections``: ``in_project`` (Linear ``hidden_size -> codebook_dim``) and
  ``out_project`` (Linear ``codebook_dim -> hidden_size``); without them both are identities

Config: ``hidden_size``, ``codebook_dim``, ``vocos_dim``, ``vocos_num_layers``,
``num_quantizers``, ``has_projections``, ``use_l2_normalize``, ``l2_normalize_eps``,
``layer_norm_eps``, ``embed_kernel_size``, ``dwconv_kernel_size``, ``activation``.

Code search (per quantizer, per frame): ``e = in_project(residual)``; with
``use_l2_normalize`` both ``e`` and every codebook row are scaled to unit length
(``v / max(|v|, l2_normalize_eps)``); the code is the row with the smallest squared
distance ``|e|^2 - 2 e.c + |c|^2`` (first one on a tie).  The quantized vector is
``out_project`` of the RAW (unnormalised) codebook row; the next quantizer sees
``residual - quantized``.

Entry points (layouts as upstream returns them):
- ``quantize(w, x)``: ``x`` ``[B, T, hidden_size]`` (IndexTTS-2's normalised w2v-bert
  features) -> ``codes`` int64 ``[B, T]`` (``[num_quantizers, B, T]`` when there is more than
  one quantizer) and ``quantized`` ``[B, T, hidden_size]`` (sum over quantizers).
  Upstream: ``RepCodec.quantize(x)``.
- ``vq2emb(w, codes)``: ``codes`` int64 ``[1, T]`` (the GPT's codes) -> ``emb``
  ``[1, hidden_size, T]`` (channels first).  Upstream: infer_v2's
  ``semantic_codec.quantizer.vq2emb(codes.unsqueeze(1))``, i.e. ``ResidualVQ.vq2emb`` on
  ``[num_quantizers, B, T]`` codes (:func:`codes_to_embedding`).

IndexTTS-2.5 files (metadata ``family_version`` 2.5, schema ``semantic-codec@2.5``;
``EnhancedCodec``, ``codec.pth``) hold the decoding half instead: ``decoder.0`` (the same
Vocos backbone), ``decoder.1``, the quantizers' ``codebook`` and ``out_project``, and ``up``
(Conv1d, kernel ``up_kernel_size``, "same" padding).  Entry points (``ENTRIES_2_5``):

- ``vq2emb(w, codes [1, T])`` -> ``emb [1, hidden_size, T]``: as in 2.0.
- ``decode(w, codes [B, T])`` -> ``features [B, upsample_factor * T, hidden_size]``:
  ``vq2emb``, the decoder backbone and Linear, each frame repeated ``upsample_factor``
  times (nearest), then ``up``.  Upstream ``EnhancedCodec.decode(codes)``, what
  infer_v2_5 runs on the GPT's codes (``S_infer``).  Activations: ``decoder.embed``,
  ``decoder.convnext.<i>``, ``decoder``, ``upsampled``, all ``[B, T, C]``.

Activations recorded: ``encoder.embed`` (after the input conv and norm),
``encoder.convnext.<i>`` (output of block i), ``encoder`` (the quantizer input), all
``[B, T, C]`` (time before channels, unlike upstream's ``[B, C, T]`` blocks), and
``quantizer.<q>.codes``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .entry import Entry, record

ACTIVATIONS = {"gelu": F.gelu}  # nn.GELU(): the exact erf form


def layer_norm(w, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[f"{prefix}.weight"], w[f"{prefix}.bias"], w.config["layer_norm_eps"])


def linear(w, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"])


def conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Conv1d over time for ``x`` ``[B, T, C_in]`` with odd kernel, output length T:
    returns ``[B, T, C_out]``."""
    k = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=k // 2, groups=groups)
    return y.transpose(1, 2)


def convnext_block(w, prefix: str, x: torch.Tensor) -> torch.Tensor:
    act = ACTIVATIONS[w.config["activation"]]
    h = conv_same(x, w[f"{prefix}.dwconv.weight"], w[f"{prefix}.dwconv.bias"], groups=w.config["vocos_dim"])
    h = layer_norm(w, f"{prefix}.norm", h)
    h = linear(w, f"{prefix}.pwconv2", act(linear(w, f"{prefix}.pwconv1", h)))
    return x + w[f"{prefix}.gamma"] * h


def backbone(w, stack: str, x: torch.Tensor, acts: dict | None = None) -> torch.Tensor:
    """The Vocos backbone ``<stack>.0`` plus output Linear ``<stack>.1``:
    ``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``."""
    h = conv_same(x, w[f"{stack}.0.embed.weight"], w[f"{stack}.0.embed.bias"])
    h = layer_norm(w, f"{stack}.0.norm", h)
    record(acts, f"{stack}.embed", h)
    for i in range(w.config["vocos_num_layers"]):
        h = convnext_block(w, f"{stack}.0.convnext.{i}", h)
        record(acts, f"{stack}.convnext.{i}", h)
    h = layer_norm(w, f"{stack}.0.final_layer_norm", h)
    h = linear(w, f"{stack}.1", h)
    record(acts, stack, h)
    return h


def encode(w, x: torch.Tensor, acts: dict | None = None) -> torch.Tensor:
    """The encoder backbone (2.0): ``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``."""
    return backbone(w, "encoder", x, acts)


def in_project(w, q: int, x: torch.Tensor) -> torch.Tensor:
    return linear(w, f"quantizer.quantizers.{q}.in_project", x) if w.config["has_projections"] else x


def out_project(w, q: int, x: torch.Tensor) -> torch.Tensor:
    return linear(w, f"quantizer.quantizers.{q}.out_project", x) if w.config["has_projections"] else x


def nearest_codes(w, q: int, e: torch.Tensor) -> torch.Tensor:
    """Code indices ``[B, T]`` (int64) for projected vectors ``e`` ``[B, T, codebook_dim]``."""
    cfg = w.config
    codebook = w[f"quantizer.quantizers.{q}.codebook.weight"]
    flat = e.reshape(-1, e.shape[-1])
    if cfg["use_l2_normalize"]:
        flat = F.normalize(flat, dim=1, eps=cfg["l2_normalize_eps"])
        codebook = F.normalize(codebook, dim=1, eps=cfg["l2_normalize_eps"])
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * (flat @ codebook.t()) + codebook.pow(2).sum(1)[None, :]
    return dist.argmin(1).view(e.shape[:-1])


def code_embedding(w, q: int, codes: torch.Tensor) -> torch.Tensor:
    """``out_project(codebook[codes])``: ``[..., T]`` -> ``[..., T, hidden_size]``."""
    return out_project(w, q, w[f"quantizer.quantizers.{q}.codebook.weight"][codes])


def residual_quantize(w, z: torch.Tensor, acts: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` ``[B, T, hidden_size]`` -> (codes ``[num_quantizers, B, T]``, quantized ``[B, T, hidden_size]``)."""
    residual, total, codes = z, torch.zeros_like(z), []
    for q in range(w.config["num_quantizers"]):
        c = nearest_codes(w, q, in_project(w, q, residual))
        record(acts, f"quantizer.{q}.codes", c)
        zq = code_embedding(w, q, c)
        total = total + zq
        residual = residual - zq
        codes.append(c)
    return torch.stack(codes), total


def quantize(w, x: torch.Tensor, acts: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``RepCodec.quantize``: (codes, quantized ``[B, T, hidden_size]``); codes are
    ``[B, T]`` with one quantizer, else ``[num_quantizers, B, T]``."""
    codes, quantized = residual_quantize(w, encode(w, x, acts), acts)
    if codes.shape[0] == 1:
        codes = codes[0]
    record(acts, "quantized", quantized)
    return codes, quantized


def codes_to_embedding(w, codes: torch.Tensor) -> torch.Tensor:
    """``ResidualVQ.vq2emb``: codes ``[N, B, T]`` (N >= num_quantizers) -> ``[B, hidden_size, T]``,
    the sum over quantizers of ``out_project(codebook[codes[q]])``."""
    emb = sum(code_embedding(w, q, codes[q]) for q in range(w.config["num_quantizers"]))
    return emb.transpose(1, 2)


def vq2emb(w, codes: torch.Tensor, acts: dict | None = None) -> torch.Tensor:
    """infer_v2's ``quantizer.vq2emb(codes.unsqueeze(1))`` for the GPT's codes ``[1, T]``:
    returns ``[1, hidden_size, T]``."""
    emb = codes_to_embedding(w, codes.unsqueeze(1))
    record(acts, "emb", emb)
    return emb


def decode(w, codes: torch.Tensor, acts: dict | None = None) -> torch.Tensor:
    """2.5 ``EnhancedCodec.decode``: codes ``[B, T]`` -> ``[B, upsample_factor * T, hidden_size]``."""
    cfg = w.config
    if cfg["upsample_mode"] != "nearest":
        raise ValueError(f"semantic-codec: config upsample_mode = {cfg['upsample_mode']!r}; this reference implements 'nearest' only")
    emb = codes_to_embedding(w, codes.unsqueeze(0)).transpose(1, 2)  # [B, T, hidden_size]
    h = backbone(w, "decoder", emb, acts)
    h = h.repeat_interleave(cfg["upsample_factor"], dim=1)  # nearest-neighbour upsampling over time
    record(acts, "upsampled", h)
    return conv_same(h, w["up.weight"], w["up.bias"])


def _features(cfg, g):
    return {"x": torch.randn(2, 24, cfg["hidden_size"], generator=g)}


def _codes(cfg, g):
    return {"codes": torch.randint(0, cfg["codebook_size"], (1, 24), generator=g, dtype=torch.int64)}


def _run_quantize(w, acts, x):
    codes, quantized = quantize(w, x, acts)
    return {"codes": codes, "quantized": quantized}


ENTRIES = (
    Entry("quantize", "RepCodec.quantize(x) -> (codes, quantized_out.transpose(1, 2))",
          ("x",), ("codes", "quantized"), _features, _run_quantize),
    Entry("vq2emb", "indextts/infer_v2.py: semantic_codec.quantizer.vq2emb(codes.unsqueeze(1))",
          ("codes",), ("emb",), _codes, lambda w, acts, codes: {"emb": vq2emb(w, codes, acts)}),
)


def _batch_codes(cfg, g):
    return {"codes": torch.randint(0, cfg["codebook_size"], (2, 12), generator=g, dtype=torch.int64)}


ENTRIES_2_5 = (
    ENTRIES[1],  # vq2emb
    Entry("decode", "IndexTTS-2.5 EnhancedCodec.decode(codes): quantizer.vq2emb, decoder, F.interpolate(scale_factor=2, "
          "mode='nearest'), up; infer_v2_5's S_infer = semantic_codec.decode(codes)",
          ("codes",), ("features",), _batch_codes, lambda w, acts, codes: {"features": decode(w, codes, acts)}),
)
