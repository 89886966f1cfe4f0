"""IndexTTS-2 semantic-to-mel model (``s2mel.pth``) -> ``s2mel.safetensors``.

Source: ``s2mel.pth``, a training checkpoint ``{"net": {"cfm": sd, "length_regulator":
sd, "gpt_layer": sd}, "optimizer": ..., ...}`` (the reader flattens ``net`` to
``cfm.…``, ``length_regulator.…``, ``gpt_layer.…``, strips DDP ``module.`` prefixes and
never reads what sits beside ``net``), or a naive safetensors dump with those flattened
keys.  Hyperparameters: the ``s2mel:`` section of IndexTTS-2's ``config.yaml``.
Upstream: ``indextts.s2mel.modules.commons.MyModel(cfg.s2mel, use_gpt_latent=True)``
(``flow_matching.CFM`` -> ``diffusion_transformer.DiT`` with a ``gpt_fast`` transformer
and a ``wavenet.WN`` head, ``length_regulator.InterpolateRegulator``, and the
``gpt_layer`` MLP).

Upstream loads this file non-strictly; this converter is strict: every parameter the
inference path uses must be present with the right shape, and every other tensor is
dropped by a rule with its reason.

Canonical form (names keep upstream module paths unless a fused tensor is split):
- transformer ``attention.wqkv`` -> ``attention.q`` / ``k`` / ``v`` (upstream splits the
  output in that order into equal ``n_local_heads * head_dim`` parts; n_local_heads ==
  n_head here)
- each AdaptiveLayerNorm ``project_layer`` [2d, d] -> ``scale_proj`` (first half, upstream
  "weight") and ``shift_proj`` (second half, "bias"); the FinalLayer's
  ``adaLN_modulation.1`` chunks the other way round: ``shift_proj`` first, then
  ``scale_proj``
- weight norm folded everywhere it is used (torch default ``dim=0``):
  ``final_layer.linear`` (Linear), the WaveNet ``in_layers``, ``res_skip_layers`` and
  ``cond_layer`` (Conv1d inside ``SConv1d`` -> ``.conv.conv``).  The weight-normed
  ``x_embedder`` is dropped: ``DiT.forward`` never calls it.
- WaveNet gated halves split: ``in_layers.{w}`` -> ``filter`` (tanh half, first) and
  ``gate`` (sigmoid half); the single ``cond_layer`` (output ``2 * h * L``) -> per layer
  ``cond_layer.{w}.filter`` / ``gate``; ``res_skip_layers.{w}`` -> ``res`` (first half) and
  ``skip`` (second half; the last layer has only ``skip``)
- kernel-1 convolutions become linears ``[out, in]``: WaveNet ``cond_layer`` and
  ``res_skip_layers``, the DiT ``conv2``, the length regulator's output conv
- length regulator ``model`` Sequential -> ``blocks.{i}.conv`` / ``blocks.{i}.norm`` and
  ``out_proj``
- the timestep embedders' ``freqs`` buffers are kept, regenerated from the config when
  the source lacks them
"""

from __future__ import annotations

import math

import torch

from ..io.configs import load_yaml_section, require
from ..errors import ConvertError
from ..format.table import Drop, Row, row, wn


# Constants hard-coded in upstream's classes (not in config.yaml).
BLOCK_SIZE = 16384  # DiT builds ModelArgs(block_size=16384) whatever DiT.block_size says
NORM_EPS = 1e-5  # gpt_fast ModelArgs.norm_eps (RMSNorm in every AdaptiveLayerNorm)
ROPE_BASE = 10000.0  # gpt_fast ModelArgs.rope_base
TIMESTEP_FREQ_DIM = 256  # TimestepEmbedder frequency_embedding_size
TIMESTEP_MAX_PERIOD = 10000.0
TIMESTEP_SCALE = 1000.0
FINAL_NORM_EPS = 1e-6  # FinalLayer.norm_final: LayerNorm without affine parameters
GROUP_NORM_EPS = 1e-5  # length regulator nn.GroupNorm default
GPT_LAYER_DIMS = [1280, 256, 128, 1024]  # MyModel(use_gpt_latent=True).gpt_layer

