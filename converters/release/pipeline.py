"""The pipeline contract: what a runtime needs besides the weights, and the rules that
the files of one bundle must satisfy together.

:func:`build` gives the values ``convert.py all`` writes to ``manifest.json`` under
``"pipeline"``; ``canonical_schema.json`` ``"pipeline"`` documents every key.  Each value
comes from a canonical file's metadata ``config`` where the release configures it, and
otherwise from the constant below, which says where upstream hard-codes it:

- ``sample_rates``: the rate each audio input is resampled to
- ``front_ends``: the three feature extractors (w2v-bert's SeamlessM4T filterbank,
  CAMPPlus's Kaldi filterbank, the s2mel mel spectrogram), every parameter named, and
  how a prompt file reaches their rates (``resampling``)
- ``flow``: which output feeds which input, in order, with shapes
- ``tokens``: the special token ids and the text tokenizer
- ``inference``: the constants infer_v2 hard-codes between the models (mel frames per
  code, diffusion steps, CFG rate, sampling defaults)

:func:`cross_file_problems` checks, from the canonical files' configs alone, that the
dims shared between files agree (``check DIR`` runs it; torch-free).
"""

from __future__ import annotations

import json
import os

# ------------------------------------------------------------------ upstream constants

# transformers' SeamlessM4TFeatureExtractor (what infer_v2 loads for facebook/w2v-bert-2.0),
# constants of its _extract_fbank_features / __init__ that preprocessor_config.json cannot set.
SEAMLESS_FBANK = {
    "waveform_scale": 32768.0,  # samples are multiplied by 2**15 (Kaldi's 16-bit convention)
    "frame_length": 400,  # 25 ms at 16 kHz
    "hop_length": 160,  # 10 ms
    "fft_length": 512,
    "window": "povey",  # hann(400, periodic=False) ** 0.85
    "preemphasis": 0.97,
    "remove_dc_offset": True,
    "power": 2.0,
    "center": False,
    "mel_scale": "kaldi",  # 1127 * ln(1 + f / 700), triangles in mel space
    "mel_fmin": 20.0,
    "mel_fmax": "sampling_rate / 2",
    "mel_norm": None,
    "mel_floor": 1.192092955078125e-07,
    "log": "natural",
    "normalize": "per utterance and mel bin over its T frames, before padding: (x - mean) / sqrt(var + normalize_epsilon), "
                 "var with normalize_ddof (the sample variance: fewer than 2 frames give NaN upstream)",
    "normalize_ddof": 1,  # x.var(0, ddof=1)
    "normalize_epsilon": 1e-7,
    "pad_to_multiple_of": 2,  # __call__'s default: T frames padded with padding_value to a multiple of it
    "stack": "after padding to T_pad frames, stride consecutive frames concatenated (T_pad % stride dropped): "
             "[T_pad, num_mel_bins] -> [T_pad // stride, num_mel_bins * stride]",
    "attention_mask": "one per stacked frame: 1 where frame stride * k + 1 (the second of its group) is a real frame, "
                      "0 where it is padding (so an odd T's last stacked frame, real frame and padding, is masked)",
}
# Its class defaults, used when the w2v-bert folder has no preprocessor_config.json.
SEAMLESS_DEFAULTS = {"feature_size": 80, "num_mel_bins": 80, "sampling_rate": 16000, "stride": 2, "padding_value": 0.0}
SEAMLESS_KEYS = ("feature_size", "num_mel_bins", "sampling_rate", "stride", "padding_value")

# torchaudio.compliance.kaldi.fbank(audio_16k, num_mel_bins=80, dither=0, sample_frequency=16000)
# as infer_v2 calls it for CAMPPlus, with torchaudio's defaults spelled out.
KALDI_FBANK = {
    "sampling_rate": 16000,
    "num_mel_bins": 80,
    "waveform_scale": 1.0,  # float samples in [-1, 1], not scaled
    "frame_length_ms": 25.0,
    "frame_shift_ms": 10.0,
    "fft_length": 512,  # round_to_power_of_two
    "window": "povey",
    "preemphasis": 0.97,
    "remove_dc_offset": True,
    "dither": 0.0,
    "snip_edges": True,
    "power": 2.0,
    "mel_scale": "kaldi",
    "mel_fmin": 20.0,
    "mel_fmax": "sampling_rate / 2",
    "log_floor": 1.1920928955078125e-07,  # torch.finfo(float32).eps
    "use_energy": False,
    "mean_normalize": "feat - feat.mean(dim=0) over time (infer_v2), no variance normalisation",
}

