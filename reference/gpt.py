"""IndexTTS-2 GPT (``gpt.safetensors``, UnifiedVoice v2): speaker conditioning, the
emotion vector, and one teacher-forced pass giving the mel latents and logits.
IndexTTS-2.5 files (metadata ``family_version`` 2.5, schema section ``gpt@2.5``) have
their own entry points, ``ENTRIES_2_5``, described after the 2.0 ones below.

Entry points (inputs in float32; ids and lengths int64):

- ``conditioning(w, feats [B, 1024, T], lengths [B])`` -> ``latents [B, num_latents, model_dim]``:
  ``conditioning_encoder`` (Conformer) then ``perceiver_encoder`` (Perceiver resampler).
  Upstream ``UnifiedVoice.get_conditioning``.  ``feats`` are the normalised semantic
  features channels-first, as ``get_conditioning`` takes them (infer_v2 holds them as
  ``[B, T, 1024]`` and transposes once).  Frames at or past ``lengths`` are padding.
- ``emovec(w, feats [B, 1024, T], lengths [B])`` -> ``emovec [B, model_dim]``:
  ``emo_conditioning_encoder`` + ``emo_perceiver_encoder`` (one latent, width 1024), then
  ``emovec_layer`` and ``emo_layer``.  Upstream ``get_emovec`` (whose input is
  ``[B, T, 1024]``: it transposes before ``get_emo_conditioning``).
- ``merge_emovec(w, spk [B, 1024, T1], emo [B, 1024, T2], spk_lengths, emo_lengths, alpha)``
  -> ``emovec``: ``base + alpha * (emovec(emo) - base)`` with ``base = emovec(spk)``
  (the speaker features also go through the *emotion* encoder).  Upstream ``merge_emovec``.
- ``forward_latents(w, cond_latents [B, num_latents, model_dim], emo_vec [B, model_dim],
  text [B, Lt], text_lengths [B], codes [B, Lm], code_lengths [B])`` ->
  ``latents [B, Lm, model_dim]`` (what infer_v2 hands to s2mel's ``gpt_layer``) and
  ``mel_logits [B, Lm + 2, number_mel_codes]`` (positions: start token, the codes, stop
  token; upstream's ``get_logits`` returns them transposed, ``[B, vocab, Lm + 2]``).
  Upstream ``UnifiedVoice.forward(..., emo_vec=emo_vec, use_speed=...)`` with
  ``do_spk_cond=False``, as infer_v2 calls it.

The GPT sequence is ``[cond_latents + emo_vec, speed_emb[1], speed_emb[0],
start_text, text..., stop_text, stop_text, start_mel, codes..., stop_mel, stop_mel]``:
text ids at or past ``text_lengths`` become ``stop_text_token``, then one
``stop_text_token`` is appended and ``start_text_token`` prepended; the codes likewise
with the mel tokens.  ``text_pos_embedding`` rows ``0..Lt+1`` are added to the text part
and ``mel_pos_embedding`` rows ``0..Lm+1`` to the mel part; the GPT-2 stack itself has no
position embedding.  There is no padding mask in the GPT: only the causal mask.  The
stack's output goes through ``gpt.ln_f`` and then ``final_norm``; ``latents`` are the
normed mel positions without the last two, ``mel_logits`` ``mel_head`` of all of them.

Tensors, by stack (``{i}`` GPT block, ``{b}`` Conformer block, ``{l}`` Perceiver layer):

- GPT-2: ``gpt.h.{i}.ln_1``, ``attn.q/k/v/out``, ``ln_2``, ``mlp.fc/proj`` (weights
  ``[out, in]``, biases); ``gpt.ln_f``; ``final_norm``; ``mel_head``; ``text_embedding``,
  ``text_pos_embedding``, ``mel_embedding``, ``mel_pos_embedding``, ``speed_emb``.
  (``text_head`` is not used by these entry points.)
- Conformer ``<enc>`` = ``conditioning_encoder`` / ``emo_conditioning_encoder``:
  ``embed.conv`` (Conv2d 1 -> d, 3x3, stride 2), ``embed.out``, ``embed.pos_enc.pe``;
  ``encoders.{b}.norm_mha``, ``self_attn.linear_q/k/v/out``, ``linear_pos``,
  ``pos_bias_u/v``; ``norm_conv``, ``conv_module.pointwise_conv1.value/gate``,
  ``depthwise_conv``, ``norm``, ``pointwise_conv2``; ``norm_ff``, ``feed_forward.w_1/w_2``;
  ``norm_final``; ``after_norm``.
- Perceiver ``<per>`` = ``perceiver_encoder`` / ``emo_perceiver_encoder``: ``latents``,
  ``proj_context`` (when ``has_proj_context``), ``layers.{l}.attn.to_q/to_k/to_v/to_out``,
  ``layers.{l}.ff.value/gate/out``, ``norm.gamma``.
- ``emovec_layer`` (1024 -> model_dim), ``emo_layer``.

IndexTTS-2.5 (``ENTRIES_2_5``; no speaker Conformer or Perceiver, no ``speed_emb``):

- ``conditioning(w, style [B, speaker_embedding_dim])`` -> ``latents [B, 1, model_dim]``:
  ``spk_emb_proj`` of the CAMPPlus style vector.  Upstream ``spk_emb_proj`` as
  ``inference_speech`` applies it to ``campplus_embedding`` (``forward``'s
  ``do_spk_cond`` path: ``spk_emb_proj(x).unsqueeze(1)``).
- ``emovec``, ``merge_emovec``: as in 2.0.
- ``forward_latents(w, cond_latents [B, 1, model_dim], emo_vec, text, text_lengths, codes,
  code_lengths, lang [B])`` -> ``latents [B, Lm, model_dim]``, ``mel_logits [B, Lm + 2,
  number_mel_codes]``: the sequence the 2.5 generation runs, teacher-forced.  Per item
  ``[cond_latents + emo_vec, 0, 0, start_text, text[:length], stop_text, start_mel,
  codes..., stop_mel, stop_mel]`` (``condition_zero_rows`` zero rows; codes framed as in
  2.0), with ``lang_embedding[lang]`` added to every text position (start and stop
  included) besides ``text_pos_embedding``; items are left-padded to one length and
  padded positions are masked as keys (they attend to themselves only, and their
  activations are recorded as zeros), as ``prepare_gpt_inputs`` pads the prompt and
  masks it.  Upstream ``prepare_gpt_inputs(conds, text, langs)`` and the
  ``GPT2InferenceModel`` forward that ``generate`` runs, given the codes at once.

Activations recorded: ``<enc>.{b}`` (after Conformer block b), ``<per>.{l}`` (latents
after Perceiver layer l), ``gpt.{i}`` (after GPT-2 block i, before ``gpt.ln_f``), and
``emo_conditioning`` (the 1024-wide emotion perceiver output).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .entry import Entry, record


# ------------------------------------------------------------------ small pieces


def linear(x, w, name: str, bias: bool = True):
    """``x @ W.T (+ b)`` with ``W = w[name.weight]`` ``[out, in]``."""
    return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"] if bias else None)


def layer_norm(x, w, name: str, eps: float):
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def _require(cfg: dict, key: str, want, where: str) -> None:
    if cfg[key] != want:
        raise ValueError(f"{where}: config {key!r} = {cfg[key]!r}; this reference implements {want!r} only")


def _heads(x, n_heads: int):
    """``[B, T, H*D]`` -> ``[B, H, T, D]``."""
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def _merge_heads(x):
    """``[B, H, T, D]`` -> ``[B, T, H*D]``."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


