"""Beam search in the reference code generation (``reference.generate``) against
upstream's own: ``UnifiedVoice.inference_speech`` with ``num_beams=3``, i.e. Hugging
Face ``generate``'s ``_beam_search`` on ``GPT2InferenceModel`` with its key/value cache
reordered by beam, loaded from the saved checkpoint as infer_v2 loads it.  Beam sampling
(upstream's default decoding) draws from the same CPU random stream, so a seeded run
gives the same codes; beam search without sampling gives the same codes too.  Each
comparison also counts the decoding steps, so where the search stops (a finished beam
returned while the others ran on, the early-stop heuristic, max_codes) is checked as
well as what it returns."""

from __future__ import annotations

import pytest
import torch

from converters.cli import forward
from converters.release.pipeline import INFERENCE
from reference import generate as gen
from reference import gpt as ref
from reference import pipeline
from tests.helpers import convert_in_process, reference_load
from tests.upstream import gpt as up

CFG = up.config(max_mel_tokens=40, number_mel_codes=18)
# infer_v2's generation settings (inference_speech's keyword arguments), as the manifest has them
GEN = INFERENCE["generation"]
SAMPLING = dict(do_sample=True, top_k=GEN["top_k"], top_p=GEN["top_p"], temperature=GEN["temperature"])
BEAMS = GEN["num_beams"]
MAX_CODES = 10
STOP = CFG["stop_mel_token"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam")
    m = up.build(CFG, seed=3)  # the mel head as built: flat enough that the beams disagree
    up.save_release(m, str(d), CFG)
    w = reference_load(convert_in_process("gpt", d / "gpt.pth", d / "gpt.safetensors"))
    m = forward.gpt_model(str(d / "gpt.pth"), CFG)
    m.post_init_gpt2_config(use_deepspeed=False, kv_cache=True, half=False)
    return w, m


def _case(m, w, seed: int):
    """Speaker features and text ids (ids 0 and 1, the text start/stop tokens, are
    removed by the framing, which then left-pads the prompt), upstream's emotion vector,
    and the reference's prompt built from them."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, 40, 1024, generator=g)  # [B, T, 1024], as infer_v2 holds spk_cond_emb
    text = torch.randint(0, 20, (1, 6), generator=g)
    lengths = torch.tensor([feats.shape[-1]])  # infer_v2 passes the feature width
    with torch.no_grad():
        emovec = m.merge_emovec(feats, feats, lengths, lengths, alpha=1.0)
    prompt = gen.prompt_2_0(w, ref.conditioning(w, feats.transpose(1, 2), lengths), emovec, text)
    return feats, text, emovec, prompt


def _upstream(m, case, seed: int, max_codes: int, sample: bool, num_beams: int = BEAMS):
    """Upstream's codes and its number of decoding steps (``scores`` has one entry a
    step), torch's global generator seeded with ``seed`` right before."""
    feats, text, emovec, _ = case
    lengths = torch.tensor([feats.shape[-1]])
    torch.manual_seed(seed)
    with torch.no_grad():
        out, _ = m.inference_speech(feats, text, feats, cond_lengths=lengths, emo_cond_lengths=lengths, emo_vec=emovec,
                                    num_return_sequences=1, max_generate_length=max_codes,
                                    length_penalty=GEN["length_penalty"], num_beams=num_beams,
                                    repetition_penalty=GEN["repetition_penalty"],
                                    return_dict_in_generate=True, output_scores=True,
                                    **(SAMPLING if sample else dict(do_sample=False)))
    return out.sequences.tolist(), len(out.scores)


def _mine(w, case, seed: int, max_codes: int, sample: bool, num_beams: int = BEAMS, acts=None):
    """The reference's codes and its number of decoding steps (GPT forward passes)."""
    d = gen.Decoding(greedy=not sample, num_beams=num_beams, length_penalty=GEN["length_penalty"])
    steps = []
    inner = gen._mel_logits

    def counted(*a):
        steps.append(1)
        return inner(*a)

    gen._mel_logits = counted
    try:
        codes = gen.generate(w, case[3], max_codes, d, torch.Generator().manual_seed(seed), acts)
    finally:
        gen._mel_logits = inner
    return codes.tolist(), len(steps)