# indextts.s2mel.modules.audio.mel_spectrogram, with the sizes from the s2mel config.
MEL_CONSTANTS = {
    "window": "hann (periodic), win_length",
    "pad": "reflect, (n_fft - hop_length) // 2 on both sides",
    "center": False,
    "magnitude": "sqrt(re**2 + im**2 + magnitude_epsilon)",
    "magnitude_epsilon": 1e-9,
    "mel_scale": "slaney (librosa default, htk=False)",
    "mel_norm": "slaney",
    "log": "log(clamp(mel, min=log_clamp_min))",
    "log_clamp_min": 1e-5,
}

# How infer_v2 brings a prompt file to the front ends' rates: librosa.load (soundfile's
# decoding, to_mono, soxr), then torchaudio.transforms.Resample for the speaker prompt.
RESAMPLING = {
    "prompt_load": {
        "upstream": "librosa.load(path, sr=rate) in infer_v2._load_and_cut_audio, then torch.tensor(audio).unsqueeze(0) "
                    "and its first int(inference.max_reference_audio_s * rate) samples",
        "speaker_prompt_hz": 22050,  # librosa.load's default sr: infer_v2 passes none for the speaker prompt
        "emotion_prompt_hz": 16000,  # infer_v2 passes sr=16000 for the emotion prompt
        "decode": "libsndfile's float32 read: PCM / 2**(bits - 1) (8-bit unsigned: (u - 128) / 128), IEEE float as stored",
        "mono": "mean over the channels (librosa.to_mono)",
        "non_finite": "refused (librosa.util.valid_audio)",
        "resampler": "soxr.resample, when the file's rate differs",
        "soxr_quality": "soxr_hq",  # librosa's default res_type, passed to soxr as quality
        "length": "ceil(n * (target_hz / source_hz)): soxr's output zero-padded or cut to it (librosa.util.fix_length)",
    },
    "sinc": {
        "upstream": "torchaudio.transforms.Resample(orig, new) with its defaults: the speaker prompt at speaker_prompt_hz "
                    "to mel_hz for the mel and to 16000 for w2v-bert and CAMPPlus",
        "method": "sinc_interp_hann",
        "lowpass_filter_width": 6,
        "rolloff": 0.99,
        "rates": "divided by gcd(orig, new); equal rates return the input",
        "kernel": "float64, cast to float32; the input zero-padded by width left and width + orig right, conv1d with stride orig",
        "length": "ceil(float32(new * n / orig)) with the gcd-reduced rates",
    },
}

# infer_v2.py: values hard-coded between the models.
INFERENCE = {
    "mel_frames_per_code": 1.72,  # target_lengths = (code_lens * 1.72).long()
    "diffusion_steps": 25,
    "inference_cfg_rate": 0.7,  # dphi = (1 + rate) * cond - rate * uncond; uncond has zero prompt, style and condition
    "cfm_solver": "Euler over linspace(0, 1, diffusion_steps + 1); x starts as N(0, 1); the prompt frames of x are zeroed after each step",
    "max_reference_audio_s": 15,
    "output_clamp": [-1.0, 1.0],
    "interval_silence_ms": 200,  # zeros at output_hz between two segments' waveforms
    # The text: at most this many tokens per segment (2.5: the language prefix included); longer texts are split.
    "max_text_tokens_per_segment": 120,
    "segments": "TextTokenizer.split_segments(pieces, max_text_tokens_per_segment) with segment_split's pieces (see "
                "reference/text.py split_pieces); each segment synthesised alone from codes to waveform (the prompt "
                "and the emotion vector computed once), the waveforms joined with interval_silence_ms of zeros",
    "segment_split": {"sentence_end_pieces": [".", "!", "?", "\u2581.", "\u2581?", "\u2581..."],
                      "comma_pieces": [",", "\u2581,"], "dash_pieces": ["-"], "apostrophe_pieces": ["'", "\u2581'"]},
    "generation": {"do_sample": True, "top_p": 0.8, "top_k": 30, "temperature": 0.8, "num_beams": 3,
                   "repetition_penalty": 10.0, "length_penalty": 0.0, "max_mel_tokens": 1500},
    "conditioning_lengths": "infer_v2 passes spk_cond_emb.shape[-1] (the feature width) as the length, so nothing is masked",
    # The audio inputs, as infer_v2's _load_and_cut_audio and _get_*_conditioning read them.
    "speaker_prompt": "librosa.load(path) at its default 22050 Hz (mono, soxr_hq), cut to max_reference_audio_s, then "
                      "torchaudio Resample to semantic_features_hz (w2v-bert, CAMPPlus) and to mel_hz (the mel prompt)",
    "emotion_prompt": "librosa.load(path, sr=16000) directly (mono, soxr_hq), cut to max_reference_audio_s; the speaker "
                      "prompt's file when no emotion prompt is given or an emotion vector is",
    # The explicit emotion vector: normalize_emo_vec (the web UI applies it before infer), then infer's alpha scaling.
    "emotion_names": ["happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm"],
    "emotion_vector_bias": [0.9375, 0.875, 1.0, 1.0, 0.9375, 0.9375, 0.6875, 0.5625],
    "emotion_vector_max_sum": 0.8,  # normalize_emo_vec scales the biased weights down to this sum at most
    "emotion_vector_alpha": "w = [int(x * clamp(alpha, 0, 1) * 10000) / 10000 for x in w] when the scale is not 1; "
                            "then the emotion prompt is the speaker prompt with alpha 1",
    "emotion_vector_mix": "emovec = sum_g w[g] * emotion_matrix[group g][argmax_i cos(style, speaker_matrix[group g][i])] "
                          "+ (1 - sum(w)) * merge_emovec(...)",
    "repetition_penalty_ids": "generate's input_ids: one fake id 1 per prompt embedding, start_mel_token, then the codes: "
                              "ids 1 and start_mel_token are penalised from the first step",
    "cfm_noise": "torch.randn([1, in_channels, T_prompt + T_target]) from torch's global generator inside cfm.inference",
    "output_pcm16": "round(clamp(32767 * wav, -32767, 32767)) as int16 (IndexTTS-2.5's save_pcm_wav; indextts2 writes "
                    "the float waveform through torchaudio.save(bits_per_sample=16))",
}