E = "cfm.estimator."
LR = "length_regulator."
WN_SRC = E + "wavenet."

DROPS: list[Drop] = [
    Drop(r"cfm\.estimator\.input_pos",
         "position indices arange(16384); a runtime uses positions 0..T-1 directly (T <= block_size)"),
    Drop(r"cfm\.estimator\.cond_embedder\.weight",
         "discrete-content embedding table; DiT.forward always projects content with cond_projection, never this"),
    Drop(r"cfm\.estimator\.content_mask_embedder\.weight", "never used by DiT.forward"),
    Drop(r"cfm\.estimator\.x_embedder\.(weight|weight_g|weight_v|parametrizations\.weight\.original[01]|bias)",
         "weight-normed input Linear that DiT.forward never calls (x_t goes straight into cond_x_merge_linear)"),
    Drop(r"cfm\.estimator\.transformer\.layers\.\d+\.skip_in_linear\.(weight|bias)",
         "U-ViT skip projection of a layer that receives no skip (only layers > depth // 2 do, when "
         "uvit_skip_connection is true); upstream builds one in every layer but never calls the others"),
    Drop(r"cfm\.estimator\.skip_linear\.(weight|bias)", "long skip projection; used only when long_skip_connection is true"),
    Drop(r"length_regulator\.embedding\.weight",
         "codebook embedding for discrete content; is_discrete is false, so forward uses content_in_proj"),
    Drop(r"length_regulator\.mask_token", "never used by InterpolateRegulator.forward"),
]


def load_config(path: str) -> dict:
    return load_yaml_section(path, "s2mel")


def _section(raw: dict, key: str, path: str) -> dict:
    sec = raw.get(key)
    if not isinstance(sec, dict):
        raise ConvertError(f"{path}: s2mel config has no {key!r} section")
    return sec


def _flag(sec: dict, key: str, default: bool = False) -> bool:
    return bool(sec.get(key, default))


def uvit_skip_from(depth: int) -> list[int]:
    """For each transformer layer, the layer whose output it receives as U-ViT skip
    (-1 for none): layers < depth // 2 push their output on a stack, layers > depth // 2
    pop from it (gpt_fast Transformer.setup_caches/forward)."""
    stack, out = [], []
    for i in range(depth):
        src = -1
        if i > depth // 2:
            if not stack:
                raise ConvertError(f"U-ViT skip stack empty at layer {i} of {depth}")
            src = stack.pop()
        out.append(src)
        if i < depth // 2:
            stack.append(i)
    return out


def _ffn_size(dim: int) -> int:
    n = int(2 * (4 * dim) / 3)  # gpt_fast ModelArgs.__post_init__: find_multiple(n, 256)
    return n if n % 256 == 0 else n + 256 - n % 256


def _fmax(spect: dict):
    # infer_v2 passes None when the config says "None" (or nothing), and 8000 otherwise.
    v = spect.get("fmax", "None")
    return None if v is None or v == "None" else 8000