# ------------------------------------------------------------------ Conformer encoder


def conformer_subsample(w, enc: str, c: dict, x, lengths):
    """Conv2dSubsampling2 + relative-position input scaling.

    ``x`` ``[B, T, input_size]`` -> ``h`` ``[B, T', d]`` (already ``* sqrt(d)``),
    ``pos`` ``[T', d]`` (rows 0..T'-1 of ``pe``), ``valid`` bool ``[B, T']``.
    Output frame j covers input frames ``s*j .. s*j + k - 1`` and is valid when its last
    input frame is: ``s*j + k - 1 < length`` (upstream: the input mask ``[:, 2::2]``)."""
    k, s = c["subsample_kernel"], c["subsample_stride"]
    h = F.conv2d(x.unsqueeze(1), w[f"{enc}.embed.conv.weight"], w[f"{enc}.embed.conv.bias"], stride=s)
    h = torch.relu(h)  # [B, d, T', F']
    b, d, t, f = h.shape
    h = h.permute(0, 2, 1, 3).reshape(b, t, d * f)  # per frame: channel-major (c * F' + f)
    h = linear(h, w, f"{enc}.embed.out") * math.sqrt(c["output_size"])
    pos = w[f"{enc}.embed.pos_enc.pe"][:t]
    frames = torch.arange(t, device=x.device)
    valid = lengths.unsqueeze(1) > s * frames.unsqueeze(0) + (k - 1)
    return h, pos, valid