# infer_v2_5.py: what changes between the models in IndexTTS-2.5 (the rest as INFERENCE).
INFERENCE_2_5 = {
    **{k: v for k, v in INFERENCE.items()
       if k not in ("mel_frames_per_code", "conditioning_lengths", "emotion_vector_bias", "emotion_vector_max_sum")},
    "mel_frames_per_decoded_frame": 1.72,  # target_lengths = int(S_infer.shape[1] * 1.72 * duration_factor)
    "decoded_frames_per_code": 2,  # EnhancedCodec.decode upsamples by 2: S_infer has 2 frames per code
    "duration_factor": 1.0,  # infer_v2_5's default; scales the target length
    "target_length": "int(S_infer.shape[1] * mel_frames_per_decoded_frame * duration_factor), left to right in Python "
                     "floats (float64; 2.0 multiplies a LongTensor by 1.72 in float32 instead)",
    "conditioning_lengths": "infer_v2_5 passes spk_cond_emb.shape[-1] (the feature width) as the emotion lengths, so nothing is masked",
    "speaker_prompt": "librosa.load(path) at its default 22050 Hz (mono, soxr_hq), cut to max_reference_audio_s, then "
                      "indextts25.utils.common.resample (torchaudio's Resample, bit for bit: front_ends.resampling.sinc) to "
                      "16000 for w2v-bert and CAMPPlus; the mel prompt is of the 22050 Hz audio itself, not resampled",
    "speaker_conditioning": "gpt.spk_emb_proj(style), the CAMPPlus style of the speaker prompt: one latent [1, 1, model_dim]",
    # The emotion vector: infer_v2_5 has no normalize_emo_vec (no bias, no 0.8 cap); alpha scales it as in 2.0.
    "emotion_vector_normalization": None,
    "output_pcm_scale": 32767.0,
    "output": "infer_v2_5 returns clamp(output_pcm_scale * bigvgan(mel), -32767, 32767) as float (PCM scale; save_pcm_wav "
              "rounds it to int16, output_pcm16); divided by output_pcm_scale that is clamp(wav, output_clamp), the "
              "waveform in [-1, 1]",
    "segments": "budget = max(1, min(max_text_tokens_per_segment, gpt max_text_tokens) - len(ids of the language prefix)); "
                "a prepared text of at most budget tokens is one segment, a longer one is split at punctuation, then "
                "between words (split_text_by_tokens with segment_split's patterns; see reference/text.py "
                "split_text_2_5), each segment synthesised alone and joined with interval_silence_ms",
    "segment_split": {"protected_pattern": r"<\|SPECIAL_TOKEN_\d+\|>.*?<\|SPECIAL_TOKEN_\d+\|>",
                      "split_after_pattern": r"(?<=[\uff0c\u3002\uff01\uff1f\u3001\uff1b\uff1a,\.!\?;:\n])",
                      "word_pattern": r"\S+\s*|\s+"},
    "empty_codes": "a segment whose codes are empty after the cut at stop_mel_token is skipped (no audio)",
}

# indextts/utils/tokenizer.py get_encoding: the special tokens it appends after the ranks, in
# this order (ids len(ranks), len(ranks) + 1, ...), beside the <|lang|> of the first 99 languages.
TIKTOKEN_SPECIAL_LANGUAGES = 99
TIKTOKEN_AUDIO_EVENTS = ("ASR", "AED", "SER", "Speech", "/Speech", "BGM", "/BGM", "Laughter", "/Laughter",
                         "Applause", "/Applause")