def runtime_config(raw: dict, path: str) -> dict:
    """Everything a runtime needs, flat, with upstream's hard-coded constants explicit."""
    if raw.get("dit_type", "DiT") != "DiT":
        raise ConvertError(f"{path}: s2mel dit_type {raw.get('dit_type')!r} is not supported (upstream CFM knows only 'DiT')")
    pre = _section(raw, "preprocess_params", path)
    spect = _section(pre, "spect_params", path)
    dit = _section(raw, "DiT", path)
    wnet = _section(raw, "wavenet", path)
    lr = _section(raw, "length_regulator", path)
    style = _section(raw, "style_encoder", path)
    require(pre, ("sr",), path, "s2mel preprocess_params")
    require(spect, ("n_fft", "win_length", "hop_length", "n_mels"), path, "s2mel spect_params")
    require(dit, ("hidden_dim", "num_heads", "depth", "in_channels", "content_dim", "style_condition",
                  "final_layer_type", "is_causal", "long_skip_connection"), path, "s2mel DiT")
    require(wnet, ("hidden_dim", "num_layers", "kernel_size", "dilation_rate", "style_condition"), path, "s2mel wavenet")
    require(lr, ("channels", "sampling_ratios", "in_channels"), path, "s2mel length_regulator")
    require(style, ("dim",), path, "s2mel style_encoder")
    if dit["final_layer_type"] != "wavenet":
        raise ConvertError(f"{path}: DiT final_layer_type {dit['final_layer_type']!r} is not supported (IndexTTS-2 uses 'wavenet')")
    for key in ("time_as_token", "style_as_token"):
        # (style_as_token also breaks upstream's WaveNet head: its mask gets one frame too many)
        if _flag(dit, key):
            raise ConvertError(f"{path}: DiT {key}: true is not supported (IndexTTS-2 uses false)")
    if bool(dit["style_condition"]) != bool(wnet["style_condition"]):
        raise ConvertError(f"{path}: DiT.style_condition and wavenet.style_condition differ (upstream asserts they agree)")
    if dit["hidden_dim"] % dit["num_heads"]:
        raise ConvertError(f"{path}: DiT hidden_dim {dit['hidden_dim']} is not a multiple of num_heads {dit['num_heads']}")
    if wnet["hidden_dim"] != dit["hidden_dim"]:
        raise ConvertError(f"{path}: wavenet hidden_dim {wnet['hidden_dim']} differs from DiT hidden_dim {dit['hidden_dim']}; "
                           "upstream's FinalLayer modulates the WaveNet output with the transformer's timestep embedding, so they must agree")
    if wnet["kernel_size"] % 2 != 1:
        raise ConvertError(f"{path}: wavenet kernel_size {wnet['kernel_size']} is even (upstream WN asserts it is odd)")
    for key, want in (("is_discrete", False), ("vector_quantize", False), ("f0_condition", False)):
        if _flag(lr, key) != want:
            raise ConvertError(f"{path}: length_regulator {key}: {lr.get(key)!r} is not supported (IndexTTS-2 uses {want})")
    if int(lr.get("n_codebooks", 1)) != 1:
        raise ConvertError(f"{path}: length_regulator n_codebooks {lr['n_codebooks']} is not supported (IndexTTS-2 uses 1)")
    uvit = _flag(dit, "uvit_skip_connection")
    depth = int(dit["depth"])
    return {
        # mel front end (reference-audio prompt), as infer_v2 builds it
        "sampling_rate": int(pre["sr"]),
        "n_fft": int(spect["n_fft"]),
        "win_length": int(spect["win_length"]),
        "hop_length": int(spect["hop_length"]),
        "n_mels": int(spect["n_mels"]),
        "fmin": spect.get("fmin", 0),
        "fmax": _fmax(spect),
        # DiT
        "in_channels": int(dit["in_channels"]),
        "hidden_dim": int(dit["hidden_dim"]),
        "num_heads": int(dit["num_heads"]),
        "n_local_heads": int(dit["num_heads"]),
        "head_dim": int(dit["hidden_dim"]) // int(dit["num_heads"]),
        "depth": depth,
        "intermediate_size": _ffn_size(int(dit["hidden_dim"])),
        "norm_eps": NORM_EPS,
        "rope_base": ROPE_BASE,
        "block_size": BLOCK_SIZE,
        "content_dim": int(dit["content_dim"]),
        "style_dim": int(style["dim"]),
        "style_condition": bool(dit["style_condition"]),
        "style_as_token": False,
        "time_as_token": False,
        "uvit_skip_connection": uvit,
        "uvit_skip_from": uvit_skip_from(depth) if uvit else [-1] * depth,
        "long_skip_connection": bool(dit["long_skip_connection"]),
        "is_causal": bool(dit["is_causal"]),
        "final_layer_type": "wavenet",
        "zero_prompt_speech_token": _flag(dit, "zero_prompt_speech_token"),
        "timestep_freq_dim": TIMESTEP_FREQ_DIM,
        "timestep_max_period": TIMESTEP_MAX_PERIOD,
        "timestep_scale": TIMESTEP_SCALE,
        "final_norm_eps": FINAL_NORM_EPS,
        # WaveNet head
        "wavenet_hidden_dim": int(wnet["hidden_dim"]),
        "wavenet_num_layers": int(wnet["num_layers"]),
        "wavenet_kernel_size": int(wnet["kernel_size"]),
        "wavenet_dilation_rate": int(wnet["dilation_rate"]),
        "wavenet_pad_mode": "reflect",
        # length regulator
        "length_regulator_channels": int(lr["channels"]),
        "length_regulator_in_channels": int(lr["in_channels"]),
        "length_regulator_sampling_ratios": [int(x) for x in lr["sampling_ratios"]],
        "length_regulator_groups": 1,
        "length_regulator_norm_eps": GROUP_NORM_EPS,
        "length_regulator_interpolate": "nearest",
        # GPT latent -> length regulator input
        "gpt_layer_dims": list(GPT_LAYER_DIMS),
    }


