"""Speech from the bundle alone: text and a voice prompt to a waveform, running every
step of ``manifest.json`` ``pipeline.flow`` on the canonical files, as upstream's
``IndexTTS2.infer`` runs them (``indextts/infer_v2.py``).

:func:`synthesize` reads only the bundle: ``manifest.json`` (the front-end settings,
the glue constants under ``pipeline.inference``, the tokenizer's path), the canonical
files (through :mod:`reference.load`) and the bundled tokenizer.  It returns the
waveform and a trace of every intermediate, keyed ``<step>.<output>`` with the
manifest's step names (:data:`TRACE_2_0` lists them in order).

The flow (IndexTTS-2.0), with the places ports get wrong:

1. The speaker prompt is read as ``librosa.load`` does at 22.05 kHz (mono, soxr), cut to
   ``max_reference_audio_s`` (15 s), then resampled to 16 kHz with torchaudio's sinc
   ``Resample``.  The emotion prompt (the speaker prompt when none is given) is read
   by librosa at 16 kHz directly, so its features differ from the speaker's even for
   the same file.
2. ``semantic_features``: SeamlessM4T features of the 16 kHz audio, w2v-bert,
   ``hidden_states[17]`` normalised; ``semantic_codes``: the codec's ``quantize``
   (only its quantized embedding is used); ``reference_mel``: the s2mel mel of the
   22.05 kHz audio; ``style``: CAMPPlus on the Kaldi fbank of the 16 kHz audio minus its
   mean over time; ``prompt_condition``: the length regulator on the quantized
   embedding, resized to the mel's frame count.
3. ``emotion_vector``: ``merge_emovec(spk, emo, alpha)``, where the lengths passed are
   the feature width (1024), as infer_v2 passes them; with an explicit emotion vector
   ``w`` (after ``normalize_emo_vec`` when asked, and infer's 4-decimal scaling by
   ``alpha``), ``emotion_mix + (1 - sum(w)) * emovec`` and the emotion prompt is the
   speaker prompt with alpha 1.
4. ``codes``: :mod:`reference.generate` (greedy, one beam unless asked; or seeded beam
   sampling with the manifest's ``num_beams``, upstream's default); cut at the first
   ``stop_mel_token``.  ``latents``: the teacher-forced GPT pass over the cut codes.
5. ``latent_projection`` (s2mel ``gpt_layer``), ``code_embeddings``: ``vq2emb(codes)
   + latent``; ``target_condition``: the length regulator to
   ``(code_len * 1.72).long()`` frames, computed in float32 as torch does;
   ``mel``: the CFM sampler on ``cat(prompt_condition, cond)`` with the prompt mel,
   style and noise, 25 steps, CFG 0.7; the prompt's frames are cut off.
6. ``waveform``: BigVGAN, clamped to [-1, 1].

A text of more than ``max_text_tokens_per_segment`` tokens is split into segments as
upstream splits it (:func:`reference.text.split_pieces`); steps 1 to 3 run once, steps 4
to 6 per segment (trace keys ``key@k`` from the second segment on), and the waveforms
are joined with ``interval_silence_ms`` of zeros (``output.wav``).

IndexTTS-2.5 bundles (``family_version`` 2.5) run :mod:`reference.pipeline_2_5`, which
needs ``lang``; the same options otherwise, the same :class:`Result`.

Noise and sampling: the CFM noise is ``torch.randn([1, in_channels, T])`` from a CPU
generator seeded with ``seed`` (upstream draws it from torch's global generator; seeding
that right before ``cfm.inference`` gives the same values), or ``noise`` when given.
Sampling draws from a second CPU generator seeded with ``seed``, on the CPU whatever the device
(so ``--device cuda`` samples from the same random stream as a CPU run; upstream on a GPU draws
from the CUDA generator instead, so seeded sampling matches upstream's on the CPU only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from . import bigvgan, campplus, front_ends, gpt, matrices, s2mel, semantic_codec, text, w2v_bert
from .generate import Decoding, codebook_problem, cut_at_stop, generate, prompt_2_0
from .load import load

# Every trace key of an IndexTTS-2.0 synthesis, in the order the steps run
# (``emotion_vector.index`` only with an explicit emotion vector).
TRACE_2_0 = (
    "prompt.audio_22k", "prompt.audio_16k",
    "semantic_features.input_features", "semantic_features.attention_mask", "semantic_features.feature",
    "semantic_codes.S_ref", "reference_mel.ref_mel", "style.fbank", "style.style",
    "prompt_condition.prompt_condition",
    "emotion_features.audio_16k", "emotion_features.input_features", "emotion_features.attention_mask",
    "emotion_features.feature", "emotion_vector.merge_emovec", "emotion_vector.index", "emotion_vector.emovec",
    "speech_conditioning.conditioning", "text.ids", "codes.raw", "codes.logits", "codes.codes", "latents.latent",
    "latent_projection.latent", "code_embeddings.S_infer", "target_condition.cond",
    "mel.cat_condition", "mel.x_lens", "mel.noise", "mel.mel", "mel.target", "waveform.bigvgan", "waveform.wav",
)
FILES_2_0 = ("gpt", "s2mel", "w2v-bert", "semantic-codec", "campplus", "bigvgan", "speaker-matrix", "emotion-matrix")
# 2.5 writes the same kinds (its semantic-codec is the decoder, schema semantic-codec@2.5); the flow runs all
# but s2mel's gpt_layer, the matrices for an explicit emotion vector.
FILES = {"2.0": FILES_2_0, "2.5": FILES_2_0}


class PipelineError(ValueError):
    """Bad input or a bundle that cannot run: the message is one line."""


@dataclass
class Bundle:
    """A converted folder, loaded: its manifest and every canonical file by model kind."""

    path: str
    manifest: dict
    files: dict
    version: str

    @property
    def pipeline(self) -> dict:
        return self.manifest["pipeline"]

    def tokenizer_path(self) -> str:
        entry = self.manifest.get("bundle", {}).get("tokenizer")
        if not entry:
            raise PipelineError(f"{self.path}: manifest.json names no tokenizer (bundle.tokenizer)")
        p = os.path.join(self.path, entry["path"])
        if not os.path.isfile(p):
            raise PipelineError(f"{self.path}: the tokenizer {entry['path']} named by manifest.json is missing")
        return p


def open_bundle(path: str, device: str = "cpu") -> Bundle:
    """Load a bundle folder, refusing one that lacks a file the flow needs (named)."""
    mf = os.path.join(path, "manifest.json")
    if not os.path.isfile(mf):
        raise PipelineError(f"{path}: no manifest.json; not a converted bundle (run `convert.py all`)")
    with open(mf) as f:
        manifest = json.load(f)
    version = manifest.get("family_version", "2.0")
    if version not in FILES:
        raise PipelineError(f"{path}: an IndexTTS-{version} bundle; the reference pipeline runs IndexTTS-2.0 and 2.5 bundles only")
    if "pipeline" not in manifest:
        raise PipelineError(f"{path}: manifest.json has no pipeline section; convert the release again")
    p = manifest["pipeline"]
    lacking = [k for k, ok in (("pipeline.front_ends.resampling", "resampling" in p.get("front_ends", {})),
                               ("pipeline.inference.cfm_noise", "cfm_noise" in p.get("inference", {})))
               if not ok]
    if lacking:
        raise PipelineError(f"{path}: manifest.json lacks {', '.join(lacking)} (made by a converter before the reference "
                            "pipeline); run `convert.py all` on the release again")
    by_kind = {rec.get("model"): name for name, rec in manifest.get("files", {}).items()}
    kinds = FILES[version]
    missing = [k for k in kinds if k not in by_kind or not os.path.isfile(os.path.join(path, by_kind[k]))]
    if missing:
        shown = ", ".join(f"{by_kind.get(k, k + ' (not in manifest.json)')}" for k in missing)
        raise PipelineError(f"{path}: the bundle lacks {shown}, which the flow needs")
    files = load([os.path.join(path, by_kind[k]) for k in kinds], device)
    files = {k: w.float() for k, w in files.items()}
    for k, w in files.items():
        if w.metadata.get("family_version", "2.0") != version:
            raise PipelineError(f"{w.path}: an IndexTTS-{w.metadata.get('family_version')} file in an IndexTTS-{version} bundle")
    b = Bundle(path, manifest, files, version)
    _check_chain(b)
    return b


def _check_chain(b: Bundle) -> None:
    """The widths upstream hard-codes between files, which a bundle must meet to run end to end."""
    g, s2, w2v, codec, cam = (b.files[k].config for k in ("gpt", "s2mel", "w2v-bert", "semantic-codec", "campplus"))
    fe = b.pipeline["front_ends"]
    feat_in = fe["w2v_bert_features"]["num_mel_bins"] * fe["w2v_bert_features"]["stride"]
    rules = [
        (cam["feat_dim"] == fe["campplus_fbank"]["num_mel_bins"],
         f"campplus feat_dim {cam['feat_dim']} != the {fe['campplus_fbank']['num_mel_bins']}-bin fbank infer_v2 feeds it"),
        (w2v["feature_projection_input_dim"] == feat_in,
         f"w2v-bert input width {w2v['feature_projection_input_dim']} != the SeamlessM4T features' {feat_in}"),
    ]
    if b.version == "2.5":
        rules += _rules_2_5(g, s2, w2v, codec, cam)
    else:
        rules += _rules_2_0(g, s2, w2v, codec)
    bad = [why for ok, why in rules if not ok]
    if bad:
        raise PipelineError(f"{b.path}: the files do not chain end to end ({'; '.join(bad)}); this bundle can be "
                            "loaded model by model but cannot synthesise")


def _rules_2_5(g, s2, w2v, codec, cam) -> list:
    """infer_v2_5: the features feed the emotion encoder and, unquantized, the length
    regulator; the decoded codes feed the length regulator; the style feeds spk_emb_proj."""
    lr_in = s2["length_regulator_in_channels"]
    return [
        (g.get("speaker_conditioning") == "campplus",
         f"gpt speaker_conditioning {g.get('speaker_conditioning')!r}: an IndexTTS-2.5 GPT conditions on the CAMPPlus style"),
        (w2v["hidden_size"] == g["emo_conditioning_encoder"]["input_size"],
         f"w2v-bert hidden_size {w2v['hidden_size']} != gpt emotion conditioning input {g['emo_conditioning_encoder']['input_size']}"),
        (w2v["hidden_size"] == lr_in,
         f"w2v-bert hidden_size {w2v['hidden_size']} != s2mel length regulator input {lr_in} (the prompt condition)"),
        (codec["hidden_size"] == lr_in,
         f"semantic-codec hidden_size {codec['hidden_size']} != s2mel length regulator input {lr_in} (the decoded codes)"),
        (cam["embedding_size"] == g.get("speaker_embedding_dim"),
         f"campplus embedding_size {cam['embedding_size']} != gpt speaker_embedding_dim {g.get('speaker_embedding_dim')}"),
    ]


def _rules_2_0(g, s2, w2v, codec) -> list:
    return [
        (w2v["hidden_size"] == g["conditioning_encoder"]["input_size"],
         f"w2v-bert hidden_size {w2v['hidden_size']} != gpt conditioning input {g['conditioning_encoder']['input_size']}"),
        (g["model_dim"] == s2["gpt_layer_dims"][0],
         f"gpt model_dim {g['model_dim']} != s2mel gpt_layer input {s2['gpt_layer_dims'][0]}"),
        (s2["gpt_layer_dims"][-1] == codec["hidden_size"] == s2["length_regulator_in_channels"],
         f"s2mel gpt_layer output {s2['gpt_layer_dims'][-1]}, codec hidden_size {codec['hidden_size']} and "
         f"length regulator input {s2['length_regulator_in_channels']} differ"),
    ]


@dataclass
class Result:
    wav: torch.Tensor  # [1, n] float32 in [-1, 1]
    sample_rate: int
    trace: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)


def _audio(prompt, what: str):
    """(samples [channels, n] float32, rate) from a path or a (samples, rate) pair."""
    if isinstance(prompt, (str, os.PathLike)):
        try:
            return front_ends.read_wav(str(prompt))
        except ValueError as e:
            raise PipelineError(f"{what}: {e}") from None
    samples, sr = prompt
    samples = torch.as_tensor(samples, dtype=torch.float32)
    if samples.ndim == 1:
        samples = samples.unsqueeze(0)
    if samples.numel() == 0:
        raise PipelineError(f"{what}: the audio is empty")
    return samples.numpy(), int(sr)


def normalize_emotion_vector(weights: list[float], inf: dict) -> list[float]:
    """infer_v2's ``normalize_emo_vec``: per-emotion bias, then scaled down to a sum of at
    most ``emotion_vector_max_sum`` (constants from the manifest)."""
    v = [x * b for x, b in zip(weights, inf["emotion_vector_bias"])]
    total = sum(v)
    if total > inf["emotion_vector_max_sum"]:
        v = [x * (inf["emotion_vector_max_sum"] / total) for x in v]
    return v


def synthesize(bundle, text_in: str, prompt_audio, *, lang: str | None = None, emotion_prompt=None,
               emotion_alpha: float = 1.0, emotion_vector: list[float] | None = None, normalize_emotion: bool = True,
               max_codes: int | None = None, greedy: bool = False, seed: int = 0, num_beams: int | None = None,
               noise=None, max_segment_tokens: int | None = None, device: str = "cpu", progress=None) -> Result:
    """Run the whole flow (see the module docstring).  ``bundle`` is a folder or a
    :class:`Bundle`; ``prompt_audio`` and ``emotion_prompt`` are WAV paths or
    ``(samples, rate)``.  ``progress(step)`` is called as each stage starts.
    ``lang``: the text's language, required for an IndexTTS-2.5 bundle (one of its
    manifest's ``tokens.languages``) and refused for 2.0.  ``normalize_emotion``
    applies 2.0's ``normalize_emo_vec`` to ``emotion_vector``; IndexTTS-2.5 has none
    (its manifest says so), and there the vector is used as given.  ``num_beams``:
    the beams of the code generation (default: 1 with ``greedy``, else the manifest's
    ``num_beams``).  ``max_segment_tokens``: upstream's ``max_text_tokens_per_segment``
    (default: the manifest's, 120); a longer text is split into segments, each
    synthesised alone and joined with ``interval_silence_ms`` of zeros.  ``noise``: the
    CFM noise, one tensor or one per segment (default: drawn from ``seed``)."""
    b = bundle if isinstance(bundle, Bundle) else open_bundle(str(bundle), device)
    if b.version == "2.5":
        from .pipeline_2_5 import run_2_5

        if lang is None:
            raise PipelineError(f"an IndexTTS-2.5 bundle needs lang, the text's language (one of "
                                f"{', '.join(b.pipeline['tokens']['languages'])})")
        with torch.inference_mode():
            return run_2_5(b, text_in, lang, prompt_audio, emotion_prompt=emotion_prompt, emotion_alpha=emotion_alpha,
                           emotion_vector=emotion_vector, max_codes=max_codes, greedy=greedy, seed=seed, noise=noise,
                           num_beams=num_beams, max_segment_tokens=max_segment_tokens, progress=progress)
    if lang is not None:
        raise PipelineError(f"lang={lang!r}: IndexTTS-2.0 bundles take no language (their tokenizer has none); "
                            "lang is for IndexTTS-2.5 bundles")
    with torch.inference_mode():
        return _run(b, text_in, prompt_audio, emotion_prompt, emotion_alpha, emotion_vector, normalize_emotion,
                    max_codes, greedy, seed, noise, progress or (lambda step: None), num_beams, max_segment_tokens)


def _run(b: Bundle, text_in, prompt_audio, emotion_prompt, alpha, emo_weights, normalize, max_codes, greedy, seed,
         noise, progress, num_beams=None, max_segment_tokens=None) -> Result:
    p, w = b.pipeline, b.files
    fe, inf, rates = p["front_ends"], p["inference"], p["sample_rates"]
    dev = w["gpt"]["mel_head.weight"].device
    tr: dict[str, torch.Tensor] = {}
    decoding, max_codes = decoding_for(inf, greedy, max_codes, num_beams, w["gpt"])

    segments = _segments(b, text_in, max_segment_tokens)

    progress("prompt")
    a22, a16 = speaker_prompt(b, prompt_audio, tr, dev, to_mel_rate=True)

    progress("semantic_features")
    spk = _features(w, fe, a16, tr, "semantic_features")
    progress("semantic_codes")
    _, s_ref = semantic_codec.quantize(w["semantic-codec"], spk)
    tr["semantic_codes.S_ref"] = s_ref
    progress("reference_mel")
    ref_mel = front_ends.s2mel_mel(a22, fe["s2mel_mel"])
    tr["reference_mel.ref_mel"] = ref_mel
    progress("style")
    style = speaker_style(b, a16, tr)
    progress("prompt_condition")
    prompt_cond = s2mel.length_regulator(w["s2mel"], s_ref, torch.tensor([ref_mel.shape[-1]], device=dev))
    tr["prompt_condition.prompt_condition"] = prompt_cond

    progress("emotion_vector")
    emovec, alpha, emo_weights = make_emovec(b, spk, style, prompt_audio, emotion_prompt, alpha, emo_weights,
                                                normalize, tr)

    progress("speech_conditioning")
    cond = gpt.conditioning(w["gpt"], spk.transpose(1, 2), _width(spk))
    tr["speech_conditioning.conditioning"] = cond

    noises = segment_noises(noise, len(segments))
    sample_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    wavs = []
    for k, ids in enumerate(segments):
        st: dict[str, torch.Tensor] = {}
        progress(segment_step("codes", k, len(segments)))
        text_ids = torch.tensor([ids], dtype=torch.int64, device=dev)
        st["text.ids"] = text_ids
        codes = generate_codes(w, prompt_2_0(w["gpt"], cond, emovec, text_ids), max_codes, decoding, sample_gen, st)
        n = torch.tensor([codes.shape[1]], dtype=torch.int64, device=dev)

        progress(segment_step("latents", k, len(segments)))
        latent, _ = gpt.forward_latents(w["gpt"], cond, emovec, text_ids, torch.tensor([len(ids)], device=dev), codes, n)
        st["latents.latent"] = latent
        latent = s2mel.gpt_layer(w["s2mel"], latent)
        st["latent_projection.latent"] = latent
        s_infer = semantic_codec.vq2emb(w["semantic-codec"], codes).transpose(1, 2) + latent
        st["code_embeddings.S_infer"] = s_infer
        target_len = (n * inf["mel_frames_per_code"]).long()  # float32 product, truncated, as infer_v2
        cond_t = s2mel.length_regulator(w["s2mel"], s_infer, target_len)
        st["target_condition.cond"] = cond_t

        wavs.append(mel_and_waveform(w, inf, prompt_cond, cond_t, ref_mel, style, noises[k], noise_gen, st,
                                     lambda step: progress(segment_step(step, k, len(segments)))))
        tr.update({segment_key(key, k): v for key, v in st.items()})
    wav = join_segments(wavs, inf, rates["output_hz"], tr)
    opts = {"text": text_in, "greedy": greedy, "seed": seed, "max_codes": max_codes, "emotion_alpha": alpha,
            "emotion_vector": emo_weights, "decoding": decoding.__dict__,
            "noise": "seed" if noise is None else "given", "segments": len(segments)}
    return Result(wav.cpu(), rates["output_hz"], {k: v.detach().cpu() for k, v in tr.items()}, opts)


def segment_key(key: str, k: int) -> str:
    """The trace key of ``key`` in segment ``k``: the key itself in the first segment, ``key@k`` after."""
    return key if k == 0 else f"{key}@{k}"


def segment_step(step: str, k: int, n: int) -> str:
    return step if n == 1 else f"{step} (segment {k + 1} of {n})"


def segment_noises(noise, n: int) -> list:
    """The given CFM noise per segment: none (each drawn from the seed's generator, which
    runs on from one segment to the next), one tensor for a text of one segment, or a
    sequence of one tensor per segment."""
    if noise is None:
        return [None] * n
    if isinstance(noise, torch.Tensor):
        noise = [noise]
    noise = list(noise)
    if len(noise) != n:
        raise PipelineError(f"{len(noise)} CFM noise tensor(s) given for a text of {n} segment(s): give one per segment")
    return noise


def join_segments(wavs: list, inf: dict, rate: int, tr: dict) -> torch.Tensor:
    """The segments' waveforms joined with ``interval_silence_ms`` of zeros between two
    (infer's ``insert_interval_silence``); a text of more than one segment also records
    the joined waveform as ``output.wav``."""
    if len(wavs) == 1:
        return wavs[0]
    gap = torch.zeros(1, int(rate * inf["interval_silence_ms"] / 1000.0), dtype=wavs[0].dtype, device=wavs[0].device)
    parts = []
    for i, w in enumerate(wavs):
        parts += [gap, w] if i else [w]
    tr["output.wav"] = torch.cat(parts, 1)
    return tr["output.wav"]


def _width(feats) -> torch.Tensor:
    """What infer_v2 passes as the conditioning lengths: the feature width (1024), not the frame count."""
    return torch.tensor([feats.shape[-1]], device=feats.device)


def make_emovec(b: Bundle, spk, style, prompt_audio, emotion_prompt, alpha: float, weights, normalize: bool,
                   tr: dict):
    """``emovec``, as both releases make it: ``merge_emovec(spk, emo, alpha)``, where the
    emotion prompt is the speaker prompt (alpha 1) when none is given or an explicit
    emotion vector is; with ``weights`` (prepared by :func:`_emotion_weights`),
    ``mix(emotion rows picked by the style) + (1 - sum(w)) * emovec``.  Returns
    (emovec, the alpha used, the prepared weights or None)."""
    w, inf = b.files, b.pipeline["inference"]
    if weights is not None:
        weights = _emotion_weights(weights, alpha, normalize, inf, w["emotion-matrix"].config["emo_num"])
        emotion_prompt = None
    if emotion_prompt is None:
        emotion_prompt, alpha = prompt_audio, 1.0
    emo = emotion_features(b, emotion_prompt, tr, spk.device)
    emovec = gpt.merge_emovec(w["gpt"], spk.transpose(1, 2), emo.transpose(1, 2), _width(spk), _width(emo), alpha)
    tr["emotion_vector.merge_emovec"] = emovec
    if weights is not None:
        wv = torch.tensor(weights, dtype=torch.float32, device=spk.device)
        index = matrices.select_rows(w["speaker-matrix"], style)
        tr["emotion_vector.index"] = index
        emovec = matrices.mix(w["emotion-matrix"], index, wv) + (1 - torch.sum(wv)) * emovec
    tr["emotion_vector.emovec"] = emovec
    return emovec, alpha, weights


def generate_codes(w, prompt, max_codes: int, decoding: Decoding, gen: torch.Generator, tr: dict) -> torch.Tensor:
    """The GPT's codes from ``prompt`` (sampling from the CPU generator ``gen``), cut at the first stop code; refused when there is none before the stop or
    one lies outside the codec's codebook.  Records the raw codes and, for each of them,
    the raw logits it was chosen from (with beams: those of the returned sequence's beam
    at each step)."""
    acts: dict[str, torch.Tensor] = {}
    raw = generate(w["gpt"], prompt, max_codes, decoding, gen, acts)
    tr["codes.raw"] = raw
    if raw.shape[1] == 0:  # beam search whose hypotheses never finished (transformers returns no code either)
        raise PipelineError("the GPT gave no code; there is nothing to synthesise (try another seed)")
    tr["codes.logits"] = torch.stack([acts[f"logits.{i}"] for i in range(raw.shape[1])]).unsqueeze(0)
    codes = cut_at_stop(raw, w["gpt"].config["stop_mel_token"])
    if codes.shape[1] == 0:
        raise PipelineError("the GPT stopped before its first code; there is nothing to synthesise (try another seed)")
    problem = codebook_problem(codes, w["semantic-codec"].config["codebook_size"])
    if problem:
        raise PipelineError(problem)
    tr["codes.codes"] = codes
    return codes


def decoding_for(inf: dict, greedy: bool, max_codes: int | None,
                 num_beams: int | None = None, gpt=None) -> tuple[Decoding, int]:
    """The decoding settings from the manifest's ``inference.generation``, and the code
    cap (its ``max_mel_tokens`` unless given).  Sampling uses the manifest's
    ``num_beams`` (upstream's beam sampling), greedy one beam (greedy search), unless
    ``num_beams`` is given; ``length_penalty`` (used with beams) is the manifest's.  With
    ``gpt`` (its canonical file), a cap beyond its mel positions is refused here, before any work."""
    gen = inf["generation"]
    if num_beams is None:
        num_beams = 1 if greedy else gen["num_beams"]
    try:
        d = Decoding(greedy=greedy, temperature=gen["temperature"], top_k=gen["top_k"], top_p=gen["top_p"],
                     repetition_penalty=gen["repetition_penalty"], num_beams=num_beams,
                     length_penalty=gen["length_penalty"])
    except ValueError as e:
        raise PipelineError(str(e)) from None
    cap = max_codes if max_codes is not None else gen["max_mel_tokens"]
    if gpt is not None:  # refused before any work: the start code takes mel position 0
        rows = gpt["mel_pos_embedding.weight"].shape[0]
        if not 1 <= cap < rows:
            raise PipelineError(f"max_codes {cap}: this bundle's GPT holds 1 to {rows - 1} codes "
                                f"(gpt.safetensors mel_pos_embedding.weight has {rows} rows); pass --max-codes N within that")
    return d, cap


def speaker_prompt(b: Bundle, prompt_audio, tr: dict, dev, to_mel_rate: bool):
    """The speaker prompt as infer_v2 reads it (``librosa.load`` at its default rate, cut
    to ``max_reference_audio_s``) and its 16 kHz resampling; with ``to_mel_rate`` the
    first is resampled to the mel's rate (2.0; an identity at 22.05 kHz), else kept (2.5).
    Returns (mel-rate audio, 16 kHz audio) on ``dev``."""
    fe, inf, rates = b.pipeline["front_ends"], b.pipeline["inference"], b.pipeline["sample_rates"]
    samples, sr = _audio(prompt_audio, "speaker prompt")
    rs = fe["resampling"]
    spk_hz = rs["prompt_load"]["speaker_prompt_hz"]  # librosa.load's default rate, which infer_v2 relies on
    a22 = front_ends.cut(front_ends.load_prompt(samples, sr, spk_hz, rs["prompt_load"]), inf["max_reference_audio_s"], spk_hz)
    _check_length(a22, spk_hz, "speaker prompt")
    a16 = front_ends.resample(a22, spk_hz, rates["semantic_features_hz"], rs["sinc"])
    if to_mel_rate:
        a22 = front_ends.resample(a22, spk_hz, rates["mel_hz"], rs["sinc"])
    tr["prompt.audio_22k"], tr["prompt.audio_16k"] = a22, a16
    return a22.to(dev), a16.to(dev)


def emotion_features(b: Bundle, emotion_prompt, tr: dict, dev):
    """The emotion prompt as infer_v2 reads it (``librosa.load`` at 16 kHz directly, cut)
    and its semantic features ``[1, T, hidden]``."""
    fe, inf = b.pipeline["front_ends"], b.pipeline["inference"]
    samples, sr = _audio(emotion_prompt, "emotion prompt")
    load = fe["resampling"]["prompt_load"]
    hz = load["emotion_prompt_hz"]
    e16 = front_ends.cut(front_ends.load_prompt(samples, sr, hz, load), inf["max_reference_audio_s"], hz)
    _check_length(e16, hz, "emotion prompt")
    tr["emotion_features.audio_16k"] = e16
    return _features(b.files, fe, e16.to(dev), tr, "emotion_features")


def speaker_style(b: Bundle, a16, tr: dict):
    """CAMPPlus on the Kaldi fbank of the 16 kHz prompt minus its mean over time."""
    fbank = front_ends.campplus_fbank(a16, b.pipeline["front_ends"]["campplus_fbank"])
    style = campplus.embed(b.files["campplus"], fbank.unsqueeze(0))
    tr["style.fbank"], tr["style.style"] = fbank.unsqueeze(0), style
    return style


def mel_and_waveform(w, inf: dict, prompt_cond, cond_t, ref_mel, style, noise, noise_gen: torch.Generator, tr: dict,
                     progress) -> torch.Tensor:
    """The steps both releases share, per segment: the CFM sampler on ``cat(prompt_condition,
    cond)`` (noise drawn from ``noise_gen`` unless given), the prompt's frames cut,
    BigVGAN, the clamp.  Returns the waveform ``[1, n]``."""
    progress("mel")
    dev = cond_t.device
    content = torch.cat([prompt_cond, cond_t], 1)
    tr["mel.cat_condition"] = content
    tr["mel.x_lens"] = torch.tensor([content.shape[1]], dtype=torch.int64, device=dev)
    shape = (1, w["s2mel"].config["in_channels"], content.shape[1])
    if noise is None:
        noise = torch.randn(shape, generator=noise_gen)
    elif tuple(noise.shape) != shape:
        raise PipelineError(f"the CFM noise has shape {list(noise.shape)}, the flow needs {list(shape)}")
    noise = noise.to(dev, torch.float32)
    tr["mel.noise"] = noise
    mel = s2mel.cfm_inference(w["s2mel"], content, ref_mel, style, noise, inf["diffusion_steps"], inf["inference_cfg_rate"])
    tr["mel.mel"] = mel
    target = mel[:, :, ref_mel.shape[-1]:]
    tr["mel.target"] = target

    progress("waveform")
    voc = bigvgan.vocode(w["bigvgan"], target).reshape(1, 1, -1)
    tr["waveform.bigvgan"] = voc
    lo, hi = inf["output_clamp"]
    wav = voc.reshape(1, -1).clamp(lo, hi)
    tr["waveform.wav"] = wav
    return wav


TRACE_SCHEMA = "indextts2-pipeline-trace"


def trace_metadata(b: Bundle, r: Result) -> dict[str, str]:
    """The metadata of a trace file: the options, the step order, and the sha256 of every
    bundle file used (as ``manifest.json`` records them)."""
    from . import REFERENCE_VERSION
    from .pipeline_2_5 import TRACE_2_5

    used = {name: rec["sha256"] for name, rec in sorted(b.manifest["files"].items()) if rec.get("model") in FILES[b.version]}
    used[b.manifest["bundle"]["tokenizer"]["path"]] = next(iter(b.manifest["bundle"]["tokenizer"]["files"].values()))["sha256"]
    order = TRACE_2_5 if b.version == "2.5" else TRACE_2_0
    return {"schema": TRACE_SCHEMA, "family_version": b.version, "reference_version": REFERENCE_VERSION,
            "options": json.dumps(r.options, sort_keys=True), "steps": json.dumps(trace_order(order, r.trace)),
            "files_sha256": json.dumps(used, sort_keys=True), "sample_rate": str(r.sample_rate)}


def trace_order(order, trace: dict) -> list[str]:
    """The trace's keys in the order the steps ran: the first segment's, each later
    segment's (``key@k``), then the joined ``output.wav`` of a text of several segments."""
    keys = [k for k in order if k in trace]
    k = 1
    while f"codes.codes@{k}" in trace:
        keys += [f"{key}@{k}" for key in order if f"{key}@{k}" in trace]
        k += 1
    return keys + (["output.wav"] if "output.wav" in trace else [])


def segment_budget(inf: dict, max_segment_tokens: int | None) -> int:
    budget = inf["max_text_tokens_per_segment"] if max_segment_tokens is None else max_segment_tokens
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise PipelineError(f"max_segment_tokens {budget!r}: a segment holds at least one token")
    return budget


def _segments(b: Bundle, text_in: str, max_segment_tokens: int | None = None) -> list[list[int]]:
    if not isinstance(text_in, str) or not text_in.strip():
        raise PipelineError("the text is empty")
    inf = b.pipeline["inference"]
    try:
        segments = text.sentencepiece_segments(b.tokenizer_path(), text_in, segment_budget(inf, max_segment_tokens),
                                               inf["segment_split"])
    except ValueError as e:
        raise PipelineError(str(e)) from None
    rows = b.files["gpt"]["text_pos_embedding.weight"].shape[0]  # the text, start and stop tokens framing it
    longest = max(len(ids) for ids in segments)
    if longest + 2 > rows:
        raise PipelineError(f"a segment of {longest} tokens: this bundle's GPT holds {rows - 2} (gpt.safetensors "
                            f"text_pos_embedding.weight has {rows} rows); pass a smaller max_segment_tokens")
    return segments


MIN_PROMPT_S = 0.5  # the reference's own floor: shorter prompts leave the encoders a few frames


def _check_length(audio: torch.Tensor, sr: int, what: str) -> None:
    if audio.shape[-1] < MIN_PROMPT_S * sr:
        raise PipelineError(f"{what}: {audio.shape[-1] / sr:.3f} s of audio; at least {MIN_PROMPT_S} s is needed")


def _features(w, fe: dict, a16: torch.Tensor, tr: dict, step: str, record_inputs: bool = True) -> torch.Tensor:
    feats, mask = front_ends.w2v_bert_features(a16, fe["w2v_bert_features"])
    feats, mask = feats.to(a16.device), mask.to(a16.device)
    if record_inputs:
        tr[f"{step}.input_features"], tr[f"{step}.attention_mask"] = feats, mask
    out = w2v_bert.semantic_features(w["w2v-bert"], feats, mask)
    tr[f"{step}.feature"] = out
    return out


def _emotion_weights(weights, alpha: float, normalize: bool, inf: dict, emo_num) -> list[float]:
    weights = [float(x) for x in weights]
    if len(weights) != len(emo_num):
        raise PipelineError(f"the emotion vector has {len(weights)} weights; the bundle has {len(emo_num)} emotions "
                            f"({', '.join(inf['emotion_names'])})")
    if any(x < 0 for x in weights):
        raise PipelineError("emotion weights must not be negative")
    if normalize:
        weights = normalize_emotion_vector(weights, inf)
    scale = max(0.0, min(1.0, alpha))
    if scale != 1.0:  # infer_v2: scaled by alpha and truncated to 4 decimals
        weights = [int(x * scale * 10000) / 10000 for x in weights]
    return weights
