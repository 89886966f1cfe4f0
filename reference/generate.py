"""The GPT's autoregressive code generation, as upstream runs it through Hugging Face
``generate`` on ``GPT2InferenceModel``, from the canonical ``gpt.safetensors`` alone.

The prompt (:func:`prompt_2_0`, :func:`prompt_2_5`) is a sequence of input embeddings;
generation then feeds ``start_mel_token`` at mel position 0 and each new code at the
next mel position (``mel_embedding[code] + mel_pos_embedding[i]``), with a key/value
cache, and reads ``mel_head(final_norm(ln_f(h)))`` at the last position.  It stops at
``stop_mel_token`` (kept in the output, as ``generate`` keeps it) or after
``max_codes`` tokens.

Choosing the next token (:func:`choose`), in ``generate``'s order:

1. Repetition penalty over every id in the running ``input_ids``: upstream's
   ``input_ids`` are a fake prompt of ones (one per prompt embedding) and
   ``start_mel_token``, then the generated codes, so ids ``1`` and
   ``start_mel_token`` are penalised from the first step on.  A logit ``s`` of a
   penalised id becomes ``s * p`` where ``s < 0``, else ``s / p``.
2. Greedy: the first index of the largest score.  Otherwise temperature, top-k (ids
   below the k-th largest score removed), top-p (the smallest scores whose cumulative
   probability is at most ``1 - top_p`` removed, the largest always kept), then one
   draw from the softmax with ``torch.multinomial`` on the caller's generator.

Beam search (upstream's default ``num_beams=3``) is not implemented; :class:`Decoding`
refuses ``num_beams != 1`` by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gpt import _heads, _merge_heads, layer_norm, linear


@dataclass(frozen=True)
class Decoding:
    """How the next code is chosen.  ``greedy`` ignores temperature, top-k and top-p (as
    ``generate(do_sample=False)``) but keeps the repetition penalty."""

    greedy: bool = True
    temperature: float = 0.8
    top_k: int = 30
    top_p: float = 0.8
    repetition_penalty: float = 10.0
    num_beams: int = 1

    def __post_init__(self):
        if self.num_beams != 1:
            raise ValueError(f"num_beams={self.num_beams}: beam search is not implemented in the reference; "
                             "it decodes one sequence (num_beams=1)")
        if not self.greedy and (self.temperature <= 0 or self.top_k < 1 or not 0 < self.top_p <= 1):
            raise ValueError(f"bad sampling settings: temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}")


@dataclass
class Prompt:
    """Input embeddings ``[1, S, d]``, which of them are real (``valid`` ``[1, S]``:
    left padding is not), and the fake prompt ids the repetition penalty sees."""

    embeddings: torch.Tensor
    valid: torch.Tensor
    penalised: list[int]


def prompt_2_0(w, cond_latents, emo_vec, text) -> Prompt:
    """``prepare_gpt_inputs`` of IndexTTS-2: ``[cond_latents + emo_vec, speed_emb[1],
    speed_emb[0]]``, then ``text_embedding + text_pos_embedding`` of ``[start_text,
    text..., stop_text]``, where ids equal to start/stop_text_token are first removed
    from ``text`` and the prompt is left-padded by as many zero rows (masked)."""
    cfg = w.config
    speed = w["speed_emb.weight"]
    conds = torch.cat([cond_latents + emo_vec.unsqueeze(1), speed[1][None, None], speed[0][None, None]], 1)
    return _with_text(w, conds, text[0], extra=None, removed=(cfg["start_text_token"], cfg["stop_text_token"]))


def prompt_2_5(w, cond_latent, emo_vec, text, lang: int) -> Prompt:
    """IndexTTS-2.5's ``prepare_gpt_inputs``: ``[cond_latent + emo_vec,
    condition_zero_rows zero rows]`` then the framed text, with ``lang_embedding[lang]``
    added to every text position.  Only ids equal to ``stop_text_token`` are removed
    from ``text`` (2.5 keeps ``start_text_token``, an ordinary character of its
    tokenizer), the prompt left-padded by as many masked zero rows."""
    cfg = w.config
    d = cfg["model_dim"]
    conds = torch.cat([cond_latent + emo_vec.unsqueeze(1), cond_latent.new_zeros(1, cfg["condition_zero_rows"], d)], 1)
    return _with_text(w, conds, text[0], extra=w["lang_embedding.weight"][lang], removed=(cfg["stop_text_token"],))


def _with_text(w, conds, ids, extra, removed) -> Prompt:
    cfg = w.config
    start, stop = cfg["start_text_token"], cfg["stop_text_token"]
    keep = torch.ones_like(ids, dtype=torch.bool)
    for r in removed:
        keep &= ids != r
    kept = ids[keep]
    framed = torch.cat([ids.new_tensor([start]), kept, ids.new_tensor([stop])])
    text_emb = w["text_embedding.weight"][framed] + w["text_pos_embedding.weight"][: framed.shape[0]]
    if extra is not None:
        text_emb = text_emb + extra
    pad = ids.shape[0] - kept.shape[0]
    d = conds.shape[-1]
    emb = torch.cat([conds.new_zeros(1, pad, d), conds, text_emb.unsqueeze(0)], 1)
    valid = torch.arange(emb.shape[1], device=emb.device).unsqueeze(0) >= pad
    return Prompt(emb, valid, [1, cfg["start_mel_token"]])


def _attend(w, i: int, x, cache: list, valid: torch.Tensor):
    """Block ``i``'s causal self-attention for new positions ``x`` ``[1, s, d]`` given
    the cached keys/values; ``valid`` ``[P + s]`` marks real key positions."""
    cfg = w.config
    p = f"gpt.h.{i}.attn"
    q, k, v = (_heads(linear(x, w, f"{p}.{r}"), cfg["heads"]) for r in "qkv")
    if cache[i] is not None:
        k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
    cache[i] = (k, v)
    s, total = q.shape[2], k.shape[2]
    qpos = torch.arange(total - s, total, device=x.device)
    kpos = torch.arange(total, device=x.device)
    hidden = (kpos[None, :] > qpos[:, None]) | (~valid[None, :] & (kpos[None, :] != qpos[:, None]))
    scores = (q @ k.transpose(-2, -1)) * cfg["head_dim"] ** -0.5
    attn = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    return linear(_merge_heads(attn @ v), w, f"{p}.out")


def _step(w, h, cache: list, valid: torch.Tensor):
    """The GPT-2 stack on new input embeddings, with the cache; ``ln_f`` of the last position."""
    cfg = w.config
    eps = cfg["gpt_layer_norm_epsilon"]
    for i in range(cfg["layers"]):
        p = f"gpt.h.{i}"
        h = h + _attend(w, i, layer_norm(h, w, f"{p}.ln_1", eps), cache, valid)
        x = layer_norm(h, w, f"{p}.ln_2", eps)
        h = h + linear(F.gelu(linear(x, w, f"{p}.mlp.fc"), approximate="tanh"), w, f"{p}.mlp.proj")
    return layer_norm(h[:, -1], w, "gpt.ln_f", eps)


def choose(logits: torch.Tensor, seen: torch.Tensor, d: Decoding, generator: torch.Generator | None) -> int:
    """The next id from ``logits`` ``[V]`` (float32), given the ids ``seen`` so far."""
    scores = logits.clone()
    if d.repetition_penalty != 1.0:
        s = scores[seen]
        scores[seen] = torch.where(s < 0, s * d.repetition_penalty, s / d.repetition_penalty)
    if d.greedy:
        return int(torch.argmax(scores))
    scores = scores / d.temperature
    k = min(d.top_k, scores.shape[-1])
    scores = scores.masked_fill(scores < torch.topk(scores, k).values[-1], float("-inf"))
    if d.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - d.top_p
        drop[-1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def generate(w, prompt: Prompt, max_codes: int, d: Decoding, generator: torch.Generator | None = None,
             acts: dict | None = None) -> torch.Tensor:
    """Codes ``[1, n]`` (int64), ``n <= max_codes``, ending with ``stop_mel_token`` when the
    GPT stopped by itself.  ``acts["logits.<i>"]``: the raw logits of step ``i``."""
    cfg = w.config
    start, stop = cfg["start_mel_token"], cfg["stop_mel_token"]
    rows = w["mel_pos_embedding.weight"].shape[0]
    if max_codes < 1 or max_codes > rows - 1:
        raise ValueError(f"max_codes must be in 1..{rows - 1} (mel_pos_embedding has {rows} rows), not {max_codes}")
    cache: list = [None] * cfg["layers"]
    seen = set(prompt.penalised)
    valid = prompt.valid[0]
    _step(w, prompt.embeddings, cache, valid)  # the prompt fills the cache; its output is not used
    token, codes = start, []
    for i in range(max_codes):
        emb = (w["mel_embedding.weight"][token] + w["mel_pos_embedding.weight"][i]).view(1, 1, -1)
        valid = torch.cat([valid, valid.new_ones(1)])
        h = _step(w, emb, cache, valid)
        logits = linear(layer_norm(h, w, "final_norm", cfg["final_norm_eps"]), w, "mel_head")[0].float()
        if acts is not None:
            acts[f"logits.{i}"] = logits.detach()
        token = choose(logits, torch.tensor(sorted(seen), device=logits.device), d, generator)
        codes.append(token)
        seen.add(token)
        if token == stop:
            break
    return torch.tensor([codes], dtype=torch.int64, device=prompt.embeddings.device)


def cut_at_stop(codes: torch.Tensor, stop: int) -> torch.Tensor:
    """The codes before the first ``stop`` (all of them when there is none), as infer_v2 cuts them."""
    hit = (codes[0] == stop).nonzero()
    return codes[:, : int(hit[0, 0])] if len(hit) else codes


def codebook_problem(codes: torch.Tensor, codebook_size: int) -> str | None:
    """Why the cut codes cannot be decoded, or None: a code outside the semantic codec's
    codebook (``start_mel_token``, which a sampled GPT can emit) has no row in
    ``vq2emb``; upstream fails there too (an index error), so the reference says so."""
    bad = (codes < 0) | (codes >= codebook_size)
    if not bool(bad.any()):
        return None
    i = int(bad[0].nonzero()[0, 0])
    return (f"the GPT wrote code {int(codes[0, i])} at position {i}, outside the semantic codec's {codebook_size} "
            "codebook rows (upstream's vq2emb fails on it too); try another seed or --greedy")

