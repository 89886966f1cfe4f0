"""IndexTTS-2 GPT (``UnifiedVoice`` v2, ``indextts/gpt/model_v2.py``) -> ``gpt.safetensors``.

Source: ``gpt.pth`` from the release, a plain state dict or ``{"model": state_dict}``
(:mod:`sources` unwraps it), or a naive safetensors dump with the same keys.
Hyperparameters: the ``gpt:`` section of the release's ``config.yaml``; upstream builds
``UnifiedVoice(**cfg.gpt)`` and loads the state dict with ``strict=True``.

Canonical form:
- GPT-2 stack (transformers ``GPT2Model``): its ``Conv1D`` weights are stored
  ``[in, out]``; canonical weights are ``[out, in]``.  ``c_attn`` (output columns
  ``[q | k | v]``, split in that order by ``GPT2Attention``) becomes ``attn.q/k/v``;
  ``attn.c_proj`` -> ``attn.out``; ``mlp.c_fc`` -> ``mlp.fc``; ``mlp.c_proj`` ->
  ``mlp.proj``.  The names change with the layout, so nobody mistakes them for Conv1D.
- Conformer encoders (``conditioning_encoder``, ``emo_conditioning_encoder``; each has
  its own sizes): the GLU ``pointwise_conv1`` (kernel 1, ``2*d`` outputs) becomes the
  linears ``pointwise_conv1.value`` (first half) and ``pointwise_conv1.gate`` (second
  half), as ``F.glu(x, dim=1) = x[:d] * sigmoid(x[d:])``; the kernel-1
  ``pointwise_conv2`` becomes a linear ``[d, d]``; ``embed.conv.0``/``embed.out.0`` lose
  the ``nn.Sequential`` index; the sinusoidal ``embed.pos_enc.pe`` buffer (persistent
  upstream, so it is in the state dict) is kept as ``[max_len, d]``, and rebuilt from
  the config when a source lacks it.
- Perceiver resamplers: ``layers.{l}.0`` -> ``layers.{l}.attn`` with ``to_kv`` split
  into ``to_k`` (first half) and ``to_v``; ``layers.{l}.1`` -> ``layers.{l}.ff`` with the
  GEGLU input linear split into ``value`` (first half, ``x``) and ``gate`` (second half;
  ``gelu(gate) * x``), and ``ff.2`` -> ``ff.out``.
- ``mel_pos_embedding.emb`` / ``text_pos_embedding.emb`` -> ``mel_pos_embedding`` /
  ``text_pos_embedding``.  Everything else keeps its upstream name and layout.
"""

from __future__ import annotations

import math

from ..io.configs import load_yaml_section, require
from ..errors import ConvertError
from ..format.config_dims import Dim
from ..format.table import WB, Drop, Row, keep, row


# Constants of the upstream classes (not settable from config.yaml):
COND_INPUT_SIZE = 1024          # UnifiedVoice passes input_size=1024 to both ConformerEncoders
EMO_PERCEIVER_DIM = 1024        # UnifiedVoice builds emo_perceiver_encoder at dim 1024
EMOVEC_IN = 1024                # emovec_layer = Linear(1024, model_dim)
CNN_MODULE_KERNEL = 15          # ConformerEncoder default cnn_module_kernel
POS_ENC_MAX_LEN = 5000          # PositionalEncoding default max_len
PERCEIVER_DEPTH = 2             # PerceiverResampler default depth
PERCEIVER_DIM_HEAD = 64         # PerceiverResampler default dim_head
LN_EPS = 1e-5                   # every nn.LayerNorm here, and GPT2Config.layer_norm_epsilon
RMS_NORM_EPS = 1e-12            # F.normalize's default eps inside the Perceiver's RMSNorm

DROPS: list[Drop] = [
    Drop(r"gpt\.h\.\d+\.attn\.bias",
         "GPT-2 causal-mask buffer (lower-triangular ones over n_positions) that older transformers saved; "
         "a constant of the sequence length, rebuilt by any runtime (newer transformers no longer stores it)"),
    Drop(r"gpt\.h\.\d+\.attn\.masked_bias",
         "GPT-2 constant -1e4 fill value that older transformers saved as a buffer; not a weight"),
]