def timestep_freqs(cfg: dict) -> torch.Tensor:
    """TimestepEmbedder.freqs, computed exactly as upstream does."""
    half = cfg["timestep_freq_dim"] // 2
    return torch.exp(-math.log(cfg["timestep_max_period"]) * torch.arange(start=0, end=half, dtype=torch.float32) / half)


def _linear(canon: str, src: str, bias: bool = True, op: str = "copy") -> list[Row]:
    rows = [row(f"{canon}.weight", op, f"{src}.weight")]
    if bias:
        rows.append(row(f"{canon}.bias", "copy", f"{src}.bias"))
    return rows


def _halves(canon_a: str, canon_b: str, src: str) -> list[Row]:
    """A Linear whose output upstream chunks in two: weight and bias, each split."""
    rows = []
    for i, canon in enumerate((canon_a, canon_b)):
        rows.append(row(f"{canon}.weight", f"split(dim=0,index={i},parts=2)", f"{src}.weight"))
        rows.append(row(f"{canon}.bias", f"split(dim=0,index={i},parts=2)", f"{src}.bias"))
    return rows


def _timestep(name: str) -> list[Row]:
    return [
        Row(f"{E}{name}.freqs", "copy", (f"{E}{name}.freqs",), regenerate=timestep_freqs,
            regenerate_op="exp(-ln(timestep_max_period) * arange(timestep_freq_dim // 2) / (timestep_freq_dim // 2)), float32"),
        *_linear(f"{E}{name}.mlp.0", f"{E}{name}.mlp.0"),
        *_linear(f"{E}{name}.mlp.2", f"{E}{name}.mlp.2"),
    ]