TIKTOKEN_EMOTIONS = ("HAPPY", "SAD", "ANGRY", "NEUTRAL")
TIKTOKEN_TASKS = ("translate", "transcribe", "startoflm", "startofprev", "nospeech", "notimestamps")
TIKTOKEN_TTS = ("TTS/B", "TTS/O", "TTS/Q", "TTS/A", "TTS/CO", "TTS/CL", "TTS/H", *(f"TTS/SP{i:02d}" for i in range(1, 14)))


def tiktoken_specials(languages) -> list[str]:
    """get_encoding's special tokens before the timestamps, in id order."""
    return ["<|endoftext|>", "<|startoftranscript|>",
            *(f"<|{x}|>" for x in list(languages)[:TIKTOKEN_SPECIAL_LANGUAGES]),
            *(f"<|{x}|>" for x in TIKTOKEN_AUDIO_EVENTS + TIKTOKEN_EMOTIONS + TIKTOKEN_TASKS),
            *(f"<|SPECIAL_TOKEN_{i}|>" for i in range(1, 31)),
            *(f"<|{x}|>" for x in TIKTOKEN_TTS)]


# infer_v2_5._prepare_text without normalisation: TextNormalizer.char_rep_map (indextts/utils/front.py),
# as one regex alternation of the keys in this order (at each position the first key that matches wins).
TEXT_CHAR_MAP = {
    "\uff1a": ",", "\uff1b": ",", ";": ",", "\uff0c": ",", "\u3002": ".", "\uff01": "!", "\uff1f": "?", "\n": " ",
    "\u00b7": "-", "\u3001": ",", "...": "\u2026", ",,,": "\u2026", "\uff0c\uff0c\uff0c": "\u2026", "\u2026\u2026": "\u2026",
    "\u201c": "'", "\u201d": "'", '"': "'", "\u2018": "'", "\u2019": "'", "\uff08": "'", "\uff09": "'", "(": "'", ")": "'",
    "\u300a": "'", "\u300b": "'", "\u3010": "'", "\u3011": "'", "[": "'", "]": "'", "\u2014": "-", "\uff5e": "-", "~": "-",
    "\u300c": "'", "\u300d": "'", ":": ",",
}

# indextts/utils/tokenizer.py get_tokenizer(multilingual=True) reads <model_dir>/<file>; infer_v2_5 prepares
# and encodes the text (_prepare_text with text_normalization=False, then infer_generator).
TIKTOKEN_TEXT = {
    "file": "multilingual_zh_ja_yue_char_del.tiktoken",
    "format": "tiktoken BPE ranks (one 'base64-token rank' per line); upstream's get_encoding appends special_tokens "
              "and then the timestamp_tokens after the ranks, ids from len(ranks) on (not from the largest rank + 1), "
              "explicit_n_vocab = len(ranks) + their number",
    "pat_str": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "special_tokens": None,  # build(): tiktoken_specials(the GPT's languages)
    "timestamp_tokens": {"count": 1501, "step": 0.02, "format": "<|{:.2f}|>",
                         "rule": "format.format(i * step) for i in range(count), after special_tokens"},
    "prepare": [
        "lang lower-cased",
        "char_map applied (each match of the alternation of its keys, in order, replaced by its value) once for "
        "the languages of char_map_single_pass, twice for every other language (so ',,,' from the first pass "
        "becomes an ellipsis in the second); with normalisation off ':' and its full-width form are not kept "
        "(infer_v2_5 keeps them through the first pass only to normalise them)",
        "lower-cased for lower_case_languages, upper-cased for upper_case_languages",
        "annotations: <word|pronunciation> -> ' P ' when P (the pronunciation upper-cased) is all hiragana or all "
        "katakana (annotation_kana), else chinese_token + P + chinese_token when the word has a character of "
        "annotation_chinese, else other_token + P + other_token",
        "ja: JapaneseG2PProcessor.process_ja_text (see unsupported_languages)",
        "every <|x|> (special_case_pattern) written <|X|>, x upper-cased",
    ],
    "char_map": TEXT_CHAR_MAP,
    "char_map_single_pass": ["es", "ja"],
    "lower_case_languages": ["ja", "zh", "zhen", "en"],
    "upper_case_languages": ["es"],
    "annotation_pattern": r"<([^|>\n]+)\|([^>\n]+)>",
    "annotation_chinese": "[\u4e00-\u9fff]",
    "annotation_kana": ["^[\u3040-\u309f]+$", "^[\u30a0-\u30ff]+$"],
    "chinese_token": "<|SPECIAL_TOKEN_2|>",
    "other_token": "<|SPECIAL_TOKEN_1|>",
    "special_case_pattern": r"<\|([^|]+)\|>",
    "prefix": "<|{lang}|> ",
    "allowed_special": "all",
    "prompt": "prefix.format(lang=lang) + the prepared text, encoded with allowed_special='all' (a language past the "
              "first 99, and zhen, has no special token: its prefix is encoded as plain text); no stop token is "
              "appended: prepare_gpt_inputs removes every stop_text_token from the ids (the start token, an ordinary "
              "character in this vocabulary, stays), left-pads by as many zero rows (masked) and frames them as "
              "[start_text_token, ids..., stop_text_token]",
    "extra_languages": {"zhen": "common"},  # accepted by infer_generator besides tokens.languages, with this language id
    "unsupported_languages": {
        "ja": "infer_v2_5 splits Japanese text into words with fugashi/MeCab (JapaneseG2PProcessor(g2p_ratio=0): the "
              "words joined by single spaces) before tokenizing; that needs a morphological analyser and its dictionary",
    },
    "language_id": "lang = languages.index(lang) (upstream lang_to_token; extra_languages map to the named language), "
                   "the lang_embedding row added to every text position",
}