SUPPORTED_INPUT_LAYERS = ("conv2d2",)

SECTION = "gpt"
# The released gpt: sections differ in this key only (IndexTTS-2.5's says 60509); whose a
# value is, in the message of a config that does not fit (format/config_dims.py).
RELEASE_VALUES = {"number_text_tokens": 12000}


def _encoder_dims(stack: str, key: str) -> list[Dim]:
    e = f"{stack}.embed.conv.0.weight"  # Conv2d(1, output_size, 3, 2)
    return [Dim(f"{key}.output_size", e, 0), Dim(f"{key}.linear_units", f"{stack}.encoders.0.feed_forward.w_1.weight", 0)]


# Config keys -> the checkpoint tensors they size (upstream names), the same in both
# releases; checked before the table, so a config that does not fit is refused by key.
SHARED_DIMS = [
    Dim("number_text_tokens", "text_embedding.weight", 0, "number_text_tokens * types + 1"),
    Dim("number_text_tokens", "text_head.weight", 0, "number_text_tokens * types + 1"),
    Dim("model_dim", "text_embedding.weight", 1),
    Dim("number_mel_codes", "mel_embedding.weight", 0),
    Dim("number_mel_codes", "mel_head.weight", 0),
    Dim("max_text_tokens", "text_pos_embedding.emb.weight", 0, "max_text_tokens + 2"),
    Dim("max_mel_tokens", "mel_pos_embedding.emb.weight", 0, "max_mel_tokens + 2 + max_conditioning_inputs"),
    *_encoder_dims("emo_conditioning_encoder", "emo_condition_module"),
]
CONFIG_DIMS = [*SHARED_DIMS, *_encoder_dims("conditioning_encoder", "condition_module")]


def load_config(path: str) -> dict:
    return load_yaml_section(path, SECTION)


def _conformer(raw: dict, key: str, path: str) -> dict:
    m = raw.get(key)
    if not isinstance(m, dict):
        raise ConvertError(f"{path}: gpt config lacks the {key!r} mapping")
    require(m, ("output_size", "linear_units", "attention_heads", "num_blocks", "input_layer", "perceiver_mult"), path, f"gpt.{key}")
    if m["input_layer"] not in SUPPORTED_INPUT_LAYERS:
        raise ConvertError(f"{path}: gpt.{key}.input_layer {m['input_layer']!r} is not supported (IndexTTS-2 uses 'conv2d2')")
    d, h = int(m["output_size"]), int(m["attention_heads"])
    if d % h:
        raise ConvertError(f"{path}: gpt.{key}.output_size {d} is not divisible by attention_heads {h}")
    return {
        "input_size": COND_INPUT_SIZE,
        "output_size": d,
        "attention_heads": h,
        "head_dim": d // h,
        "linear_units": int(m["linear_units"]),
        "num_blocks": int(m["num_blocks"]),
        "input_layer": m["input_layer"],
        # Conv2dSubsampling2: Conv2d(1, d, 3, stride 2) + ReLU over (time, freq), then
        # Linear(d * subsample_freq, d) over the (channel, freq) flattening, channel-major.
        "subsample_kernel": 3,
        "subsample_stride": 2,
        "subsample_freq": (COND_INPUT_SIZE - 1) // 2,
        "pos_enc_layer_type": "rel_pos",
        "pos_enc_max_len": POS_ENC_MAX_LEN,
        "cnn_module_kernel": CNN_MODULE_KERNEL,
        "activation": "swish",  # torch.nn.SiLU, in the feed-forward and after the conv module's norm
        "layer_norm_eps": LN_EPS,
        "normalize_before": True,
        "macaron_style": False,
        "use_cnn_module": True,
        "concat_after": False,
        "rel_shift": False,  # upstream's RelPositionMultiHeadedAttention skips rel_shift
    }