def _wavenet(cfg: dict) -> list[Row]:
    L = cfg["wavenet_num_layers"]
    rows = []
    for w in range(L):
        src = f"{WN_SRC}in_layers.{w}.conv.conv"
        for i, part in enumerate(("filter", "gate")):
            canon = f"{E}wavenet.in_layers.{w}.{part}"
            rows.append(wn(f"{canon}.weight", src, 0, then=f"split(dim=0,index={i},parts=2)"))
            rows.append(row(f"{canon}.bias", f"split(dim=0,index={i},parts=2)", f"{src}.bias"))
        src = f"{WN_SRC}cond_layer.conv.conv"
        for i, part in enumerate(("filter", "gate")):
            canon = f"{E}wavenet.cond_layer.{w}.{part}"
            split = f"split(dim=0,index={2 * w + i},parts={2 * L})"
            rows.append(wn(f"{canon}.weight", src, 0, then=f"{split}|squeeze(dim=2)"))
            rows.append(row(f"{canon}.bias", split, f"{src}.bias"))
        src = f"{WN_SRC}res_skip_layers.{w}.conv.conv"
        if w < L - 1:
            for i, part in enumerate(("res", "skip")):
                canon = f"{E}wavenet.res_skip_layers.{w}.{part}"
                split = f"split(dim=0,index={i},parts=2)"
                rows.append(wn(f"{canon}.weight", src, 0, then=f"{split}|squeeze(dim=2)"))
                rows.append(row(f"{canon}.bias", split, f"{src}.bias"))
        else:
            canon = f"{E}wavenet.res_skip_layers.{w}.skip"
            rows.append(wn(f"{canon}.weight", src, 0, then="squeeze(dim=2)"))
            rows.append(row(f"{canon}.bias", "copy", f"{src}.bias"))
    return rows


def table(cfg: dict):
    T = E + "transformer."
    layer = T + "layers.{l}."
    rows: list[Row] = [
        # transformer blocks
        *[row(f"{layer}attention.{p}.weight", f"split(dim=0,index={i},parts=3)", f"{layer}attention.wqkv.weight")
          for i, p in enumerate("qkv")],
        row(f"{layer}attention.wo.weight", "copy", f"{layer}attention.wo.weight"),
        *[row(f"{layer}feed_forward.{p}.weight", "copy", f"{layer}feed_forward.{p}.weight") for p in ("w1", "w2", "w3")],
    ]
    for norm in (layer + "attention_norm", layer + "ffn_norm", T + "norm"):
        rows.append(row(f"{norm}.norm.weight", "copy", f"{norm}.norm.weight"))
        rows += _halves(f"{norm}.scale_proj", f"{norm}.shift_proj", f"{norm}.project_layer")
    for l, src in enumerate(cfg["uvit_skip_from"]):
        if src >= 0:
            rows += _linear(f"{T}layers.{l}.skip_in_linear", f"{T}layers.{l}.skip_in_linear")
    # DiT input side
    rows += [
        *_linear(f"{E}cond_projection", f"{E}cond_projection"),
        *_linear(f"{E}cond_x_merge_linear", f"{E}cond_x_merge_linear"),
        *_timestep("t_embedder"),
    ]
    if cfg["long_skip_connection"]:
        rows += _linear(f"{E}skip_linear", f"{E}skip_linear")
    # WaveNet head
    rows += [
        *_timestep("t_embedder2"),
        *_linear(f"{E}conv1", f"{E}conv1"),
        *_linear(f"{E}res_projection", f"{E}res_projection"),
        *_wavenet(cfg),
        wn(f"{E}final_layer.linear.weight", f"{E}final_layer.linear", 0),
        row(f"{E}final_layer.linear.bias", "copy", f"{E}final_layer.linear.bias"),
        *_halves(f"{E}final_layer.shift_proj", f"{E}final_layer.scale_proj", f"{E}final_layer.adaLN_modulation.1"),
        *_linear(f"{E}conv2", f"{E}conv2", op="squeeze(dim=2)"),
    ]
    # length regulator
    n = len(cfg["length_regulator_sampling_ratios"])
    rows += [
        *_linear(f"{LR}content_in_proj", f"{LR}content_in_proj"),
        *[r for i in range(n) for r in (
            *_linear(f"{LR}blocks.{i}.conv", f"{LR}model.{3 * i}"),
            *_linear(f"{LR}blocks.{i}.norm", f"{LR}model.{3 * i + 1}"),
        )],
        *_linear(f"{LR}out_proj", f"{LR}model.{3 * n}", op="squeeze(dim=2)"),
    ]
    # GPT latent projection
    rows += _linear("gpt_layer.{g}", "gpt_layer.{g}")
    loops = {"l": cfg["depth"], "g": len(cfg["gpt_layer_dims"]) - 1}
    return rows, loops
