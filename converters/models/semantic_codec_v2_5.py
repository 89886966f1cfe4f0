"""IndexTTS-2.5 semantic codec (``EnhancedCodec``, ``indextts/codec/models.py``) ->
``semantic_codec.safetensors`` (schema section ``semantic-codec@2.5``).

Source: the release's ``codec.pth``, ``{"model": state_dict}`` (243 tensors at the
released config: encoder, down, quantizer, up, decoder) beside the optimizer state of
training, about 400 MB, which :mod:`sources` lists as dropped and never reads (the
checkpoint is memory-mapped; only the tensors a row asks for are touched).
Hyperparameters: the ``semantic_codec:`` section of ``config.yaml`` beside it (upstream:
``EnhancedCodec(**cfg.semantic_codec, cfg=cfg.semantic_codec)``; ``downsample_scale`` and
``num_quantizers`` default to 2 and 1).

What IndexTTS-2.5 runs (``infer_v2_5.py``): ``semantic_codec.decode(codes)`` on the GPT's
codes, and nothing else (its ``quantize`` call is commented out: the speaker prompt's
w2v-bert features go to the length regulator directly).  ``decode`` is
``quantizer.vq2emb(codes)`` (codebook lookup, ``out_project``), the ``decoder`` (a Vocos
backbone and a Linear, as the 2.0 RepCodec's encoder), nearest-neighbour upsampling by
2 (``F.interpolate(scale_factor=2)``, hard-coded) and the ``up`` Conv1d (kernel 3,
padding 1): codes ``[B, T]`` at 25 Hz -> features ``[B, 2T, hidden_size]`` at 50 Hz.

Canonical form (upstream module paths kept):
- ``decoder.0`` (``embed``, ``norm``, ``convnext.{i}``, ``final_layer_norm``), ``decoder.1``
- each quantizer's ``out_project`` (weight-normed kernel-1 Conv1d, ``weight_g``/``weight_v``,
  dim 0) folded and squeezed to a linear ``[hidden_size, codebook_dim]``; ``codebook`` raw
- ``up`` as stored (``[hidden_size, hidden_size, 3]``)
- dropped: ``encoder.*``, ``down.*`` and each quantizer's ``in_project`` (only ``quantize``
  and the training ``forward`` run them)
"""

from __future__ import annotations

from . import semantic_codec as v2
from ..errors import ConvertError
from ..format.config_dims import Dim
from ..format.table import Drop, row, wn

load_config = v2.load_config
SECTION = v2.SECTION
RELEASE_VALUES = v2.RELEASE_VALUES  # the same released section as 2.0's
CONFIG_DIMS = [*v2.codec_dims("decoder"), Dim("hidden_size", "up.weight", 0)]

# EnhancedCodec's constructor defaults (for keys the config section leaves out).
DEFAULTS = {**v2.DEFAULTS, "downsample_scale": 2}
UPSAMPLE_FACTOR = 2  # decode: F.interpolate(x, scale_factor=2, mode="nearest"), whatever downsample_scale says
UP_KERNEL = 3  # self.up = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, stride=1, padding=1)

_TRAINING_ONLY = ("only EnhancedCodec.quantize and the training forward run it; IndexTTS-2.5 calls decode(codes), "
                  "which never touches it")
DROPS: list[Drop] = [
    Drop(r"encoder\..*", f"codec encoder (Vocos backbone + Linear): {_TRAINING_ONLY}"),
    Drop(r"down\.(weight|bias)", f"stride-2 downsampling conv in front of the encoder: {_TRAINING_ONLY}"),
    Drop(r"quantizer\.quantizers\.\d+\.in_project\.(weight|weight_g|weight_v|bias|parametrizations\.weight\.original[01])",
         f"the quantizer's input projection (the nearest-code search): {_TRAINING_ONLY}"),
]


def runtime_config(raw: dict, path: str) -> dict:
    """EnhancedCodec's hyperparameters as its constructor resolves them from the section
    (each key read when present, else the constructor default)."""
    cfg = {k: raw.get(k, d) for k, d in DEFAULTS.items()}
    for k, v in cfg.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConvertError(f"{path}: semantic_codec.{k} is {v!r}, expected a positive int")
    if cfg["downsample_scale"] <= 1:
        raise ConvertError(f"{path}: semantic_codec.downsample_scale is {cfg['downsample_scale']}; EnhancedCodec.decode "
                           "needs the up conv, which exists only when downsample_scale > 1 (IndexTTS-2.5's is 2)")
    cfg.update({
        "quantizer_type": "fvq",
        "has_projections": cfg["hidden_size"] != cfg["codebook_dim"],
        "layer_norm_eps": v2.LAYER_NORM_EPS,
        "embed_kernel_size": v2.EMBED_KERNEL,
        "dwconv_kernel_size": v2.DWCONV_KERNEL,
        "activation": "gelu",
        "upsample_factor": UPSAMPLE_FACTOR,
        "upsample_mode": "nearest",
        "up_kernel_size": UP_KERNEL,
    })
    return cfg


def table(cfg: dict):
    rows = v2.vocos_rows("decoder.0")
    rows += [
        row("decoder.1.weight", "copy", "decoder.1.weight"),
        row("decoder.1.bias", "copy", "decoder.1.bias"),
        row("quantizer.quantizers.{q}.codebook.weight", "copy", "quantizer.quantizers.{q}.codebook.weight"),
        row("up.weight", "copy", "up.weight"),
        row("up.bias", "copy", "up.bias"),
    ]
    if cfg["has_projections"]:
        q = "quantizer.quantizers.{q}.out_project"
        rows += [wn(f"{q}.weight", q, 0, then="squeeze(dim=2)"), row(f"{q}.bias", "copy", f"{q}.bias")]
    return rows, {"i": cfg["vocos_num_layers"], "q": cfg["num_quantizers"]}