def seamless_params(w2v_folder: str | None) -> dict:
    """The w2v-bert front end's settings: ``preprocessor_config.json`` beside the model
    when there is one, else the feature extractor's class defaults (said so)."""
    path = os.path.join(w2v_folder, "preprocessor_config.json") if w2v_folder else None
    if path and os.path.isfile(path):
        with open(path) as f:
            raw = json.load(f)
        vals = {k: raw.get(k, SEAMLESS_DEFAULTS[k]) for k in SEAMLESS_KEYS}
        source = "preprocessor_config.json of the w2v-bert source (SeamlessM4TFeatureExtractor)"
    else:
        vals = dict(SEAMLESS_DEFAULTS)
        source = "SeamlessM4TFeatureExtractor class defaults: the w2v-bert source has no preprocessor_config.json"
    return {**vals, **SEAMLESS_FBANK, "source": source}


def mel_params(s2: dict) -> dict:
    """The s2mel mel front end's settings from the s2mel file's config (``fmax`` None,
    infer_v2's reading of the config's "None", is written ``"sampling_rate / 2"``)."""
    return {
        "sampling_rate": s2["sampling_rate"], "n_fft": s2["n_fft"], "win_length": s2["win_length"],
        "hop_length": s2["hop_length"], "n_mels": s2["n_mels"], "fmin": s2["fmin"],
        "fmax": s2["fmax"] if s2["fmax"] is not None else "sampling_rate / 2",
        **MEL_CONSTANTS, "source": "s2mel config (preprocess_params.spect_params), indextts/s2mel/modules/audio.py",
    }