def _perceiver(dim: int, dim_context: int, mult, heads: int, latents: int) -> dict:
    return {
        "dim": dim,
        "dim_context": dim_context,
        "has_proj_context": dim_context != dim,
        "num_latents": latents,
        "depth": PERCEIVER_DEPTH,
        "heads": heads,
        "dim_head": PERCEIVER_DIM_HEAD,
        "inner_dim": PERCEIVER_DIM_HEAD * heads,
        "ff_mult": mult,
        "ff_inner": int(dim * mult * 2 / 3),  # upstream's FeedForward: int(dim * mult * 2 / 3)
        "ff_activation": "gelu",  # exact (erf) GELU on the gate: gelu(gate) * value
        "cross_attn_include_queries": True,  # keys/values attend over cat(latents, context)
        "norm": "rms",  # F.normalize(x, dim=-1, eps=rms_norm_eps) * sqrt(dim) * gamma
        "rms_norm_eps": RMS_NORM_EPS,
    }


# The ints both releases' gpt: sections must have, carried over as they are.
CORE_INTS = ("model_dim", "layers", "heads", "max_text_tokens", "max_mel_tokens", "number_text_tokens",
             "number_mel_codes", "start_text_token", "stop_text_token", "start_mel_token", "stop_mel_token")


def core_config(raw: dict, path: str, release: str) -> dict:
    """What IndexTTS-2.0's and 2.5's GPT share (``release`` names the one the caller
    converts, in errors): the GPT-2 stack, the token ids and vocabularies, the position
    tables; the flags they support checked.  The caller has run ``require`` and adds its
    conditioning stacks."""
    if not raw.get("use_mel_codes_as_input", True):
        raise ConvertError(f"{path}: gpt.use_mel_codes_as_input false (a MelEncoder front end) is not supported")
    if raw.get("train_solo_embeddings", False):
        raise ConvertError(f"{path}: gpt.train_solo_embeddings true is not supported ({release} uses false)")
    d, heads = int(raw["model_dim"]), int(raw["heads"])
    if d % heads:
        raise ConvertError(f"{path}: gpt.model_dim {d} is not divisible by heads {heads}")
    types = int(raw.get("types", 1))
    max_cond = int(raw.get("max_conditioning_inputs", 1))
    cfg = {k: int(raw[k]) for k in CORE_INTS}
    cfg.update({
        "use_mel_codes_as_input": True,
        "train_solo_embeddings": False,
        "types": types,
        "max_conditioning_inputs": max_cond,
        "mel_length_compression": int(raw.get("mel_length_compression", 1024)),
        # derived sizes, so a runtime does not recompute them
        "head_dim": d // heads,
        "text_vocab_size": int(raw["number_text_tokens"]) * types + 1,  # text_embedding / text_head rows
        "mel_positions": int(raw["max_mel_tokens"]) + 2 + max_cond,  # mel_pos_embedding rows
        "text_positions": int(raw["max_text_tokens"]) + 2,  # text_pos_embedding rows
        "gpt_n_inner": 4 * d,
        "gpt_activation": "gelu_new",  # tanh-approximated GELU (GPT2Config default)
        "gpt_layer_norm_epsilon": LN_EPS,
        "gpt_position_embeddings": "none",  # wpe is replaced by zeros; learned mel/text position tables are added outside
        "final_norm_eps": LN_EPS,
        "emovec_in": EMOVEC_IN,
    })
    return cfg


def emotion_stacks(raw: dict, path: str) -> dict:
    """The emotion conditioning entries (the same in both releases): upstream's mapping
    verbatim, and the Conformer and Perceiver parameters."""
    emo = _conformer(raw, "emo_condition_module", path)
    return {
        "emo_condition_module": dict(raw["emo_condition_module"]),
        "emo_conditioning_encoder": emo,
        "emo_perceiver_encoder": _perceiver(EMO_PERCEIVER_DIM, emo["output_size"], raw["emo_condition_module"]["perceiver_mult"],
                                            emo["attention_heads"], 1),
    }