def rel_pos_attention(w, p: str, c: dict, x, pos, valid):
    """Self-attention with relative-position terms and no rel_shift:
    ``scores = ((q + u) k^T + (q + v) P^T) / sqrt(head_dim)``, ``P = linear_pos(pe rows)``.
    Padded keys get -inf; their weights are then set to 0 (a row with no valid key
    gives zeros, not NaN)."""
    n = c["attention_heads"]
    q = linear(x, w, f"{p}.linear_q").view(*x.shape[:2], n, -1)  # [B, T, H, D]
    k = _heads(linear(x, w, f"{p}.linear_k"), n)
    v = _heads(linear(x, w, f"{p}.linear_v"), n)
    pe = _heads(linear(pos.unsqueeze(0), w, f"{p}.linear_pos", bias=False), n)  # [1, H, T, D]
    q_u = (q + w[f"{p}.pos_bias_u"]).transpose(1, 2)
    q_v = (q + w[f"{p}.pos_bias_v"]).transpose(1, 2)
    scores = (q_u @ k.transpose(-2, -1) + q_v @ pe.transpose(-2, -1)) / math.sqrt(c["head_dim"])
    pad = ~valid[:, None, None, :]
    attn = torch.softmax(scores.masked_fill(pad, float("-inf")), dim=-1).masked_fill(pad, 0.0)
    return linear(_merge_heads(attn @ v), w, f"{p}.linear_out")


def conv_module(w, p: str, c: dict, x, valid):
    """Padded frames zeroed -> GLU (value * sigmoid(gate)) -> depthwise conv ('same',
    zero padding) -> LayerNorm -> SiLU -> pointwise_conv2 -> padded frames zeroed.
    The GLU's bias makes padded frames non-zero before the depthwise conv, which then
    leaks them into valid frames near the end; upstream does the same."""
    keep = valid.unsqueeze(-1)
    x = x.masked_fill(~keep, 0.0)
    x = linear(x, w, f"{p}.pointwise_conv1.value") * torch.sigmoid(linear(x, w, f"{p}.pointwise_conv1.gate"))
    kernel = c["cnn_module_kernel"]
    x = F.conv1d(x.transpose(1, 2), w[f"{p}.depthwise_conv.weight"], w[f"{p}.depthwise_conv.bias"],
                 padding=(kernel - 1) // 2, groups=c["output_size"]).transpose(1, 2)
    x = F.silu(layer_norm(x, w, f"{p}.norm", c["layer_norm_eps"]))
    x = linear(x, w, f"{p}.pointwise_conv2")
    return x.masked_fill(~keep, 0.0)


def conformer_block(w, p: str, c: dict, x, pos, valid):
    """Pre-norm: attention, conv module, feed-forward (SiLU), each a residual; then norm_final."""
    eps = c["layer_norm_eps"]
    x = x + rel_pos_attention(w, f"{p}.self_attn", c, layer_norm(x, w, f"{p}.norm_mha", eps), pos, valid)
    x = x + conv_module(w, f"{p}.conv_module", c, layer_norm(x, w, f"{p}.norm_conv", eps), valid)
    y = layer_norm(x, w, f"{p}.norm_ff", eps)
    x = x + linear(F.silu(linear(y, w, f"{p}.feed_forward.w_1")), w, f"{p}.feed_forward.w_2")
    return layer_norm(x, w, f"{p}.norm_final", eps)


def conformer(w, enc: str, x, lengths, acts=None):
    """``x`` ``[B, T, input_size]`` -> (``[B, T', d]``, valid ``[B, T']``)."""
    c = w.config[enc]
    for key, want in (("input_layer", "conv2d2"), ("pos_enc_layer_type", "rel_pos"), ("rel_shift", False),
                      ("normalize_before", True), ("macaron_style", False), ("use_cnn_module", True),
                      ("concat_after", False), ("activation", "swish")):
        _require(c, key, want, enc)
    h, pos, valid = conformer_subsample(w, enc, c, x, lengths)
    for b in range(c["num_blocks"]):
        h = conformer_block(w, f"{enc}.encoders.{b}", c, h, pos, valid)
        record(acts, f"{enc}.{b}", h)
    return layer_norm(h, w, f"{enc}.after_norm", c["layer_norm_eps"]), valid


# ------------------------------------------------------------------ Perceiver resampler


def perceiver_attention(w, p: str, c: dict, latents, context, key_valid):
    """Latents attend over ``cat(latents, context)`` (keys/values), scale 1/sqrt(dim_head)."""
    n = c["heads"]
    kv = torch.cat([latents, context], dim=1)
    q = _heads(F.linear(latents, w[f"{p}.to_q.weight"]), n)
    k = _heads(F.linear(kv, w[f"{p}.to_k.weight"]), n)
    v = _heads(F.linear(kv, w[f"{p}.to_v.weight"]), n)
    scores = (q @ k.transpose(-2, -1)) * c["dim_head"] ** -0.5
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))  # latents are always valid
    return F.linear(_merge_heads(torch.softmax(scores, dim=-1) @ v), w[f"{p}.to_out.weight"])


