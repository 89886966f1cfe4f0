"""The GPT's autoregressive code generation, as upstream runs it through Hugging Face
``generate`` on ``GPT2InferenceModel``, from the canonical ``gpt.safetensors`` alone.

The prompt (:func:`prompt_2_0`, :func:`prompt_2_5`) is a sequence of input embeddings;
generation then feeds ``start_mel_token`` at mel position 0 and each new code at the
next mel position (``mel_embedding[code] + mel_pos_embedding[i]``), with a key/value
cache, and reads ``mel_head(final_norm(ln_f(h)))`` at the last position.  It stops at
``stop_mel_token`` (kept in the output, as ``generate`` keeps it) or after
``max_codes`` tokens.

Choosing the next token with one beam (:func:`choose`), in ``generate``'s order:

1. Repetition penalty over every id in the running ``input_ids``: upstream's
   ``input_ids`` are a fake prompt of ones (one per prompt embedding) and
   ``start_mel_token``, then the generated codes, so ids ``1`` and
   ``start_mel_token`` are penalised from the first step on.  A logit ``s`` of a
   penalised id becomes ``s * p`` where ``s < 0``, else ``s / p``.
2. Greedy: the first index of the largest score.  Otherwise temperature, top-k (ids
   below the k-th largest score removed), top-p (the smallest scores whose cumulative
   probability is at most ``1 - top_p`` removed, the largest always kept), then one
   draw from the softmax with ``torch.multinomial`` on the caller's generator.

Beam search (``num_beams > 1``, upstream's default is 3 with sampling), as
transformers' ``_beam_search`` runs it for one prompt, ``B`` beams, and one end id
(``stop_mel_token``), so ``K = 2 * B`` candidates a step:

1. Each running beam's raw logits go through ``log_softmax`` first; the processors then
   act on those log-probabilities: the repetition penalty (each beam over its own ids;
   a log-probability is never positive, so a penalised one is multiplied by ``p``) and,
   when sampling, temperature, top-k and top-p, which in beam mode keep at least 2 ids
   (one end id + 1): top-k keeps ``max(top_k, 2)``, top-p never drops the 2 largest.
2. Each beam's running score (the sum of its processed log-probabilities; at the start
   0 for beam 0 and -1e9 for its equal copies, whose probabilities then underflow to 0)
   is added to its row, and the ``B * V`` sums are ranked as one row: greedy takes the
   ``K`` largest (``torch.topk``); sampling draws ``K`` without replacement with one
   ``torch.multinomial(softmax(row), K)`` call on the generator, then sorts the draws
   by score, largest first.  Where fewer than ``K`` ids have a nonzero probability,
   ``multinomial`` fills up with zero-probability ones (ids top-k/top-p removed, score
   -inf, or a copy's); they stay candidates, as in transformers.  A draw's beam is
   ``index // V``, its code ``index % V``.
3. A candidate is done when its code is ``stop_mel_token`` or it has ``max_codes``
   codes.  The ``B`` best candidates after adding -1e9 to the done ones' scores are
   the next running beams, with those scores; the caches are reordered to follow them.
4. Done candidates among the first ``B`` of the ``K`` become finished hypotheses,
   scored ``sum / n ** length_penalty`` (``n`` its code count; upstream passes 0.0, so
   the plain sum); the ``B`` best finished hypotheses so far are kept.
5. Generation stops when every candidate is done (at ``max_codes``), or when ``B``
   hypotheses are finished and the best running score divided by ``n **
   length_penalty`` (``n`` the codes generated so far) is no better than the worst
   finished one (transformers' ``early_stopping=False`` heuristic, which upstream
   leaves at its default).  The best finished hypothesis is returned, its stop code
   kept.

Seeded sampling with one beam and beam sampling draw from the caller's generator as
``generate`` draws from torch's global one, so seeding both alike gives the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gpt import _heads, _merge_heads, layer_norm, linear


@dataclass(frozen=True)
class Decoding:
    """How the next code is chosen.  ``greedy`` ignores temperature, top-k and top-p (as
    ``generate(do_sample=False)``) but keeps the repetition penalty.  ``num_beams > 1``
    is beam search (greedy) or beam sampling; ``length_penalty`` only matters there."""

    greedy: bool = True
    temperature: float = 0.8
    top_k: int = 30
    top_p: float = 0.8
    repetition_penalty: float = 10.0
    num_beams: int = 1
    length_penalty: float = 0.0

    def __post_init__(self):
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a whole number of at least 1, not {self.num_beams!r}")
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
    # drawn on the CPU, where the generator is, whatever the device (a no-op on CPU)
    return int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator))


def _mel_logits(w, tokens: torch.Tensor, i: int, cache: list, valid: torch.Tensor) -> torch.Tensor:
    """Raw logits ``[R, V]`` (float32) of the next code for each of ``R`` rows, fed
    ``tokens`` ``[R]`` at mel position ``i``."""
    emb = (w["mel_embedding.weight"][tokens] + w["mel_pos_embedding.weight"][i]).unsqueeze(1)
    h = _step(w, emb, cache, valid)
    return linear(layer_norm(h, w, "final_norm", w.config["final_norm_eps"]), w, "mel_head").float()


def generate(w, prompt: Prompt, max_codes: int, d: Decoding, generator: torch.Generator | None = None,
             acts: dict | None = None) -> torch.Tensor:
    """Codes ``[1, n]`` (int64), ``n <= max_codes``, ending with ``stop_mel_token`` when the
    GPT stopped by itself.  ``acts["logits.<i>"]``: the raw logits ``[V]`` that code ``i``
    was chosen from (with beams: those of the returned sequence's beam at step ``i``)."""
    cfg = w.config
    start, stop = cfg["start_mel_token"], cfg["stop_mel_token"]
    rows = w["mel_pos_embedding.weight"].shape[0]
    if max_codes < 1 or max_codes > rows - 1:
        raise ValueError(f"max_codes must be in 1..{rows - 1} (mel_pos_embedding has {rows} rows), not {max_codes}")
    cache: list = [None] * cfg["layers"]
    valid = prompt.valid[0]
    _step(w, prompt.embeddings, cache, valid)  # the prompt fills the cache; its output is not used
    if d.num_beams > 1:
        return _beam_search(w, prompt, max_codes, d, generator, acts, cache, valid)
    seen = set(prompt.penalised)
    token, codes = start, []
    for i in range(max_codes):
        valid = torch.cat([valid, valid.new_ones(1)])
        logits = _mel_logits(w, torch.tensor([token], device=valid.device), i, cache, valid)[0]
        if acts is not None:
            acts[f"logits.{i}"] = logits.detach()
        token = choose(logits, torch.tensor(sorted(seen), device=logits.device), d, generator)
        codes.append(token)
        seen.add(token)
        if token == stop:
            break
    return torch.tensor([codes], dtype=torch.int64, device=prompt.embeddings.device)


def beam_scores(logits: torch.Tensor, seen: torch.Tensor, d: Decoding) -> torch.Tensor:
    """Step 1 of beam search: the processed log-probabilities ``[B, V]`` of each beam's
    next code, from its raw ``logits`` ``[B, V]`` (float32) and ``seen`` ``[B, V]``
    (bool: the ids in that beam's running ``input_ids``)."""
    scores = F.log_softmax(logits, dim=-1)
    if d.repetition_penalty != 1.0:
        penalised = torch.where(scores < 0, scores * d.repetition_penalty, scores / d.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if d.greedy:
        return scores
    keep = 2  # beam mode keeps at least (number of end ids + 1) ids through top-k and top-p
    scores = scores / d.temperature
    k = min(max(d.top_k, keep), scores.shape[-1])
    scores = scores.masked_fill(scores < torch.topk(scores, k).values[..., -1:], float("-inf"))
    if d.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - d.top_p
        drop[..., -keep:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def _beam_search(w, prompt: Prompt, max_codes: int, d: Decoding, generator, acts, cache: list, valid) -> torch.Tensor:
    """:func:`generate` with ``d.num_beams`` beams (the module docstring's steps 1-5).
    Scores are kept as ``[1, n]`` rows, the shape transformers ranks them in, so that
    ``topk``, ``sort`` and ``multinomial`` see the same tensors."""
    cfg = w.config
    start, stop = cfg["start_mel_token"], cfg["stop_mel_token"]
    dev = prompt.embeddings.device
    vocab = w["mel_head.weight"].shape[0]
    nb = d.num_beams
    nk = 2 * nb  # candidates a step: transformers keeps max(2, 1 + number of end ids) * num_beams
    beams = torch.arange(nb, device=dev)
    first = beams.new_zeros(nk, dtype=torch.bool)
    first[:nb] = True  # only the first num_beams candidates may become finished hypotheses
    low = -1.0e9  # transformers' "never" score

    # transformers runs the prompt once per beam (num_beams equal rows): copy the cache
    for i, kv in enumerate(cache):
        cache[i] = tuple(t.expand(nb, *t.shape[1:]).contiguous() for t in kv)
    # running beams: their codes, the logits row each code was chosen from, their ids
    # for the repetition penalty (ids outside the vocabulary cannot be penalised), scores
    codes = torch.zeros(nb, 0, dtype=torch.int64, device=dev)
    rows = torch.zeros(nb, 0, dtype=torch.int64, device=dev)
    seen = torch.zeros(nb, vocab, dtype=torch.bool, device=dev)
    seen[:, [t for t in prompt.penalised if t < vocab]] = True
    score = torch.full((1, nb), low, device=dev)
    score[0, 0] = 0.0
    # finished hypotheses: the best num_beams so far, as (codes, rows); empty placeholders
    # scored -1e9 until real ones replace them (transformers returns an empty one if none does)
    done_hyps = [(codes[0], rows[0])] * nb
    done_score = torch.full((1, nb), low, device=dev)
    done_real = torch.zeros(1, nb, dtype=torch.bool, device=dev)
    hopeful = True  # transformers' is_early_stop_heuristic_unsatisfied
    history = []

    for i in range(max_codes):
        tokens = codes[:, -1] if i else torch.full((nb,), start, dtype=torch.int64, device=dev)
        valid = torch.cat([valid, valid.new_ones(1)])
        logits = _mel_logits(w, tokens, i, cache, valid)
        if acts is not None:
            history.append(logits.detach())
        total = (beam_scores(logits, seen, d) + score[0][:, None]).reshape(1, -1)  # [1, B * V]
        if d.greedy:
            top, index = torch.topk(total, nk)
        else:  # K draws without replacement, then ordered by score (a zero-probability id can be drawn last)
            index = torch.multinomial(F.softmax(total, dim=-1).cpu(), nk, generator=generator).to(dev)  # CPU generator
            top, order = total.gather(1, index).sort(dim=-1, descending=True)
            index = index.gather(-1, order)
        src, code = index[0] // vocab, index[0] % vocab
        cand_codes = torch.cat([codes[src], code[:, None]], 1)
        cand_rows = torch.cat([rows[src], src[:, None]], 1)
        ended = (code == stop) | (i + 1 >= max_codes)  # transformers' stopping criteria: end id or max_length

        # the next running beams: the best candidates not ended
        live = top + ended[None].to(torch.float32) * low
        pick = torch.topk(live, nb)[1][0]
        score = live[:, pick]

        # the finished hypotheses: the best of the kept ones and the ended first candidates
        # (transformers also adds -1e9 where its early-stop flags are set; inside this loop
        # they never are, and adding -0.0 changes nothing)
        just = ended & first
        fresh = top / ((i + 1) ** d.length_penalty) + (~just)[None].to(torch.float32) * low
        merged = torch.cat([done_score, fresh], 1)
        best = torch.topk(merged, nb)[1][0]
        hyps = done_hyps + list(zip(cand_codes, cand_rows))
        done_hyps = [hyps[j] for j in best.tolist()]
        done_score = merged[:, best]
        done_real = torch.cat([done_real, just[None]], 1)[:, best]

        codes, rows = cand_codes[pick], cand_rows[pick]
        seen = seen[src[pick]]
        seen[beams, codes[:, -1]] = True
        follow = src[pick]
        for j, (k, v) in enumerate(cache):
            cache[j] = (k.index_select(0, follow), v.index_select(0, follow))

        # early stop: the best running beam, at its length so far, cannot beat the worst
        # finished hypothesis (a slot still a placeholder counts -1e9)
        worst = torch.where(done_real, done_score.min(dim=1, keepdim=True)[0], low)
        hopeful = hopeful and bool((score[:, :1] / ((i + 1) ** d.length_penalty) > worst).any())
        if not hopeful or bool(ended.all()):
            break

    out, out_rows = done_hyps[0]
    if acts is not None:
        for i, r in enumerate(out_rows.tolist()):
            acts[f"logits.{i}"] = history[i][r]
    return out[None].to(torch.int64)


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

