"""MaskGCT semantic codec (``amphion/MaskGCT``, ``semantic_codec/model.safetensors``)
-> ``semantic_codec.safetensors``.

Source: the Hugging Face cache file ``semantic_codec/model.safetensors`` (a ``RepCodec``
state dict, ``safetensors.torch.load_model``'s layout), with hyperparameters from the
``semantic_codec:`` section of IndexTTS-2's ``config.yaml`` (not beside the source: pass
``--config <release>/config.yaml``).  Upstream class:
``indextts.utils.maskgct.models.codec.kmeans.repcodec_model.RepCodec``.

What IndexTTS-2 runs (``infer_v2.py``): ``semantic_codec.quantize(feat)`` on the
normalised w2v-bert features (the encoder, then the residual quantizer; it keeps the
quantized embedding) and ``semantic_codec.quantizer.vq2emb(codes)`` on the GPT's codes
(codebook lookup, then ``out_project``).  It never calls ``forward``, so the decoder is
never run.

Canonical form (upstream module paths kept):
- ``encoder.0`` is the Vocos backbone (``embed`` Conv1d k=7 pad 3, LayerNorm ``norm``,
  ConvNeXt blocks, ``final_layer_norm``), ``encoder.1`` the Linear to ``hidden_size``
- each quantizer's ``in_project``/``out_project`` (weight-normed kernel-1 Conv1d, torch's
  old ``weight_norm``, dim 0) is folded and squeezed to a linear ``[out, in]``; when
  ``hidden_size == codebook_dim`` upstream uses identities and there are none
- ``codebook.weight`` is kept as is (``[codebook_size, codebook_dim]``): ``vq2emb`` looks
  up raw rows; the nearest-code search L2-normalises both the projected input and the
  codebook (``F.normalize``, eps 1e-12) and takes the row of highest cosine similarity
- dropped: every ``decoder.*`` tensor (the decoder reconstructs w2v-bert features from
  codes in ``RepCodec.forward``, which IndexTTS-2 never calls)

Refused: ``downsample_scale > 1`` (adds a stride-2 ``down`` conv in front of the encoder;
neither MaskGCT's codec nor IndexTTS-2 uses it).
"""

from __future__ import annotations

from ..io.configs import load_yaml_section
from ..errors import ConvertError
from ..format.config_dims import Dim
from ..format.table import Drop, row, wn


# RepCodec's constructor defaults (used for keys the config section leaves out).
DEFAULTS = {"codebook_size": 8192, "hidden_size": 1024, "codebook_dim": 8, "vocos_dim": 384,
            "vocos_intermediate_dim": 2048, "vocos_num_layers": 12, "num_quantizers": 1, "downsample_scale": 1}
# Constants of upstream's VocosBackbone / ConvNeXtBlock / FactorizedVectorQuantize.
LAYER_NORM_EPS = 1e-6
DWCONV_KERNEL = 7
EMBED_KERNEL = 7
L2_NORMALIZE_EPS = 1e-12

DROPS: list[Drop] = [
    Drop(r"decoder\..*",
         "RepCodec decoder: only RepCodec.forward (training reconstruction) runs it; IndexTTS-2 calls "
         "quantize() and quantizer.vq2emb(), which never touch it"),
]


SECTION = "semantic_codec"
# The released semantic_codec: sections are the same in IndexTTS-2.0 and 2.5 (8192, 1024,
# 8, 384, 2048, 12, no downsample_scale): no value tells a release.
RELEASE_VALUES: dict = {}


def codec_dims(backbone: str) -> list[Dim]:
    """Config keys -> the checkpoint tensors they size, for the Vocos backbone + Linear at
    ``backbone`` (``encoder``; 2.5's ``decoder``) and the first quantizer."""
    q = "quantizer.quantizers.0.codebook.weight"
    return [
        Dim("codebook_size", q, 0),
        Dim("codebook_dim", q, 1),
        Dim("hidden_size", f"{backbone}.1.weight", 0),  # Linear(vocos_dim, hidden_size)
        Dim("hidden_size", f"{backbone}.0.embed.weight", 1),  # Conv1d(hidden_size, vocos_dim, 7)
        Dim("vocos_dim", f"{backbone}.0.embed.weight", 0),
        Dim("vocos_intermediate_dim", f"{backbone}.0.convnext.0.pwconv1.weight", 0),
    ]


CONFIG_DIMS = codec_dims("encoder")


def load_config(path: str) -> dict:
    return load_yaml_section(path, SECTION)


def runtime_config(raw: dict, path: str) -> dict:
    """RepCodec's hyperparameters as upstream resolves them from the config section."""
    cfg = {}
    for k, default in DEFAULTS.items():
        cfg[k] = raw.get(k, default)
    # Upstream reads vocos_intermediate_dim and vocos_num_layers only when the section
    # has vocos_dim (repcodec_model.py checks hasattr(cfg, "vocos_dim") for both).
    if "vocos_dim" not in raw:
        cfg["vocos_intermediate_dim"] = DEFAULTS["vocos_intermediate_dim"]
        cfg["vocos_num_layers"] = DEFAULTS["vocos_num_layers"]
    for k, v in cfg.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConvertError(f"{path}: semantic_codec.{k} is {v!r}, expected a positive int")
    if cfg["downsample_scale"] > 1:
        raise ConvertError(f"{path}: semantic_codec.downsample_scale is {cfg['downsample_scale']}; "
                           "a downsampling codec is not supported (IndexTTS-2.0's MaskGCT RepCodec has none)")
    cfg.update({
        "quantizer_type": "fvq",
        "has_projections": cfg["hidden_size"] != cfg["codebook_dim"],
        "use_l2_normalize": True,
        "l2_normalize_eps": L2_NORMALIZE_EPS,
        "layer_norm_eps": LAYER_NORM_EPS,
        "embed_kernel_size": EMBED_KERNEL,
        "dwconv_kernel_size": DWCONV_KERNEL,
        "activation": "gelu",  # nn.GELU(): the exact erf form
    })
    return cfg


def vocos_rows(b: str) -> list:
    """A Vocos backbone at ``b`` (``encoder.0``; 2.5's ``decoder.0``), carried as it is:
    the embed conv and its LayerNorm, the ConvNeXt blocks ``{i}``, the final LayerNorm."""
    rows = [row(f"{b}.{p}", "copy", f"{b}.{p}") for p in ("embed.weight", "embed.bias", "norm.weight", "norm.bias")]
    for p in ("dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight", "pwconv1.bias",
              "pwconv2.weight", "pwconv2.bias", "gamma"):
        rows.append(row(f"{b}.convnext.{{i}}.{p}", "copy", f"{b}.convnext.{{i}}.{p}"))
    return rows + [row(f"{b}.final_layer_norm.{p}", "copy", f"{b}.final_layer_norm.{p}") for p in ("weight", "bias")]


def table(cfg: dict):
    rows = vocos_rows("encoder.0")
    rows += [
        row("encoder.1.weight", "copy", "encoder.1.weight"),
        row("encoder.1.bias", "copy", "encoder.1.bias"),
        row("quantizer.quantizers.{q}.codebook.weight", "copy", "quantizer.quantizers.{q}.codebook.weight"),
    ]
    if cfg["has_projections"]:
        for proj in ("in_project", "out_project"):
            q = f"quantizer.quantizers.{{q}}.{proj}"
            rows += [wn(f"{q}.weight", q, 0, then="squeeze(dim=2)"), row(f"{q}.bias", "copy", f"{q}.bias")]
    return rows, {"i": cfg["vocos_num_layers"], "q": cfg["num_quantizers"]}