def perceiver_ff(w, p: str, x):
    """GEGLU: ``out(value(x) * gelu(gate(x)))`` with the exact (erf) GELU."""
    return linear(linear(x, w, f"{p}.value") * F.gelu(linear(x, w, f"{p}.gate")), w, f"{p}.out")


def perceiver(w, per: str, context, context_valid, acts=None):
    """``context`` ``[B, S, dim_context]``, valid ``[B, S]`` -> ``[B, num_latents, dim]``.
    No norm inside the layers; one RMSNorm at the end."""
    c = w.config[per]
    _require(c, "cross_attn_include_queries", True, per)
    _require(c, "norm", "rms", per)
    _require(c, "ff_activation", "gelu", per)
    if c["has_proj_context"]:
        context = linear(context, w, f"{per}.proj_context")
    b = context.shape[0]
    latents = w[f"{per}.latents"].unsqueeze(0).expand(b, -1, -1)
    key_valid = torch.cat([torch.ones(b, latents.shape[1], dtype=torch.bool, device=context.device), context_valid], 1)
    for l in range(c["depth"]):
        p = f"{per}.layers.{l}"
        latents = latents + perceiver_attention(w, f"{p}.attn", c, latents, context, key_valid)
        latents = latents + perceiver_ff(w, f"{p}.ff", latents)
        record(acts, f"{per}.{l}", latents)
    # RMSNorm: x / max(||x||, eps) * sqrt(dim) * gamma
    return F.normalize(latents, dim=-1, eps=c["rms_norm_eps"]) * math.sqrt(c["dim"]) * w[f"{per}.norm.gamma"]


# ------------------------------------------------------------------ entry points


def conditioning(w, feats, lengths, acts=None):
    """Speaker conditioning latents ``[B, num_latents, model_dim]`` from ``feats`` ``[B, 1024, T]``."""
    h, valid = conformer(w, "conditioning_encoder", feats.transpose(1, 2), lengths, acts)
    out = perceiver(w, "perceiver_encoder", h, valid, acts)
    record(acts, "latents", out)
    return out


def emovec(w, feats, lengths, acts=None):
    """Emotion vector ``[B, model_dim]`` from ``feats`` ``[B, 1024, T]``."""
    h, valid = conformer(w, "emo_conditioning_encoder", feats.transpose(1, 2), lengths, acts)
    e = perceiver(w, "emo_perceiver_encoder", h, valid, acts)[:, 0]  # one latent, [B, 1024]
    record(acts, "emo_conditioning", e)
    out = linear(linear(e, w, "emovec_layer"), w, "emo_layer")
    record(acts, "emovec", out)
    return out


def merge_emovec(w, spk_feats, emo_feats, spk_lengths, emo_lengths, alpha, acts=None):
    """``base + alpha * (emovec(emo) - base)``, ``base = emovec(spk)`` (activations of the
    emotion reference's pass are recorded)."""
    emo = emovec(w, emo_feats, emo_lengths, acts)
    base = emovec(w, spk_feats, spk_lengths)
    return base + alpha * (emo - base)


