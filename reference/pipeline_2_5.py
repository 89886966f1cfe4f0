"""Speech from an IndexTTS-2.5 bundle alone: every step of its ``manifest.json``
``pipeline.flow`` (``flow_2_5``), as upstream's ``infer_v2_5.IndexTTS2.infer_generator``
runs them with ``text_normalization=False``, segment by segment.

:func:`run_2_5` is what :func:`reference.pipeline.synthesize` calls for a bundle whose
``family_version`` is 2.5; it returns the same :class:`~reference.pipeline.Result`,
with trace keys ``<step>.<output>`` named after the manifest's steps (:data:`TRACE_2_5`).
Every constant comes from the manifest (``pipeline.inference``, ``pipeline.tokens``,
``pipeline.front_ends``) or a canonical file's config.

The flow, with where it differs from 2.0 (:mod:`reference.pipeline`) and what a port
gets wrong:

1. ``prompt``: the speaker prompt read as ``librosa.load`` at 22.05 kHz, cut to 15 s,
   resampled to 16 kHz (torchaudio's sinc ``Resample``; 2.5's own ``resample`` is the
   same bit for bit).  The mel prompt is of the 22.05 kHz audio itself.
2. ``semantic_features`` (w2v-bert, ``hidden_states[17]`` normalised), ``reference_mel``,
   ``style`` (CAMPPlus on the mean-subtracted Kaldi fbank) as in 2.0; but
   ``prompt_condition`` is the length regulator on the *features themselves*: 2.5 does
   not quantize them (there is no ``semantic_codes`` step).
3. ``emotion_vector``: ``merge_emovec`` with the feature width as lengths, as 2.0; an
   explicit emotion vector is scaled by ``alpha`` (4 decimals) but never normalised:
   2.5 has no ``normalize_emo_vec``.
4. ``speech_conditioning``: ``spk_emb_proj(style)``, one latent (2.0 runs a Conformer
   and a Perceiver on the features).
5. ``text``: the prepared text split into segments (``split_text_by_tokens``), each
   encoded by tiktoken as ``<|lang|> `` + the segment (:mod:`reference.text`); steps 5
   to 8 run per segment (trace keys ``<key>@k`` from the second on), and the
   waveforms are joined with ``interval_silence_ms`` of zeros; and the language id (the ``lang_embedding`` row added to
   every text position).  Only ``stop_text_token`` ids are removed from the text (the
   start token is the character ``!`` in the real vocabulary).
6. ``codes``: generation from ``[conditioning + emovec, 0, 0, text]``
   (:func:`reference.generate.prompt_2_5`), cut at the first stop code.  There is no
   teacher-forced pass: the GPT's latents are not used, nor s2mel's ``gpt_layer``.
7. ``code_features``: the 2.5 codec's ``decode`` (two frames per code);
   ``target_condition``: the length regulator to ``int(S_infer.shape[1] * 1.72 *
   duration_factor)`` frames, in Python floats (2.0: a float32 product of the code count).
8. ``mel``: the CFM sampler on ``cat(prompt_condition, cond)``, as 2.0; ``waveform``:
   BigVGAN.  Upstream returns ``clamp(32767 * wav, -32767, 32767)`` (PCM scale); the
   result here is the same waveform in [-1, 1] (``clamp(wav, -1, 1)``), which
   :func:`reference.trace.pcm16` writes as upstream's ``save_pcm_wav`` does.

Noise and sampling as in 2.0: the CFM noise from a CPU generator seeded with ``seed``
(or ``noise``), sampling from a second one seeded with ``seed``.
"""

from __future__ import annotations

import torch

from . import front_ends, gpt, s2mel, semantic_codec, text
from .generate import prompt_2_5
from .pipeline import (Bundle, PipelineError, Result, _features, decoding_for, generate_codes, join_segments,
                       make_emovec, mel_and_waveform, segment_budget, segment_key, segment_noises, segment_step, speaker_prompt,
                       speaker_style)

# Every trace key of an IndexTTS-2.5 synthesis, in the order the steps run
# (``emotion_vector.index`` only with an explicit emotion vector).
TRACE_2_5 = (
    "prompt.audio_22k", "prompt.audio_16k",
    "semantic_features.input_features", "semantic_features.attention_mask", "semantic_features.feature",
    "reference_mel.ref_mel", "style.fbank", "style.style",
    "prompt_condition.ylens", "prompt_condition.prompt_condition",
    "emotion_features.audio_16k", "emotion_features.input_features", "emotion_features.attention_mask",
    "emotion_features.feature",
    "emotion_vector.merge_emovec", "emotion_vector.index", "emotion_vector.emovec",
    "speech_conditioning.conditioning",
    "text.ids", "text.lang",
    "codes.raw", "codes.logits", "codes.codes",
    "code_features.S_infer",
    "target_condition.ylens", "target_condition.cond",
    "mel.cat_condition", "mel.x_lens", "mel.noise", "mel.mel", "mel.target",
    "waveform.bigvgan", "waveform.wav",
)


def language(b: Bundle, lang: str) -> tuple[str, int]:
    """(the language as upstream writes it, its ``lang_embedding`` row), or a one-line
    :class:`PipelineError` naming it and listing the bundle's languages (or saying why
    the reference cannot prepare its text: ``tokens.tokenizer.unsupported_languages``)."""
    tok = b.pipeline["tokens"]
    spec, names = tok["tokenizer"], tok["languages"]
    extra = spec.get("extra_languages", {})
    name = lang.lower() if isinstance(lang, str) else lang
    if name in spec.get("unsupported_languages", {}):
        raise PipelineError(f"lang {lang!r}: {spec['unsupported_languages'][name]}; the reference does not do this")
    if name in names:
        return name, names.index(name)
    if name in extra:
        return name, names.index(extra[name])
    shown = ", ".join(list(names) + list(extra))
    raise PipelineError(f"lang {lang!r} is not a language of this bundle; it has {shown}")


