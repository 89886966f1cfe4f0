"""w2v-BERT 2.0 (``facebook/w2v-bert-2.0``) plus IndexTTS-2's feature statistics
-> ``w2v_bert.safetensors``.

Source: a folder with ``model.safetensors`` and ``config.json`` in transformers'
``Wav2Vec2BertModel`` naming, usually a Hugging Face cache snapshot
(``models--facebook--w2v-bert-2.0/snapshots/<rev>/``, whose files are symlinks into
``../../blobs/``), plus IndexTTS-2's ``wav2vec2bert_stats.pt`` (``{"mean", "var"}``,
``hidden_size`` each) from the release folder.

IndexTTS-2 runs the model with ``output_hidden_states=True``, takes
``hidden_states[17]`` (the output of encoder layer 16; ``hidden_states[0]`` is the
feature projection's output) and normalises it as ``(h - mean) / sqrt(var)``.

Statistics: the canonical file carries them as ``semantic_stats.mean`` and
``semantic_stats.std`` (``sqrt`` of the source ``var``, computed once here), so a
runtime needs no ``.pt`` file.  They are required: a w2v-bert file without them cannot
drive IndexTTS-2, so the converter never writes one.  ``--stats PATH`` names the file;
without it the converter looks for ``wav2vec2bert_stats.pt`` (or a safetensors dump of
it, ``wav2vec2bert_stats.safetensors``) beside the model file and in its parent folder
(the release layout ``checkpoints/w2v-bert-2.0/`` + ``checkpoints/wav2vec2bert_stats.pt``)
and refuses if there is none.  The file used is recorded in the metadata
(``source.extra["stats/"]``: name, size, sha256).  ``convert.py all`` passes
``<release>/wav2vec2bert_stats.pt``.

Canonical form (upstream module paths kept):
- ``conv_module.pointwise_conv1`` (kernel-1 Conv1d ``[2H, H, 1]`` followed by
  ``nn.GLU(dim=1)``) becomes two linears ``pointwise_conv1.value`` (the first half of
  the output channels) and ``pointwise_conv1.gate`` (the second half):
  ``glu = value(x) * sigmoid(gate(x))``
- ``conv_module.pointwise_conv2`` (kernel-1 Conv1d) becomes a linear ``[H, H]``
- ``conv_module.depthwise_conv`` stays a Conv1d weight ``[H, 1, K]`` (groups = H)
- all ``num_hidden_layers`` layers are kept (IndexTTS-2 only runs the first 17; a
  runtime may stop there), and an encoder with fewer than 17 layers is refused
- ``masked_spec_embed`` is dropped: the SpecAugment mask vector is only written into
  time steps that are masked during training (or when a caller passes
  ``mask_time_indices``); inference never reads it.

Refused: ``position_embeddings_type`` other than ``relative_key`` (rotary/relative
attention have other tensors), ``add_adapter`` / ``use_intermediate_ffn_before_adapter``
(not w2v-bert-2.0), activations other than swish/silu/gelu/relu.  ``hidden_act`` is
written as ``silu`` for upstream's ``swish`` (the same function, x * sigmoid(x)).
"""

from __future__ import annotations

import os

from ..io.configs import load_json, require
from ..errors import ConvertError
from ..io.files import regular_file
from ..format.table import WB, Drop, keep, row


STATS_FILES = ("wav2vec2bert_stats.pt", "wav2vec2bert_stats.safetensors")
# The --stats option and its release-folder default are declared in registry.EXTRA_FILES.

# IndexTTS-2 (infer_v2.py, get_emb) reads this entry of `hidden_states`.
INDEXTTS2_HIDDEN_STATE_INDEX = 17
NORMALIZATION = "(hidden_states[indextts2_hidden_state_index] - semantic_stats.mean) / semantic_stats.std"

ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu"}

DROPS: list[Drop] = [
    Drop(r"masked_spec_embed",
         "SpecAugment mask vector: only replaces masked time steps in training (mask_time_prob > 0 and "
         "model.training) or when mask_time_indices is passed; inference never reads it"),
]


def load_config(path: str) -> dict:
    return load_json(path)


