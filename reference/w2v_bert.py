"""w2v-BERT 2.0 encoder (``w2v_bert.safetensors``): the conformer IndexTTS-2 runs on
SeamlessM4T fbank features to get its semantic features.

Tensors (``{i}`` = layer, ``0 .. num_hidden_layers - 1``):
- ``feature_projection.layer_norm.{weight,bias}``, ``feature_projection.projection.{weight,bias}``:
  LayerNorm over the input features, then a Linear to ``hidden_size``
- per layer ``encoder.layers.{i}.``:
  - ``ffn1_layer_norm``, ``ffn1.intermediate_dense``, ``ffn1.output_dense`` (and the same for ``ffn2``):
    the two macaron feed-forwards, each added with weight ``ffn_residual_scale``
  - ``self_attn_layer_norm``, ``self_attn.linear_{q,k,v,out}``: multi-head self-attention
  - ``self_attn.distance_embedding.weight`` ``[left + right + 1, head_size]``: relative_key
    table; query i, key j use row ``clamp(j - i, -left, right) + left``
  - ``conv_module.layer_norm``, ``conv_module.pointwise_conv1.{value,gate}.weight`` (GLU),
    ``conv_module.depthwise_conv.weight`` ``[H, 1, K]`` (causal), ``conv_module.depthwise_layer_norm``,
    ``conv_module.pointwise_conv2.weight``: the convolution module (no biases on the convs)
  - ``final_layer_norm``: the layer's output norm
- ``semantic_stats.{mean,std}`` (profile ``full`` only): IndexTTS-2's feature statistics

Config: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``head_size``,
``left_max_position_embeddings``, ``right_max_position_embeddings``,
``conv_depthwise_kernel_size``, ``conv_depthwise_left_padding``, ``layer_norm_eps``,
``hidden_act``, ``ffn_residual_scale``, ``indextts2_hidden_state_index``, ``profile``.

Profiles: ``full`` keeps every layer and the statistics; ``indextts2`` keeps only the
first ``indextts2_hidden_state_index`` layers and has the statistics folded into the
last layer's ``final_layer_norm`` (so its last hidden state is already normalised).

Masks: ``attention_mask`` ``[B, T]`` (1 = real frame).  Padded frames are set to zero
after the feature projection and again before each ``pointwise_conv1``; padded keys are
excluded from every softmax.  Padded query frames are still computed (their values are
defined, just never meaningful).

Entry points:
- ``hidden_states(w, input_features, attention_mask)``: every hidden state, stacked
  ``[num_hidden_layers + 1, B, T, hidden_size]``; index 0 is the (masked) feature
  projection output, index k the output of layer k - 1.  Upstream: transformers'
  ``Wav2Vec2BertModel(..., output_hidden_states=True).hidden_states``.
- ``semantic_features(w, input_features, attention_mask)``: ``[B, T, hidden_size]``,
  IndexTTS-2's ``get_emb``: ``(hidden_states[17] - mean) / std``.

Activations recorded: ``feature_projection`` and ``encoder.<i>`` (output of layer i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .entry import Entry, record

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def layer_norm(w, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w[f"{prefix}.weight"], w[f"{prefix}.bias"], w.config["layer_norm_eps"])


def linear(w, prefix: str, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    return F.linear(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"] if bias else None)


def frame_mask(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool, True on real frames (all True without a mask)."""
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return attention_mask.to(x.device).bool()