def gpt_block(w, p: str, cfg: dict, h, valid=None):
    """GPT-2 block: pre-LN causal self-attention and pre-LN MLP (gelu_new), both residual.
    ``valid`` [B, S] (2.5's left-padded prompts): padded keys are masked, except for
    a padded query's own position (so no row is empty)."""
    eps, n = cfg["gpt_layer_norm_epsilon"], cfg["heads"]
    x = layer_norm(h, w, f"{p}.ln_1", eps)
    q, k, v = (_heads(linear(x, w, f"{p}.attn.{r}"), n) for r in "qkv")
    scores = (q @ k.transpose(-2, -1)) * cfg["head_dim"] ** -0.5
    s = scores.shape[-1]
    future = torch.ones(s, s, dtype=torch.bool, device=h.device).triu(1)  # key after query
    if valid is not None:
        eye = torch.eye(s, dtype=torch.bool, device=h.device)
        future = future | (~valid[:, None, None, :] & ~eye)  # [B, 1, S, S]
    attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    h = h + linear(_merge_heads(attn @ v), w, f"{p}.attn.out")
    x = layer_norm(h, w, f"{p}.ln_2", eps)
    return h + linear(F.gelu(linear(x, w, f"{p}.mlp.fc"), approximate="tanh"), w, f"{p}.mlp.proj")


def gpt(w, h, acts=None, valid=None):
    """The GPT-2 stack on input embeddings ``[B, S, model_dim]`` (no position embedding
    inside), ending with ``gpt.ln_f``.  ``valid`` [B, S]: positions that are not padding
    (2.5); padded rows are zeroed after each block."""
    cfg = w.config
    _require(cfg, "gpt_activation", "gelu_new", "gpt")
    for i in range(cfg["layers"]):
        h = gpt_block(w, f"gpt.h.{i}", cfg, h, valid)
        if valid is not None:
            h = h.masked_fill(~valid.unsqueeze(-1), 0.0)
        record(acts, f"gpt.{i}", h)
    return layer_norm(h, w, "gpt.ln_f", cfg["gpt_layer_norm_epsilon"])


def _framed(ids, lengths, start: int, stop: int):
    """Ids at or past ``lengths`` -> ``stop``; then ``[start, ids..., stop]``."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    ids = torch.where(pos.unsqueeze(0) < lengths.unsqueeze(1), ids, torch.full_like(ids, stop))
    b = ids.shape[0]
    return torch.cat([torch.full((b, 1), start, dtype=ids.dtype, device=ids.device), ids,
                      torch.full((b, 1), stop, dtype=ids.dtype, device=ids.device)], 1)


def mel_outputs(w, h_mel, acts=None):
    """From the GPT-2 outputs at the framed mel positions ``[B, Lm + 2, d]``: ``final_norm``,
    then the latents (without the start/stop positions) and ``mel_head``'s logits."""
    mel = layer_norm(h_mel, w, "final_norm", w.config["final_norm_eps"])
    latents, logits = mel[:, :-2], linear(mel, w, "mel_head")
    record(acts, "latents", latents)
    record(acts, "mel_logits", logits)
    return latents, logits


def forward_latents(w, cond_latents, emo_vec, text, text_lengths, codes, code_lengths, acts=None):
    """Teacher-forced pass: (``latents [B, Lm, d]``, ``mel_logits [B, Lm + 2, number_mel_codes]``)."""
    cfg = w.config
    b = cond_latents.shape[0]
    speed = w["speed_emb.weight"]
    conds = torch.cat([cond_latents + emo_vec.unsqueeze(1),
                       speed[1].expand(b, 1, -1),  # upstream's "duration_emb_half" (row 1) first
                       speed[0].expand(b, 1, -1)], 1)
    t = _framed(text, text_lengths, cfg["start_text_token"], cfg["stop_text_token"])
    text_emb = w["text_embedding.weight"][t] + w["text_pos_embedding.weight"][: t.shape[1]]
    m = _framed(codes, code_lengths, cfg["start_mel_token"], cfg["stop_mel_token"])
    mel_emb = w["mel_embedding.weight"][m] + w["mel_pos_embedding.weight"][: m.shape[1]]
    h = gpt(w, torch.cat([conds, text_emb, mel_emb], 1), acts)
    return mel_outputs(w, h[:, -m.shape[1]:], acts)