def runtime_config(raw: dict, path: str, profile: str = "full") -> dict:
    """The hyperparameters a runtime needs, with transformers' defaults made explicit.

    ``profile="indextts2"`` (``--profile indextts2``) keeps only the layers IndexTTS-2
    runs (``num_hidden_layers`` becomes 17) and folds the statistics into the last
    layer's final layer norm, so the encoder's last output is the normalised feature."""
    if profile not in ("full", "indextts2"):
        raise ConvertError(f"{path}: unknown w2v-bert profile {profile!r}")
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    require(raw, need, path, "w2v-bert")
    if raw.get("model_type", "wav2vec2-bert") != "wav2vec2-bert":
        raise ConvertError(f"{path}: model_type is {raw.get('model_type')!r}, not 'wav2vec2-bert'")
    # Defaults of transformers' Wav2Vec2BertConfig, for configs that leave them out.
    pos = raw.get("position_embeddings_type", "relative_key")
    if pos != "relative_key":
        raise ConvertError(f"{path}: position_embeddings_type {pos!r} is not supported "
                           "(w2v-bert-2.0 uses 'relative_key' with a distance embedding)")
    for flag in ("add_adapter", "use_intermediate_ffn_before_adapter"):
        if raw.get(flag, False):
            raise ConvertError(f"{path}: {flag} is true; that is not the w2v-bert-2.0 encoder "
                               "(IndexTTS-2 reads encoder hidden states, which an adapter does not touch)")
    act = raw.get("hidden_act", "swish")
    if act not in ACTIVATIONS:
        raise ConvertError(f"{path}: hidden_act {act!r} is not supported (known: {', '.join(ACTIVATIONS)})")
    h, heads = raw["hidden_size"], raw["num_attention_heads"]
    if heads < 1 or h % heads:
        raise ConvertError(f"{path}: hidden_size {h} is not a multiple of num_attention_heads {heads}")
    k = raw.get("conv_depthwise_kernel_size", 31)
    if k % 2 != 1:
        raise ConvertError(f"{path}: conv_depthwise_kernel_size {k} is not odd (transformers refuses it too)")
    layers = raw["num_hidden_layers"]
    if layers < INDEXTTS2_HIDDEN_STATE_INDEX:
        raise ConvertError(f"{path}: num_hidden_layers is {layers}; IndexTTS-2 reads hidden_states[{INDEXTTS2_HIDDEN_STATE_INDEX}], "
                           f"the output of encoder layer {INDEXTTS2_HIDDEN_STATE_INDEX - 1}")
    return {
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "head_size": h // heads,
        "intermediate_size": raw["intermediate_size"],
        "feature_projection_input_dim": raw.get("feature_projection_input_dim", 160),
        "position_embeddings_type": pos,
        "left_max_position_embeddings": raw.get("left_max_position_embeddings", 64),
        "right_max_position_embeddings": raw.get("right_max_position_embeddings", 8),
        "conv_depthwise_kernel_size": k,
        "layer_norm_eps": float(raw.get("layer_norm_eps", 1e-5)),
        "hidden_act": ACTIVATIONS[act],
        "source_hidden_act": act,
        # Architecture constants of transformers' Wav2Vec2BertEncoderLayer, stated so a
        # runtime does not have to read that code:
        "ffn_residual_scale": 0.5,            # macaron: x + 0.5 * ffn(ln(x)), both feed-forwards
        "conv_depthwise_left_padding": k - 1,  # the depthwise conv is causal: pad K-1 on the left only
        "indextts2_hidden_state_index": INDEXTTS2_HIDDEN_STATE_INDEX,
        "hidden_states": "hidden_states[0] = feature_projection output; hidden_states[k] = output of encoder.layers.{k-1}",
        "indextts2_normalization": NORMALIZATION,
        "profile": "full",
    } if profile == "full" else {
        **runtime_config(raw, path),
        "profile": "indextts2",
        "num_hidden_layers": INDEXTTS2_HIDDEN_STATE_INDEX,
        "source_num_hidden_layers": layers,
        "indextts2_normalization": (f"folded into encoder.layers.{INDEXTTS2_HIDDEN_STATE_INDEX - 1}.final_layer_norm: "
                                    "the encoder's last hidden state is already (h - mean) / sqrt(var)"),
    }


def _find_stats(src_file: str) -> str | None:
    # abspath, not realpath: in a Hugging Face cache the model file is a symlink into
    # blobs/, and the folder the user named is the snapshot folder.
    here = os.path.dirname(os.path.abspath(src_file))
    for folder in (here, os.path.dirname(here)):
        for name in STATS_FILES:
            p = os.path.join(folder, name)
            if regular_file(p):  # a FIFO there is refused, never opened
                return p
    return None