def zero_padded(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Set the padded frames of ``x`` ``[B, T, C]`` to zero."""
    return x.masked_fill(~real.unsqueeze(-1), 0.0)


def feature_projection(w, features: torch.Tensor) -> torch.Tensor:
    """``[B, T, feature_projection_input_dim]`` -> ``[B, T, hidden_size]``."""
    x = layer_norm(w, "feature_projection.layer_norm", features)
    return linear(w, "feature_projection.projection", x)


def feed_forward(w, prefix: str, x: torch.Tensor) -> torch.Tensor:
    act = ACTIVATIONS[w.config["hidden_act"]]
    x = act(linear(w, f"{prefix}.intermediate_dense", x))
    return linear(w, f"{prefix}.output_dense", x)


def relative_key_scores(w, prefix: str, q: torch.Tensor) -> torch.Tensor:
    """Position term of the attention logits, before scaling: ``q_i . table[row(i, j)]``.

    ``q`` is ``[B, heads, T, head_size]``; returns ``[B, heads, T, T]``."""
    cfg = w.config
    left, right = cfg["left_max_position_embeddings"], cfg["right_max_position_embeddings"]
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    distance = (pos[None, :] - pos[:, None]).clamp(-left, right)  # [query, key] = key - query
    table = w[f"{prefix}.distance_embedding.weight"][distance + left]  # [T, T, head_size]
    return torch.einsum("bhqd,qkd->bhqk", q, table)


def self_attention(w, prefix: str, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """relative_key multi-head attention; padded keys (``real`` False) get no weight."""
    cfg = w.config
    b, t, _ = x.shape
    heads, d = cfg["num_attention_heads"], cfg["head_size"]

    def split(y):  # [B, T, H] -> [B, heads, T, head_size]
        return y.view(b, t, heads, d).transpose(1, 2)

    q = split(linear(w, f"{prefix}.linear_q", x))
    k = split(linear(w, f"{prefix}.linear_k", x))
    v = split(linear(w, f"{prefix}.linear_v", x))
    scale = d ** -0.5  # applied to the content and the position term alike
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + relative_key_scores(w, prefix, q) * scale
    scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, heads, T, head_size]
    out = out.transpose(1, 2).reshape(b, t, heads * d)
    return linear(w, f"{prefix}.linear_out", out)


def conv_module(w, prefix: str, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """LayerNorm -> GLU (value * sigmoid(gate)) -> causal depthwise conv -> LayerNorm ->
    hidden_act -> pointwise_conv2.  ``x`` ``[B, T, H]``; returns ``[B, T, H]``."""
    cfg = w.config
    h = layer_norm(w, f"{prefix}.layer_norm", x)
    h = zero_padded(h, real)
    value = linear(w, f"{prefix}.pointwise_conv1.value", h, bias=False)
    gate = linear(w, f"{prefix}.pointwise_conv1.gate", h, bias=False)
    h = value * torch.sigmoid(gate)
    # depthwise conv over time, channels first; causal: all padding on the left
    h = F.pad(h.transpose(1, 2), (cfg["conv_depthwise_left_padding"], 0))
    h = F.conv1d(h, w[f"{prefix}.depthwise_conv.weight"], groups=cfg["hidden_size"]).transpose(1, 2)
    h = layer_norm(w, f"{prefix}.depthwise_layer_norm", h)
    h = ACTIVATIONS[cfg["hidden_act"]](h)
    return linear(w, f"{prefix}.pointwise_conv2", h, bias=False)


def encoder_layer(w, i: int, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    p = f"encoder.layers.{i}"
    half = w.config["ffn_residual_scale"]
    x = x + half * feed_forward(w, f"{p}.ffn1", layer_norm(w, f"{p}.ffn1_layer_norm", x))
    x = x + self_attention(w, f"{p}.self_attn", layer_norm(w, f"{p}.self_attn_layer_norm", x), real)
    x = x + conv_module(w, f"{p}.conv_module", x, real)
    x = x + half * feed_forward(w, f"{p}.ffn2", layer_norm(w, f"{p}.ffn2_layer_norm", x))
    return layer_norm(w, f"{p}.final_layer_norm", x)


def all_hidden_states(w, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      acts: dict | None = None, layers: int | None = None) -> list[torch.Tensor]:
    """``[hidden_states[0], ..., hidden_states[layers]]`` (all layers by default)."""
    layers = w.config["num_hidden_layers"] if layers is None else layers
    real = frame_mask(attention_mask, input_features)
    h = zero_padded(feature_projection(w, input_features), real)
    record(acts, "feature_projection", h)
    out = [h]
    for i in range(layers):
        h = encoder_layer(w, i, h, real)
        record(acts, f"encoder.{i}", h)
        out.append(h)
    return out


def hidden_states(w, input_features, attention_mask=None, acts=None) -> torch.Tensor:
    """Every hidden state, ``[num_hidden_layers + 1, B, T, hidden_size]``."""
    out = torch.stack(all_hidden_states(w, input_features, attention_mask, acts))
    record(acts, "hidden_states", out)
    return out


def semantic_features(w, input_features, attention_mask=None, acts=None) -> torch.Tensor:
    """IndexTTS-2's normalised semantic features ``[B, T, hidden_size]``.

    Runs only the layers up to ``indextts2_hidden_state_index``.  Profile ``full``
    normalises with ``semantic_stats``; profile ``indextts2`` has the statistics
    folded into the last layer norm, so its last hidden state is the result."""
    cfg = w.config
    k = cfg["indextts2_hidden_state_index"]
    h = all_hidden_states(w, input_features, attention_mask, acts, layers=k)[k]
    if cfg["profile"] == "full":
        h = (h - w["semantic_stats.mean"]) / w["semantic_stats.std"]
    elif cfg["profile"] != "indextts2":
        raise ValueError(f"{w.path}: unknown w2v-bert profile {cfg['profile']!r}")
    record(acts, "semantic_features", h)
    return h


def _inputs(cfg, g):
    """Two items of different lengths (so one is padded), each long enough that some
    query-key distances pass the relative-position clamp on both sides."""
    left, right = cfg["left_max_position_embeddings"], cfg["right_max_position_embeddings"]
    long = left + right + 4
    lengths = (long, max(left, right) + 2)
    x = torch.randn(len(lengths), long, cfg["feature_projection_input_dim"], generator=g)
    mask = torch.zeros(len(lengths), long, dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        x[b, n:] = 0.0  # the feature extractor pads with zeros
    return {"input_features": x, "attention_mask": mask}


ENTRIES = (
    Entry("hidden_states",
          "transformers Wav2Vec2BertModel(input_features, attention_mask, output_hidden_states=True).hidden_states, stacked",
          ("input_features", "attention_mask"), ("hidden_states",), _inputs,
          lambda w, acts, input_features, attention_mask:
              {"hidden_states": hidden_states(w, input_features, attention_mask, acts)}),
    Entry("semantic_features",
          "indextts/infer_v2.py IndexTTS2.get_emb: (hidden_states[17] - semantic_mean) / semantic_std",
          ("input_features", "attention_mask"), ("semantic_features",), _inputs,
          lambda w, acts, input_features, attention_mask:
              {"semantic_features": semantic_features(w, input_features, attention_mask, acts)}),
)