# ------------------------------------------------------------------ IndexTTS-2.5


def speaker_conditioning(w, style, acts=None):
    """2.5: the speaker latent ``[B, 1, model_dim]`` from the CAMPPlus style ``[B, 192]``."""
    _require(w.config, "speaker_conditioning", "campplus", "gpt")
    out = linear(style, w, "spk_emb_proj").unsqueeze(1)
    record(acts, "latents", out)
    return out


def forward_latents_2_5(w, cond_latents, emo_vec, text, text_lengths, codes, code_lengths, lang, acts=None):
    """2.5 teacher-forced pass: (``latents [B, Lm, d]``, ``mel_logits [B, Lm + 2, number_mel_codes]``)."""
    cfg = w.config
    b, d = cond_latents.shape[0], cfg["model_dim"]
    conds = torch.cat([cond_latents + emo_vec.unsqueeze(1),
                       cond_latents.new_zeros(b, cfg["condition_zero_rows"], d)], 1)
    m = _framed(codes, code_lengths, cfg["start_mel_token"], cfg["stop_mel_token"])
    mel_emb = w["mel_embedding.weight"][m] + w["mel_pos_embedding.weight"][: m.shape[1]]
    width = conds.shape[1] + text.shape[1] + 2  # the longest prompt: conds, start, text, stop
    rows, valid = [], []
    for i in range(b):
        n = int(text_lengths[i])
        t = torch.cat([text.new_tensor([cfg["start_text_token"]]), text[i, :n], text.new_tensor([cfg["stop_text_token"]])])
        text_emb = (w["text_embedding.weight"][t] + w["text_pos_embedding.weight"][: t.shape[0]]
                    + w["lang_embedding.weight"][lang[i]])
        prompt = torch.cat([conds[i], text_emb])
        pad = width - prompt.shape[0]
        rows.append(torch.cat([prompt.new_zeros(pad, d), prompt, mel_emb[i]]))
        valid.append(torch.arange(width + m.shape[1], device=text.device) >= pad)
    valid = torch.stack(valid)
    h = gpt(w, torch.stack(rows), acts, valid)
    return mel_outputs(w, h[:, -m.shape[1]:], acts)


# ------------------------------------------------------------------ ENTRIES

B, T_COND, T_EMO, L_TEXT, L_CODES = 2, 40, 34, 6, 8


def _feats(g, t):
    """Semantic features ``[B, 1024, t]`` (normalised upstream, so O(1)) and lengths
    with the second item padded."""
    return torch.randn(B, 1024, t, generator=g), torch.tensor([t, t - 9], dtype=torch.int64)


def _conditioning_inputs(cfg, g):
    x, n = _feats(g, T_COND)
    return {"feats": x, "lengths": n}


def _emovec_inputs(cfg, g):
    x, n = _feats(g, T_EMO)
    return {"feats": x, "lengths": n}


def _merge_inputs(cfg, g):
    spk, spk_n = _feats(g, T_COND)
    emo, emo_n = _feats(g, T_EMO)
    return {"spk_feats": spk, "emo_feats": emo, "spk_lengths": spk_n, "emo_lengths": emo_n,
            "alpha": torch.tensor(0.6)}


def _forward_inputs(cfg, g):
    d = cfg["model_dim"]
    lt = min(L_TEXT, cfg["max_text_tokens"])
    lm = min(L_CODES, cfg["max_mel_tokens"])
    return {
        "cond_latents": torch.randn(B, cfg["condition_num_latent"], d, generator=g),
        "emo_vec": torch.randn(B, d, generator=g),
        "text": torch.randint(0, cfg["number_text_tokens"], (B, lt), generator=g),
        "text_lengths": torch.tensor([lt, lt - 2], dtype=torch.int64),
        "codes": torch.randint(0, min(cfg["start_mel_token"], cfg["stop_mel_token"]), (B, lm), generator=g),
        "code_lengths": torch.tensor([lm, lm - 3], dtype=torch.int64),
    }


def _run_forward(w, acts, **x):
    latents, logits = forward_latents(w, acts=acts, **x)
    return {"latents": latents, "mel_logits": logits}