# seed -> how upstream's search ends on it (checked, so the cases keep covering these)
SAMPLED = {0: "stop, others ran on", 1: "early-stop heuristic", 3: "stop, padded prompt", 5: "max_codes, padded prompt"}
SEARCHED = {0: "stop, others ran on", 4: "stop, padded prompt"}


@pytest.mark.parametrize("seed", sorted(SAMPLED))
def test_beam_sampling_equals_upstream(pair, seed):
    """Upstream's default decoding (3 beams, top-k 30, top-p 0.8, temperature 0.8,
    repetition penalty 10, length penalty 0): the same codes and the same steps."""
    w, m = pair
    case = _case(m, w, seed)
    want, want_steps = _upstream(m, case, seed, MAX_CODES, sample=True)
    got, got_steps = _mine(w, case, seed, MAX_CODES, sample=True)
    assert got == want and got_steps == want_steps
    _check_kind(SAMPLED[seed], want[0], want_steps, case)


@pytest.mark.parametrize("seed", sorted(SEARCHED))
def test_beam_search_equals_upstream(pair, seed):
    """``do_sample=False`` with 3 beams: transformers' beam search, the same codes."""
    w, m = pair
    case = _case(m, w, seed)
    want, want_steps = _upstream(m, case, seed, MAX_CODES, sample=False)
    got, got_steps = _mine(w, case, seed, MAX_CODES, sample=False)
    assert got == want and got_steps == want_steps
    _check_kind(SEARCHED[seed], want[0], want_steps, case)


def _check_kind(kind: str, codes: list[int], steps: int, case) -> None:
    if kind.startswith("stop"):
        assert codes[-1] == STOP and len(codes) < MAX_CODES
    if "others ran on" in kind:  # a beam finished, the search went on, and the finished one won
        assert steps > len(codes)
    if kind.startswith("early-stop"):  # stopped before max_codes with no candidate forced to end
        assert codes[-1] == STOP and len(codes) < steps < MAX_CODES
    if kind.startswith("max_codes"):  # every candidate ended at max_codes; the best has no stop code
        assert len(codes) == steps == MAX_CODES and STOP not in codes
    if "padded" in kind:
        assert not bool(case[3].valid.all())


def test_the_returned_beam_logits_are_the_teacher_forced_ones(pair):
    """The trace's per-code logits with beams follow the returned sequence's beam back
    through the reorders: they are the teacher-forced pass's logits of those codes."""
    w, m = pair
    case = _case(m, w, 0)
    acts: dict = {}
    codes, _ = _mine(w, case, 0, MAX_CODES, sample=True, acts=acts)
    codes = torch.tensor(codes)
    body = gen.cut_at_stop(codes, STOP)
    feats, text, emovec, _ = case
    cond = ref.conditioning(w, feats.transpose(1, 2), torch.tensor([feats.shape[-1]]))
    _, logits = ref.forward_latents(w, cond, emovec, text, torch.tensor([text.shape[1]]), body,
                                    torch.tensor([body.shape[1]]))
    assert sorted(acts) == [f"logits.{i}" for i in range(codes.shape[1])]
    for i in range(codes.shape[1]):
        torch.testing.assert_close(acts[f"logits.{i}"], logits[0, i], rtol=0, atol=1e-4)


