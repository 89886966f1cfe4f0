"""Reference code generation (``reference.generate``) against upstream's own:
``UnifiedVoice.inference_speech``, i.e. Hugging Face ``generate`` on
``GPT2InferenceModel`` with a key/value cache, loaded from the saved checkpoint as
infer_v2 loads it.  Greedy decoding must give the same codes; seeded sampling with one
beam draws from the same CPU random stream and must give the same codes too."""

from __future__ import annotations

import pytest
import torch

from converters.cli import forward
from reference import generate as gen
from reference import gpt as ref
from tests.helpers import convert_in_process, reference_load
from tests.upstream import gpt as up

CFG = up.config(max_mel_tokens=40, number_mel_codes=18)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    m = up.build(CFG, seed=3)
    with torch.no_grad():  # a sharper mel head, so that stop and repeats are both reachable
        m.mel_head.weight.mul_(4)
    up.save_release(m, str(d), CFG)
    out = convert_in_process("gpt", d / "gpt.pth", d / "gpt.safetensors")
    w = reference_load(out)
    m = forward.gpt_model(str(d / "gpt.pth"), CFG)
    m.post_init_gpt2_config(use_deepspeed=False, kv_cache=True, half=False)
    return w, m


def _inputs(seed: int, n_text: int = 6):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, 40, 1024, generator=g)  # [B, T, 1024], as infer_v2 holds spk_cond_emb
    text = torch.randint(2, 20, (1, n_text), generator=g)
    return feats, text


def _upstream(m, feats, text, max_codes, **kw):
    lengths = torch.tensor([feats.shape[-1]])  # infer_v2 passes the feature width
    with torch.no_grad():
        emovec = m.merge_emovec(feats, feats, lengths, lengths, alpha=1.0)
        codes, latent = m.inference_speech(feats, text, feats, cond_lengths=lengths, emo_cond_lengths=lengths,
                                           emo_vec=emovec, num_return_sequences=1, max_generate_length=max_codes,
                                           length_penalty=0.0, num_beams=1, repetition_penalty=10.0, **kw)
    return codes, emovec, latent


def _mine(w, feats, text, emovec, max_codes, d, generator=None, acts=None):
    lengths = torch.tensor([feats.shape[-1]])
    cond = ref.conditioning(w, feats.transpose(1, 2), lengths)
    return gen.generate(w, gen.prompt_2_0(w, cond, emovec, text), max_codes, d, generator, acts), cond


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_codes_equal_upstream(pair, seed):
    w, m = pair
    feats, text = _inputs(seed)
    want, emovec, latent = _upstream(m, feats, text, 30, do_sample=False)
    got, cond = _mine(w, feats, text, emovec, 30, gen.Decoding(greedy=True))
    torch.testing.assert_close(cond, latent, rtol=0, atol=1e-5)
    n = got.shape[1]
    assert got.tolist() == want[:, :n].tolist()
    # generate pads after the stop token; nothing else differs
    assert (want[:, n:] == m.stop_mel_token).all()


@pytest.mark.parametrize("seed", [0, 5])
def test_seeded_sampling_equals_upstream(pair, seed):
    """One beam: generate draws ``torch.multinomial`` from the global generator; the
    reference from its own generator seeded alike, so the codes agree draw for draw."""
    w, m = pair
    feats, text = _inputs(seed)
    lengths = torch.tensor([feats.shape[-1]])
    with torch.no_grad():
        emovec = m.merge_emovec(feats, feats, lengths, lengths, alpha=1.0)
    torch.manual_seed(1234 + seed)
    want, _, _ = _upstream(m, feats, text, 30, do_sample=True, top_k=30, top_p=0.8, temperature=0.8)
    got, _ = _mine(w, feats, text, emovec, 30, gen.Decoding(greedy=False), torch.Generator().manual_seed(1234 + seed))
    n = got.shape[1]
    assert got.tolist() == want[:, :n].tolist()


def test_generation_logits_equal_the_teacher_forced_pass(pair):
    """Each step's logits (cached, incremental) are the teacher-forced pass's logits at
    that position: the cache, the mel positions and the framing agree."""
    w, m = pair
    feats, text = _inputs(7)
    lengths = torch.tensor([feats.shape[-1]])
    emovec = ref.merge_emovec(w, feats.transpose(1, 2), feats.transpose(1, 2), lengths, lengths, 1.0)
    acts: dict = {}
    codes, cond = _mine(w, feats, text, emovec, 12, gen.Decoding(greedy=True), acts=acts)
    body = gen.cut_at_stop(codes, w.config["stop_mel_token"])
    _, logits = ref.forward_latents(w, cond, emovec, text, torch.tensor([text.shape[1]]), body,
                                    torch.tensor([body.shape[1]]))
    for i in range(body.shape[1] + 1 if body.shape[1] < codes.shape[1] else body.shape[1]):
        torch.testing.assert_close(acts[f"logits.{i}"], logits[0, i], rtol=0, atol=1e-4)


def test_repetition_penalty_sees_the_fake_prompt_ids():
    """Ids 1 and start_mel_token are penalised from the first step (generate's input_ids)."""
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 4.5])
    d = gen.Decoding(greedy=True, repetition_penalty=10.0)
    assert gen.choose(logits, torch.tensor([1]), d, None) == 4  # 5/10 < 4.5
    assert gen.choose(logits, torch.tensor([1, 4]), d, None) == 2
    neg = torch.tensor([-2.0, -1.0, -3.0])
    assert gen.choose(neg, torch.tensor([1]), d, None) == 0  # -1 * 10 = -10 < -2