ENTRIES = (
    Entry("conditioning", "UnifiedVoice.get_conditioning(speech_conditioning_input [B, 1024, T], cond_mel_lengths)",
          ("feats", "lengths"), ("latents",), _conditioning_inputs,
          lambda w, acts, feats, lengths: {"latents": conditioning(w, feats, lengths, acts)}),
    Entry("emovec", "UnifiedVoice.get_emovec(feats.transpose(1, 2), lengths): get_emo_conditioning, emovec_layer, emo_layer",
          ("feats", "lengths"), ("emovec",), _emovec_inputs,
          lambda w, acts, feats, lengths: {"emovec": emovec(w, feats, lengths, acts)}),
    Entry("merge_emovec", "UnifiedVoice.merge_emovec(spk.transpose(1, 2), emo.transpose(1, 2), spk_lengths, emo_lengths, alpha)",
          ("spk_feats", "emo_feats", "spk_lengths", "emo_lengths", "alpha"), ("emovec",), _merge_inputs,
          lambda w, acts, spk_feats, emo_feats, spk_lengths, emo_lengths, alpha:
              {"emovec": merge_emovec(w, spk_feats, emo_feats, spk_lengths, emo_lengths, alpha, acts)}),
    Entry("forward_latents", "UnifiedVoice.forward(cond_latents, text, text_lengths, codes, code_lengths, None, "
          "emo_vec=emo_vec, use_speed=zeros(B)) as infer_v2 calls it (latents); mel_head of the same final_norm output (mel_logits)",
          ("cond_latents", "emo_vec", "text", "text_lengths", "codes", "code_lengths"), ("latents", "mel_logits"),
          _forward_inputs, _run_forward),
)


# ------------------------------------------------------------------ ENTRIES_2_5


def _style_inputs(cfg, g):
    return {"style": torch.randn(B, cfg["speaker_embedding_dim"], generator=g)}


def _forward_inputs_2_5(cfg, g):
    """Text ids other than the start/stop text tokens (the prompt builder strips those),
    the second item 2 shorter (left-padded), and two language ids."""
    d = cfg["model_dim"]
    lt = min(L_TEXT, cfg["max_text_tokens"])
    lm = min(L_CODES, cfg["max_mel_tokens"])
    special = sorted({cfg["start_text_token"], cfg["stop_text_token"]})
    text = torch.randint(0, cfg["number_text_tokens"] - len(special), (B, lt), generator=g)
    for s in special:  # skip the special ids, keeping the draw uniform over the others
        text = text + (text >= s).long()
    return {
        "cond_latents": torch.randn(B, 1, d, generator=g),
        "emo_vec": torch.randn(B, d, generator=g),
        "text": text,
        "text_lengths": torch.tensor([lt, lt - 2], dtype=torch.int64),
        "codes": torch.randint(0, min(cfg["start_mel_token"], cfg["stop_mel_token"]), (B, lm), generator=g),
        "code_lengths": torch.tensor([lm, lm - 3], dtype=torch.int64),
        "lang": torch.randint(0, len(cfg["languages"]), (B,), generator=g),
    }


def _run_forward_2_5(w, acts, **x):
    latents, logits = forward_latents_2_5(w, acts=acts, **x)
    return {"latents": latents, "mel_logits": logits}


ENTRIES_2_5 = (
    Entry("conditioning", "IndexTTS-2.5 UnifiedVoice.spk_emb_proj(campplus_embedding) as inference_speech applies it "
          "(forward's do_spk_cond path: spk_emb_proj(x).unsqueeze(1))",
          ("style",), ("latents",), _style_inputs,
          lambda w, acts, style: {"latents": speaker_conditioning(w, style, acts)}),
    ENTRIES[1],  # emovec
    ENTRIES[2],  # merge_emovec
    Entry("forward_latents", "IndexTTS-2.5 UnifiedVoice.prepare_gpt_inputs(cat(cond_latents + emo_vec, zeros(B, 2, d)), "
          "text, langs) and the GPT2InferenceModel forward generate() runs, with the framed codes after start_mel "
          "(mel_logits: lm_head = mel_head(final_norm(.)) of the mel positions; latents: final_norm of them, less the last two)",
          ("cond_latents", "emo_vec", "text", "text_lengths", "codes", "code_lengths", "lang"), ("latents", "mel_logits"),
          _forward_inputs_2_5, _run_forward_2_5),
)