def extra_sources(src_file: str, extra: dict[str, str]) -> dict[str, str]:
    path = extra.get("stats")
    if path is None:
        path = _find_stats(src_file)
        if path is None:
            here = os.path.dirname(os.path.abspath(src_file))
            raise ConvertError(
                f"{src_file}: IndexTTS-2's feature statistics (wav2vec2bert_stats.pt) not found in {here} or its parent "
                "folder; pass --stats PATH (the file is in the IndexTTS-2 release folder)")
    if os.path.isdir(path):
        raise ConvertError(f"{path}: is a folder; --stats takes the wav2vec2bert_stats.pt file")
    if not regular_file(path):
        raise ConvertError(f"{path}: IndexTTS-2's feature statistics file not found (pass --stats PATH)")
    return {"stats/": path}


def table(cfg: dict):
    L = "encoder.layers.{i}"
    # Layer norms and linears (weight [out, in] and bias) are carried as they are.
    rows = keep("feature_projection.layer_norm", "feature_projection.projection", params=WB)
    for ffn in ("ffn1", "ffn2"):
        rows += keep(f"{L}.{ffn}_layer_norm", f"{L}.{ffn}.intermediate_dense", f"{L}.{ffn}.output_dense", params=WB)
    rows += [
        *keep(f"{L}.self_attn_layer_norm", *(f"{L}.self_attn.linear_{n}" for n in ("q", "k", "v", "out")), params=WB),
        *keep(f"{L}.self_attn.distance_embedding.weight"),
        *keep(f"{L}.conv_module.layer_norm", params=WB),
        # nn.GLU(dim=1) on the conv output: first half of the channels is the value,
        # second half the gate.
        row(f"{L}.conv_module.pointwise_conv1.value.weight", "split(dim=0,index=0,parts=2)|squeeze(dim=2)",
            f"{L}.conv_module.pointwise_conv1.weight"),
        row(f"{L}.conv_module.pointwise_conv1.gate.weight", "split(dim=0,index=1,parts=2)|squeeze(dim=2)",
            f"{L}.conv_module.pointwise_conv1.weight"),
        *keep(f"{L}.conv_module.depthwise_conv.weight"),
        *keep(f"{L}.conv_module.depthwise_layer_norm", params=WB),
        row(f"{L}.conv_module.pointwise_conv2.weight", "squeeze(dim=2)", f"{L}.conv_module.pointwise_conv2.weight"),
    ]
    last = cfg["num_hidden_layers"] - 1
    if cfg["profile"] == "full":
        rows += [
            *keep(f"{L}.final_layer_norm", params=WB),
            # IndexTTS-2's statistics (extra source "stats/"), std = sqrt(var) as upstream computes it.
            row("semantic_stats.mean", "copy", "stats/mean"),
            row("semantic_stats.std", "sqrt", "stats/var"),
        ]
        return rows, {"i": cfg["num_hidden_layers"]}
    # indextts2 profile: the last kept layer's final layer norm carries the normalisation
    # (LN(x) * w + b - mean) / sqrt(var) = LN(x) * (w / sqrt(var)) + (b - mean) / sqrt(var).
    ln = f"encoder.layers.{last}.final_layer_norm"
    rows += [
        *keep("encoder.layers.{f}.final_layer_norm", params=WB),
        row(f"{ln}.weight", "normalize_scale", f"{ln}.weight", "stats/var"),
        row(f"{ln}.bias", "normalize_shift", f"{ln}.bias", "stats/mean", "stats/var"),
    ]
    return rows, {"i": cfg["num_hidden_layers"], "f": last}


def drops(cfg: dict) -> list[Drop]:
    if cfg["profile"] == "full":
        return DROPS
    unused = "|".join(str(i) for i in range(cfg["num_hidden_layers"], cfg["source_num_hidden_layers"]))
    return DROPS + ([Drop(rf"encoder\.layers\.({unused})\..+",
                          f"--profile indextts2: IndexTTS-2 reads hidden_states[{INDEXTTS2_HIDDEN_STATE_INDEX}], "
                          "so these layers never run")] if unused else [])