def build(configs: dict[str, dict], w2v_folder: str | None = None, family_version: str = "2.0") -> dict:
    """The pipeline values for a bundle whose canonical files have these configs
    (``{model kind: metadata config}``; every kind must be present), of an IndexTTS
    release of ``family_version`` (2.5: :func:`flow_2_5` and its tokens and constants)."""
    gpt, s2, w2v, codec = configs["gpt"], configs["s2mel"], configs["w2v-bert"], configs["semantic-codec"]
    voc, cam = configs["bigvgan"], configs["campplus"]
    seam = seamless_params(w2v_folder)
    feat_in = seam["num_mel_bins"] * seam["stride"]
    h = w2v["hidden_size"]
    mel = mel_params(s2)
    norm_index = w2v.get("indextts2_hidden_state_index", 17)
    semantic_out = ("the encoder's last hidden state (statistics folded in, --profile indextts2)"
                    if w2v.get("profile") == "indextts2" else
                    f"(hidden_states[{norm_index}] - semantic_stats.mean) / semantic_stats.std")
    steps = {
        "semantic_features":
        {"step": "semantic_features", "file": "w2v_bert.safetensors", "upstream": "infer_v2.get_emb",
         "inputs": {"input_features": f"[B, T_feat, {feat_in}] (front_ends.w2v_bert_features of 16 kHz audio)",
                    "attention_mask": "[B, T_feat]"},
         "outputs": {"feature": f"[B, T_feat, {h}] = {semantic_out}"},
         "used_as": "spk_cond_emb (speaker reference audio) and emo_cond_emb (emotion reference audio)"},
        "reference_mel":
        {"step": "reference_mel", "file": None, "upstream": "infer_v2.mel_fn",
         "inputs": {"audio": f"speaker reference audio at {s2['sampling_rate']} Hz"},
         "outputs": {"ref_mel": f"[1, {s2['n_mels']}, T_mel] (front_ends.s2mel_mel)"}},
        "style":
        {"step": "style", "file": "campplus.safetensors", "upstream": "campplus_model(feat.unsqueeze(0))",
         "inputs": {"fbank": f"[1, T_fbank, {cam['feat_dim']}] (front_ends.campplus_fbank of 16 kHz audio)"},
         "outputs": {"style": f"[1, {cam['embedding_size']}]"}},
        "emotion_vector":
        {"step": "emotion_vector", "file": "gpt.safetensors", "upstream": "gpt.merge_emovec(spk_cond_emb, emo_cond_emb, lengths, lengths, alpha)",
         "inputs": {"spk_cond_emb": f"[1, T_feat, {h}]", "emo_cond_emb": f"[1, T_emo, {h}]", "alpha": "emotion strength, 1.0 without an emotion reference"},
         "outputs": {"emovec": f"[1, {gpt['model_dim']}]"},
         "optional": "with an explicit emotion vector w (one weight per emo_num group): emovec = emotion_mix(speaker_matrix, "
                     "emotion_matrix, style, w) + (1 - sum(w)) * emovec"},
        "mel":
        {"step": "mel", "file": "s2mel.safetensors", "upstream": "cfm.inference(cat([prompt_condition, cond], 1), [T_mel + T_target], ref_mel, style, None, 25, 0.7)",
         "outputs": {"mel": f"[1, {s2['n_mels']}, T_mel + T_target]; the runtime keeps frames T_mel onwards"}},
        "waveform":
        {"step": "waveform", "file": "bigvgan.safetensors", "upstream": "bigvgan(mel)",
         "inputs": {"mel": f"[1, {voc['num_mels']}, T_target]"},
         "outputs": {"wav": f"[1, 1, T_target * {_prod(voc['upsample_rates'])}] at {voc.get('sampling_rate', s2['sampling_rate'])} Hz, clamped to [-1, 1]"}},
    }
    out = {
        "sample_rates": {
            "semantic_features_hz": seam["sampling_rate"],
            "speaker_fbank_hz": KALDI_FBANK["sampling_rate"],
            "mel_hz": s2["sampling_rate"],
            "output_hz": voc.get("sampling_rate", s2["sampling_rate"]),
        },
        "front_ends": {
            "w2v_bert_features": seam,
            "campplus_fbank": {**KALDI_FBANK, "source": "torchaudio.compliance.kaldi.fbank as infer_v2 calls it"},
            "s2mel_mel": mel,
            "resampling": RESAMPLING,
        },
        "semantic_hidden_state": {"index": norm_index, "profile": w2v.get("profile", "full"), "value": semantic_out},
        "flow": None,
        "tokens": {
            "start_text_token": gpt["start_text_token"], "stop_text_token": gpt["stop_text_token"],
            "start_mel_token": gpt["start_mel_token"], "stop_mel_token": gpt["stop_mel_token"],
            "number_text_tokens": gpt["number_text_tokens"], "number_mel_codes": gpt["number_mel_codes"],
            "codebook_size": codec["codebook_size"],
        },
        "inference": INFERENCE,
    }
    if family_version == "2.5":
        out.update(flow=flow_2_5(configs, steps), inference=INFERENCE_2_5,
                   unused={"s2mel gpt_layer": "carried in s2mel.safetensors and run by none of infer_v2_5's steps "
                                              "(upstream removed its use_gpt_latent path)"})
        from ..models.gpt_v2_5 import LANGUAGES  # upstream's table: the tokenizer's <|lang|> tokens follow it, not the checkpoint

        out["tokens"].update(tokenizer={**TIKTOKEN_TEXT, "special_tokens": tiktoken_specials(LANGUAGES)},
                             languages=list(gpt["languages"]))
        return out
    out["flow"] = [
        steps["semantic_features"],
        {"step": "semantic_codes", "file": "semantic_codec.safetensors", "upstream": "semantic_codec.quantize(spk_cond_emb)",
         "inputs": {"spk_cond_emb": f"[1, T_feat, {codec['hidden_size']}]"},
         "outputs": {"codes": "[1, T_feat] int64 (unused)", "S_ref": f"[1, T_feat, {codec['hidden_size']}] quantized embedding"}},
        steps["reference_mel"],
        steps["style"],
        {"step": "prompt_condition", "file": "s2mel.safetensors", "upstream": "length_regulator(S_ref, ylens=[T_mel])[0]",
         "inputs": {"S_ref": f"[1, T_feat, {codec['hidden_size']}]", "ylens": "[1] = T_mel"},
         "outputs": {"prompt_condition": f"[1, T_mel, {s2['length_regulator_channels']}]"}},
        steps["emotion_vector"],
        {"step": "speech_conditioning", "file": "gpt.safetensors", "upstream": "gpt.get_conditioning(spk_cond_emb.transpose(1, 2), lengths)",
         "inputs": {"spk_cond_emb": f"[1, {gpt['conditioning_encoder']['input_size']}, T_feat]"},
         "outputs": {"conditioning": f"[1, {gpt['condition_num_latent']}, {gpt['model_dim']}]"}},
        {"step": "codes", "file": "gpt.safetensors", "upstream": "gpt.inference_speech (autoregressive sampling, inference.generation)",
         "inputs": {"text_tokens": "[1, T_text] ids from the tokenizer", "conditioning": "as above", "emovec": "as above"},
         "outputs": {"codes": f"[1, T_codes] in [0, {gpt['number_mel_codes']}), cut at the first stop_mel_token"}},
        {"step": "latents", "file": "gpt.safetensors", "upstream": "gpt(conditioning, text_tokens, ..., codes, ..., emo_vec=emovec) (teacher-forced)",
         "outputs": {"latent": f"[1, T_codes, {gpt['model_dim']}]"}},
        {"step": "latent_projection", "file": "s2mel.safetensors", "upstream": "s2mel gpt_layer(latent)",
         "outputs": {"latent": f"[1, T_codes, {s2['gpt_layer_dims'][-1]}]"}},
        {"step": "code_embeddings", "file": "semantic_codec.safetensors", "upstream": "semantic_codec.quantizer.vq2emb(codes.unsqueeze(1)).transpose(1, 2)",
         "outputs": {"S_infer": f"[1, T_codes, {codec['hidden_size']}], then S_infer + latent"}},
        {"step": "target_condition", "file": "s2mel.safetensors", "upstream": "length_regulator(S_infer, ylens=(code_lens * 1.72).long())[0]",
         "outputs": {"cond": f"[1, T_target, {s2['length_regulator_channels']}]"}},
        steps["mel"],
        steps["waveform"],
    ]
    return out