def test_the_comparison_can_fail(pair, monkeypatch):
    """The same upstream codes against three wrong references: two beams instead of three,
    one extra random draw a step (the generator used otherwise than transformers uses
    it), and the repetition penalty applied to the raw logits before the log-softmax
    (the one-beam order).  Each gives other codes."""
    w, m = pair
    case = _case(m, w, 0)
    want, _ = _upstream(m, case, 0, MAX_CODES, sample=True)
    assert _mine(w, case, 0, MAX_CODES, sample=True)[0] == want
    assert _mine(w, case, 0, MAX_CODES, sample=True, num_beams=2)[0] != want

    draw = torch.multinomial

    def one_more(probs, n, generator=None):
        torch.rand(1, generator=generator)
        return draw(probs, n, generator=generator)

    with monkeypatch.context() as mp:
        mp.setattr(gen.torch, "multinomial", one_more)
        assert _mine(w, case, 0, MAX_CODES, sample=True)[0] != want

    scores = gen.beam_scores

    def penalty_first(logits, seen, d):
        penalised = torch.where(logits < 0, logits * d.repetition_penalty, logits / d.repetition_penalty)
        return scores(torch.where(seen, penalised, logits), torch.zeros_like(seen), d)

    with monkeypatch.context() as mp:
        mp.setattr(gen, "beam_scores", penalty_first)
        assert _mine(w, case, 0, MAX_CODES, sample=True)[0] != want


@pytest.fixture(scope="module")
def pair_2_5(tmp_path_factory):
    from tests.upstream import gpt25

    d = tmp_path_factory.mktemp("beam25")
    cfg = gpt25.config(max_mel_tokens=40, number_mel_codes=18)
    src = gpt25.save_release(gpt25.build(cfg, seed=5), str(d / "release"), cfg)
    return reference_load(convert_in_process("gpt", src, d / "gpt.safetensors")), forward.gpt_2_5_model(src, cfg)


@pytest.mark.parametrize("seed,sample", [(1, True), (2, False)])
def test_2_5_beams_equal_upstream(pair_2_5, seed, sample):
    """IndexTTS-2.5 (reference.pipeline_2_5 shares the decoding): its inference_speech
    with 3 beams, sampled and not, on text ids holding 0 and 1 (a padded prompt)."""
    w, m = pair_2_5
    g = torch.Generator().manual_seed(seed)
    style = torch.randn(1, w.config["speaker_embedding_dim"], generator=g)
    emovec = torch.randn(1, w.config["model_dim"], generator=g)
    text, lang = torch.tensor([[5, 0, 7, 1, 9, 0]]), torch.tensor([3])
    torch.manual_seed(seed)
    with torch.no_grad():
        want = m.inference_speech(text, lang, emovec, style, max_generate_length=MAX_CODES, num_beams=BEAMS,
                                  repetition_penalty=GEN["repetition_penalty"], length_penalty=GEN["length_penalty"],
                                  **(SAMPLING if sample else dict(do_sample=False)))
    p = gen.prompt_2_5(w, ref.speaker_conditioning(w, style), emovec, text, int(lang))
    d = gen.Decoding(greedy=not sample, num_beams=BEAMS, length_penalty=GEN["length_penalty"])
    got = gen.generate(w, p, MAX_CODES, d, torch.Generator().manual_seed(seed))
    assert got.tolist() == want.tolist() and len(set(got[0].tolist())) > 2


def test_decoding_for_reads_beams_from_the_manifest():
    """Sampling is upstream's beam sampling (the manifest's num_beams and length penalty);
    greedy is one beam unless beams are asked for; a bad beam count is refused."""
    inf = {"generation": GEN}
    d, n = pipeline.decoding_for(inf, greedy=False, max_codes=None)
    assert (d.greedy, d.num_beams, d.length_penalty, n) == (False, GEN["num_beams"], GEN["length_penalty"],
                                                            GEN["max_mel_tokens"])
    assert pipeline.decoding_for(inf, greedy=True, max_codes=5)[0].num_beams == 1
    assert pipeline.decoding_for(inf, greedy=True, max_codes=5, num_beams=3)[0].num_beams == 3
    assert pipeline.decoding_for(inf, greedy=False, max_codes=5, num_beams=1)[0].num_beams == 1
    with pytest.raises(pipeline.PipelineError, match="num_beams"):
        pipeline.decoding_for(inf, greedy=False, max_codes=5, num_beams=0)