def _segments(b: Bundle, text_in, lang: str, max_segment_tokens: int | None = None) -> list[list[int]]:
    if not isinstance(text_in, str) or not text_in.strip():
        raise PipelineError("the text is empty")
    spec = b.pipeline["tokens"]["tokenizer"]
    inf = b.pipeline["inference"]
    path = b.tokenizer_path()
    try:
        budget = max(1, min(segment_budget(inf, max_segment_tokens), b.files["gpt"].config["max_text_tokens"])
                     - text.tiktoken_prefix_length(path, spec, lang))
        segments = text.tiktoken_segments(path, spec, text_in, lang, budget, inf["segment_split"])
    except ValueError as e:
        raise PipelineError(str(e)) from None
    rows = b.files["gpt"]["text_embedding.weight"].shape[0]
    top = max(max(ids) for ids in segments)
    if top >= rows:
        raise PipelineError(f"the tokenizer gave id {top}; the GPT's text embedding has {rows} rows (a tokenizer "
                            "of another release?)")
    return segments


def run_2_5(b: Bundle, text_in: str, lang: str, prompt_audio, *, emotion_prompt=None, emotion_alpha: float = 1.0,
            emotion_vector: list[float] | None = None, max_codes: int | None = None, greedy: bool = False,
            seed: int = 0, noise=None, progress=None, num_beams: int | None = None,
            max_segment_tokens: int | None = None) -> Result:
    """The 2.5 flow (module docstring); arguments as :func:`reference.pipeline.synthesize`."""
    if b.version != "2.5":
        raise PipelineError(f"{b.path}: an IndexTTS-{b.version} bundle; run_2_5 runs IndexTTS-2.5 bundles")
    progress = progress or (lambda step: None)
    p, w = b.pipeline, b.files
    fe, inf, rates = p["front_ends"], p["inference"], p["sample_rates"]
    dev = w["gpt"]["mel_head.weight"].device
    tr: dict[str, torch.Tensor] = {}
    decoding, max_codes = decoding_for(inf, greedy, max_codes, num_beams, w["gpt"])

    lang, lang_id = language(b, lang)
    segments = _segments(b, text_in, lang, max_segment_tokens)

    progress("prompt")
    a22, a16 = speaker_prompt(b, prompt_audio, tr, dev, to_mel_rate=False)  # the mel is of a22 itself (inference.speaker_prompt)

    progress("semantic_features")
    spk = _features(w, fe, a16, tr, "semantic_features")
    progress("reference_mel")
    ref_mel = front_ends.s2mel_mel(a22, fe["s2mel_mel"])
    tr["reference_mel.ref_mel"] = ref_mel
    progress("style")
    style = speaker_style(b, a16, tr)
    progress("prompt_condition")
    ylens = torch.tensor([ref_mel.shape[-1]], dtype=torch.int64, device=dev)
    prompt_cond = s2mel.length_regulator(w["s2mel"], spk, ylens)  # the features, not quantized
    tr["prompt_condition.ylens"], tr["prompt_condition.prompt_condition"] = ylens, prompt_cond

    progress("emotion_vector")
    # 2.5 has no normalize_emo_vec (inference.emotion_vector_normalization is null): alpha scaling only
    emovec, alpha, weights = make_emovec(b, spk, style, prompt_audio, emotion_prompt, emotion_alpha, emotion_vector,
                                         False, tr)

    progress("speech_conditioning")
    cond = gpt.speaker_conditioning(w["gpt"], style)
    tr["speech_conditioning.conditioning"] = cond

    noises = segment_noises(noise, len(segments))
    sample_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    lang_t = torch.tensor([lang_id], dtype=torch.int64, device=dev)
    wavs = []
    for k, ids in enumerate(segments):
        st: dict[str, torch.Tensor] = {}
        progress(segment_step("codes", k, len(segments)))
        text_ids = torch.tensor([ids], dtype=torch.int64, device=dev)
        st["text.ids"], st["text.lang"] = text_ids, lang_t
        codes = generate_codes(w, prompt_2_5(w["gpt"], cond, emovec, text_ids, lang_id), max_codes, decoding,
                               sample_gen, st)

        progress(segment_step("code_features", k, len(segments)))
        s_infer = semantic_codec.decode(w["semantic-codec"], codes)
        st["code_features.S_infer"] = s_infer
        n = int(s_infer.shape[1] * inf["mel_frames_per_decoded_frame"] * inf["duration_factor"])  # Python floats
        target_len = torch.tensor([n], dtype=torch.int64, device=dev)
        cond_t = s2mel.length_regulator(w["s2mel"], s_infer, target_len)
        st["target_condition.ylens"], st["target_condition.cond"] = target_len, cond_t

        wavs.append(mel_and_waveform(w, inf, prompt_cond, cond_t, ref_mel, style, noises[k], noise_gen, st,
                                     lambda step: progress(segment_step(step, k, len(segments)))))
        tr.update({segment_key(key, k): v for key, v in st.items()})
    wav = join_segments(wavs, inf, rates["output_hz"], tr)
    noise_from = "seed" if noise is None else "given"
    opts = {"text": text_in, "lang": lang, "greedy": greedy, "seed": seed, "max_codes": max_codes,
            "emotion_alpha": alpha, "emotion_vector": weights, "emotion_vector_normalized": False,
            "decoding": decoding.__dict__, "noise": noise_from, "segments": len(segments)}
    return Result(wav.cpu(), rates["output_hz"], {k: v.detach().cpu() for k, v in tr.items()}, opts)