def flow_2_5(configs: dict[str, dict], steps: dict[str, dict]) -> list[dict]:
    """infer_v2_5's steps: the CAMPPlus style is the GPT's speaker conditioning, the
    prompt condition comes from the w2v-bert features directly (no quantize), and the
    codes are decoded by the 2.5 codec (``upsample_factor`` frames per code); the GPT's
    latents and s2mel's ``gpt_layer`` are not used."""
    gpt, s2, w2v, codec = configs["gpt"], configs["s2mel"], configs["w2v-bert"], configs["semantic-codec"]
    voc = configs["bigvgan"]
    h, ch, d = w2v["hidden_size"], s2["length_regulator_channels"], gpt["model_dim"]
    return [
        {**steps["semantic_features"], "upstream": "infer_v2_5.get_emb"},
        steps["reference_mel"],
        steps["style"],
        {"step": "prompt_condition", "file": "s2mel.safetensors", "upstream": "length_regulator(spk_cond_emb, ylens=[T_mel])[0]",
         "inputs": {"spk_cond_emb": f"[1, T_feat, {h}] (the semantic features themselves: infer_v2_5 does not quantize them)",
                    "ylens": "[1] = T_mel"},
         "outputs": {"prompt_condition": f"[1, T_mel, {ch}]"}},
        steps["emotion_vector"],
        {"step": "speech_conditioning", "file": "gpt.safetensors", "upstream": "gpt.spk_emb_proj(style) (inference_speech, campplus_embedding=style)",
         "inputs": {"style": f"[1, {gpt['speaker_embedding_dim']}] (the CAMPPlus style above)"},
         "outputs": {"conditioning": f"[1, 1, {d}]"}},
        {"step": "codes", "file": "gpt.safetensors",
         "upstream": "gpt.inference_speech(text_tokens, lang, emovec, style) (autoregressive sampling, inference.generation; "
                     "the prompt [conditioning + emovec, condition_zero_rows zero rows, the framed text + lang_embedding])",
         "inputs": {"text_tokens": "[1, T_text] ids of tokens.tokenizer.prompt", "lang": "[1] = tokens.tokenizer.language_id",
                    "conditioning": "as above", "emovec": "as above"},
         "outputs": {"codes": f"[1, T_codes] in [0, {gpt['number_mel_codes']}), cut at the first stop_mel_token"}},
        {"step": "code_features", "file": "semantic_codec.safetensors", "upstream": "semantic_codec.decode(codes)",
         "inputs": {"codes": "[1, T_codes]"},
         "outputs": {"S_infer": f"[1, {codec['upsample_factor']} * T_codes, {codec['hidden_size']}]"}},
        {"step": "target_condition", "file": "s2mel.safetensors",
         "upstream": "length_regulator(S_infer, ylens=[int(S_infer.shape[1] * 1.72 * duration_factor)])[0]",
         "outputs": {"cond": f"[1, T_target, {ch}]"}},
        steps["mel"],
        {**steps["waveform"], "upstream": "clamp(32767 * bigvgan(mel), -32767, 32767) (inference.output)",
         "outputs": {"wav": f"[1, 1, T_target * {_prod(voc['upsample_rates'])}] at {voc.get('sampling_rate', s2['sampling_rate'])} "
                            "Hz, PCM scale: clamped to [-32767, 32767]"}},
    ]


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


# ------------------------------------------------------------------ cross-file rules