def runtime_config(raw: dict, path: str) -> dict:
    require(raw, CORE_INTS + ("condition_type", "condition_module", "emo_condition_module"), path, "gpt")
    if raw["condition_type"] != "conformer_perceiver":
        raise ConvertError(f"{path}: gpt.condition_type {raw['condition_type']!r} is not supported (IndexTTS-2 uses 'conformer_perceiver')")
    cfg = core_config(raw, path, "IndexTTS-2")
    n_latent = int(raw.get("condition_num_latent", 32))
    cond = _conformer(raw, "condition_module", path)
    cfg.update({
        "condition_type": "conformer_perceiver",
        "condition_num_latent": n_latent,
        # upstream's own config mapping, verbatim, and the stack's parameters
        "condition_module": dict(raw["condition_module"]),
        "conditioning_encoder": cond,
        "perceiver_encoder": _perceiver(cfg["model_dim"], cond["output_size"], raw["condition_module"]["perceiver_mult"],
                                        cond["attention_heads"], n_latent),
        **emotion_stacks(raw, path),
    })
    return cfg


def sinusoid_table(max_len: int, d: int):
    """The ``PositionalEncoding.pe`` table (without its leading batch dim), a torch
    tensor (torch is imported only when a table is regenerated):
    pe[p, 2i] = sin(p * w_i), pe[p, 2i+1] = cos(p * w_i), w_i = exp(-2i * ln(10000) / d)."""
    import torch

    pe = torch.zeros(max_len, d)
    position = torch.arange(0, max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2) * -(math.log(10000.0) / d))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def _conformer_rows(stack: str, blk: str) -> list[Row]:
    e = f"{stack}.encoders.{{{blk}}}"

    def regen(cfg: dict, stack=stack):
        c = cfg[stack]
        return sinusoid_table(c["pos_enc_max_len"], c["output_size"])

    rows = [
        row(f"{stack}.embed.conv.weight", "copy", f"{stack}.embed.conv.0.weight"),
        row(f"{stack}.embed.conv.bias", "copy", f"{stack}.embed.conv.0.bias"),
        row(f"{stack}.embed.out.weight", "copy", f"{stack}.embed.out.0.weight"),
        row(f"{stack}.embed.out.bias", "copy", f"{stack}.embed.out.0.bias"),
        Row(f"{stack}.embed.pos_enc.pe", "squeeze(dim=0)", (f"{stack}.embed.pos_enc.pe",), regenerate=regen,
            regenerate_op="sinusoid_table(pos_enc_max_len, output_size): pe[p,2i]=sin(p*w_i), pe[p,2i+1]=cos(p*w_i), w_i=exp(-2i*ln(10000)/d)"),
        *keep(f"{stack}.after_norm", params=WB),
        *keep(*(f"{e}.self_attn.linear_{n}" for n in ("q", "k", "v", "out")), params=WB),
        *keep(f"{e}.self_attn.linear_pos.weight", f"{e}.self_attn.pos_bias_u", f"{e}.self_attn.pos_bias_v"),
        *keep(f"{e}.feed_forward.w_1", f"{e}.feed_forward.w_2", params=WB),
    ]
    pw1 = f"{e}.conv_module.pointwise_conv1"
    for i, part in enumerate(("value", "gate")):  # F.glu(x, dim=1): first half * sigmoid(second half)
        rows += [row(f"{pw1}.{part}.weight", f"split(dim=0,index={i},parts=2)|squeeze(dim=2)", f"{pw1}.weight"),
                 row(f"{pw1}.{part}.bias", f"split(dim=0,index={i},parts=2)", f"{pw1}.bias")]
    rows += [
        *keep(f"{e}.conv_module.depthwise_conv", f"{e}.conv_module.norm", params=WB),
        row(f"{e}.conv_module.pointwise_conv2.weight", "squeeze(dim=2)", f"{e}.conv_module.pointwise_conv2.weight"),
        *keep(f"{e}.conv_module.pointwise_conv2.bias"),
        *keep(*(f"{e}.{n}" for n in ("norm_ff", "norm_mha", "norm_conv", "norm_final")), params=WB),
    ]
    return rows