def _rules():
    """(kinds, rule as canonical_schema.json "pipeline.cross_file_rules" states it, why,
    test(configs) -> (ok, the values shown when it fails))."""
    def eq(a_kind, a_key, b_kind, b_key, why):
        def test(c):
            a, b = c[a_kind][a_key], c[b_kind][b_key]
            return a == b, f"{a_kind} {a_key} = {a!r}, {b_kind} {b_key} = {b!r}"
        return (a_kind, b_kind), f"{a_kind} {a_key} == {b_kind} {b_key}", why, test

    def codes(c):
        g, q = c["gpt"], c["semantic-codec"]
        plain = set(range(g["number_mel_codes"])) - {g["start_mel_token"], g["stop_mel_token"]}
        ok = plain == set(range(q["codebook_size"]))
        return ok, (f"gpt number_mel_codes = {g['number_mel_codes']} (start {g['start_mel_token']}, stop {g['stop_mel_token']}), "
                    f"semantic-codec codebook_size = {q['codebook_size']}")

    def hop(c):
        v, s2 = c["bigvgan"], c["s2mel"]
        ok = s2["hop_length"] == v["hop_size"] == _prod(v["upsample_rates"])
        return ok, f"s2mel hop_length = {s2['hop_length']}, bigvgan hop_size = {v['hop_size']}, prod(upsample_rates) = {_prod(v['upsample_rates'])}"

    def speaker(c):
        cam, g = c["campplus"], c["gpt"]
        if "speaker_embedding_dim" not in g:
            return True, ""  # a 2.0 GPT: its speaker conditioning reads w2v-bert features, not the style
        return cam["embedding_size"] == g["speaker_embedding_dim"], \
            f"campplus embedding_size = {cam['embedding_size']!r}, gpt speaker_embedding_dim = {g['speaker_embedding_dim']!r}"

    return [
        eq("s2mel", "n_mels", "bigvgan", "num_mels", "the mel the DiT writes is the mel BigVGAN reads"),
        (("s2mel", "bigvgan"), "s2mel hop_length == bigvgan hop_size == prod(bigvgan upsample_rates)",
         "one mel frame is hop_length samples on both sides", hop),
        eq("s2mel", "sampling_rate", "bigvgan", "sampling_rate", "the mel and the waveform have one sample rate"),
        eq("campplus", "embedding_size", "s2mel", "style_dim", "the CAMPPlus style vector conditions the DiT"),
        eq("campplus", "embedding_size", "speaker-matrix", "style_dim", "the style vector is compared with the speaker matrix rows"),
        eq("speaker-matrix", "emo_num", "emotion-matrix", "emo_num", "the two matrices are grouped row for row"),
        eq("emotion-matrix", "model_dim", "gpt", "model_dim", "the emotion matrix rows are GPT emotion vectors"),
        (("gpt", "semantic-codec"), "gpt mel codes other than start/stop == range(semantic-codec codebook_size)",
         "every code the GPT writes is a codebook row for vq2emb", codes),
        eq("w2v-bert", "hidden_size", "semantic-codec", "hidden_size", "the semantic features are the codec's input"),
        (("campplus", "gpt"), "(2.5) campplus embedding_size == gpt speaker_embedding_dim",
         "the CAMPPlus style vector is the 2.5 GPT's speaker input (spk_emb_proj)", speaker),
    ]


RULES = [r[1] for r in _rules()]
# The models a release trains or ships itself: one family_version in a bundle (canonical_schema.json
# "families.bundle"); w2v-bert, BigVGAN and CAMPPlus are the same upstream models in both releases.
RELEASE_SPECIFIC = ("gpt", "semantic-codec", "s2mel", "speaker-matrix", "emotion-matrix")


def cross_file_problems(configs: dict[str, dict], files: dict[str, str], versions: dict[str, str] | None = None) -> list[str]:
    """Every rule whose files are all present and disagree, naming both files and values.
    ``configs`` and ``files`` map model kinds to metadata configs and file paths,
    ``versions`` to family versions (absent: the rule on them is not checked)."""
    errs = []
    seen = {k: v for k, v in (versions or {}).items() if k in RELEASE_SPECIFIC}
    if len(set(seen.values())) > 1:
        shown = ", ".join(f"{files[k]} is IndexTTS-{v}" for k, v in sorted(seen.items()))
        errs.append(f"the files are of different releases: {shown}; gpt, semantic-codec, s2mel, speaker-matrix and "
                    "emotion-matrix must have one family_version (each release trains its own)")
    for kinds, rule, what, test in _rules():
        if not all(k in configs for k in kinds):
            continue
        try:
            ok, shown = test(configs)
        except (KeyError, TypeError) as e:
            ok, shown = False, f"a config lacks {e}"
        if not ok:
            errs.append(f"{' and '.join(files[k] for k in kinds)} do not belong together: {shown}; the rule is {rule} ({what})")
    return errs