def _perceiver_rows(stack: str, lay: str, proj_context: bool) -> list[Row]:
    c = s = f"{stack}.layers.{{{lay}}}"  # canonical / upstream prefix (same path; children renamed)
    rows = keep(f"{stack}.latents")
    if proj_context:
        rows += keep(f"{stack}.proj_context", params=WB)
    rows += [
        row(f"{c}.attn.to_q.weight", "copy", f"{s}.0.to_q.weight"),
        # q, k, v = to_q(x), *to_kv(context).chunk(2, dim=-1)
        row(f"{c}.attn.to_k.weight", "split(dim=0,index=0,parts=2)", f"{s}.0.to_kv.weight"),
        row(f"{c}.attn.to_v.weight", "split(dim=0,index=1,parts=2)", f"{s}.0.to_kv.weight"),
        row(f"{c}.attn.to_out.weight", "copy", f"{s}.0.to_out.weight"),
    ]
    for i, part in enumerate(("value", "gate")):  # GEGLU: x, gate = chunk(2, dim=-1); gelu(gate) * x
        rows += [row(f"{c}.ff.{part}.weight", f"split(dim=0,index={i},parts=2)", f"{s}.1.0.weight"),
                 row(f"{c}.ff.{part}.bias", f"split(dim=0,index={i},parts=2)", f"{s}.1.0.bias")]
    rows += [
        row(f"{c}.ff.out.weight", "copy", f"{s}.1.2.weight"),
        row(f"{c}.ff.out.bias", "copy", f"{s}.1.2.bias"),
        *keep(f"{stack}.norm.gamma"),
    ]
    return rows


def gpt2_rows() -> list[Row]:
    """The GPT-2 stack (``{i}`` = block), ``gpt.ln_f``, ``final_norm`` and ``mel_head``: the
    same in IndexTTS-2.0 and 2.5."""
    h = "gpt.h.{i}"
    rows = [*keep(f"{h}.ln_1", params=WB)]
    # GPT2Attention: query, key, value = c_attn(x).split(n_embd, dim=2); Conv1D weight is [in, out].
    for i, n in enumerate("qkv"):
        rows += [row(f"{h}.attn.{n}.weight", f"split(dim=1,index={i},parts=3)|transpose", f"{h}.attn.c_attn.weight"),
                 row(f"{h}.attn.{n}.bias", f"split(dim=0,index={i},parts=3)", f"{h}.attn.c_attn.bias")]
    rows += [
        row(f"{h}.attn.out.weight", "transpose", f"{h}.attn.c_proj.weight"),
        row(f"{h}.attn.out.bias", "copy", f"{h}.attn.c_proj.bias"),
        row(f"{h}.mlp.fc.weight", "transpose", f"{h}.mlp.c_fc.weight"),
        row(f"{h}.mlp.fc.bias", "copy", f"{h}.mlp.c_fc.bias"),
        row(f"{h}.mlp.proj.weight", "transpose", f"{h}.mlp.c_proj.weight"),
        row(f"{h}.mlp.proj.bias", "copy", f"{h}.mlp.c_proj.bias"),
        *keep(f"{h}.ln_2", "gpt.ln_f", "final_norm", "mel_head", params=WB),
    ]
    return rows


def embedding_rows() -> list[Row]:
    """Text and mel embeddings and their position tables, ``emovec_layer``, ``emo_layer``."""
    return [
        *keep("text_embedding.weight", "mel_embedding.weight"),
        row("text_pos_embedding.weight", "copy", "text_pos_embedding.emb.weight"),
        row("mel_pos_embedding.weight", "copy", "mel_pos_embedding.emb.weight"),
        *keep("emovec_layer", "emo_layer", params=WB),
    ]


def table(cfg: dict):
    rows = [
        *embedding_rows(),
        *keep("speed_emb.weight"),
        *gpt2_rows(),
        *keep("text_head", params=WB),
        *_conformer_rows("conditioning_encoder", "cb"),
        *_conformer_rows("emo_conditioning_encoder", "eb"),
        *_perceiver_rows("perceiver_encoder", "pl", cfg["perceiver_encoder"]["has_proj_context"]),
        *_perceiver_rows("emo_perceiver_encoder", "el", cfg["emo_perceiver_encoder"]["has_proj_context"]),
    ]
    loops = {
        "i": cfg["layers"],
        "cb": cfg["conditioning_encoder"]["num_blocks"],
        "eb": cfg["emo_conditioning_encoder"]["num_blocks"],
        "pl": cfg["perceiver_encoder"]["depth"],
        "el": cfg["emo_perceiver_encoder"]["depth"],
    }
    return rows, loops
