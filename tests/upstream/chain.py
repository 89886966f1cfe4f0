"""Tiny IndexTTS releases whose widths chain end to end (issue 24): text + a voice prompt
run through every model, from the release files, as upstream's inference runs them.

The demo releases (scripts/make_demo*.py) are tiny everywhere, so their files agree with
each other as ``check``'s cross-file rules ask, but upstream's inference cannot run on
them: infer_v2 and the model classes hard-code some widths.  Here those widths are at
their real values and everything else stays tiny:

- w2v-bert: ``hidden_size`` 1024 (the GPT's conformer encoders and ``emovec_layer`` take
  1024-wide features, the codec and the length regulator too) and exactly 17 layers
  (``get_emb`` reads ``hidden_states[17]``), 2 heads, intermediate size 8; input width
  160 (the real SeamlessM4T extractor: 80 bins, stride 2).  ~124M parameters, the cost
  of this fixture (0.5 GB of float32).
- 2.0 GPT: ``model_dim`` 1280, because s2mel's ``gpt_layer`` is hard-coded
  Linear(1280, 256), Linear(256, 128), Linear(128, 1024); 1 layer, 2 heads, perceiver
  feed-forward multiplier 0.01 (at 1280 a multiplier of 2 would be 13M parameters).
  The GPT-2 block itself (n_inner = 4 * 1280, not configurable) is ~20M.
- CAMPPlus at its real size (``CAMPPlus(feat_dim=80, embedding_size=192)`` is hard-coded
  in infer_v2 and infer_v2_5), so the s2mel style and the speaker matrix are 192 wide.
- s2mel: length regulator in_channels 1024, style dim 192, the released mel front end
  (22050 Hz, n_fft = win = 1024, hop 256), 8 mel bins; BigVGAN with the same mel
  settings and upsample rates (8, 8, 4) (product 256 = hop).
- semantic codec hidden size 1024 (the w2v-bert features are its input), 16 codes (the
  GPT's 18 mel codes less start/stop).
- Matrices: speaker [73, 192], emotion [73, model_dim], grouped by the released emo_num.

IndexTTS-2.5's GPT reads the CAMPPlus style (``spk_emb_proj`` = Linear(192, model_dim))
and no s2mel layer reads its latents, so its ``model_dim`` stays tiny (16); its codec is
1024 wide (the length regulator reads its output and the w2v-bert features alike) and
its text vocabulary covers the whole tiktoken encoding (the special tokens included),
since the language prefix ``<|en|>`` is one of them.

Every float is stored as float32: the converter folds weight norm and batch norm, and a
fold of rounded factors differs from a rounded fold by more than the end-to-end
comparison allows.  ``write_release`` writes the release folder in the layout
``convert.py all`` reads (2.0: the demo's; 2.5: upstream's first-run layout with
``hf_cache/``); ``write_prompt_wav`` a speech-like prompt.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import random
import struct
import wave

import torch
import yaml

from . import (bigvgan, campplus, gpt, gpt25, qwen_emotion, s2mel, semantic_codec, semantic_codec25, speaker_matrix,
               tokenizer, w2v_bert)

SAMPLE_RATE = 22050
W2V_HIDDEN = 1024  # gpt.model_v2: ConformerEncoder(input_size=1024), emovec_layer = Linear(1024, model_dim)
W2V_LAYER = 17  # infer_v2.get_emb: hidden_states[17]
GPT_DIM_2_0 = 1280  # s2mel commons.MyModel: gpt_layer = Linear(1280, 256), Linear(256, 128), Linear(128, 1024)
STYLE = 192  # infer_v2: CAMPPlus(feat_dim=80, embedding_size=192)
N_MELS = 8
HOP = 256

W2V = {
    **w2v_bert.TINY,
    "hidden_size": W2V_HIDDEN,
    "num_hidden_layers": W2V_LAYER,
    "num_attention_heads": 2,
    "intermediate_size": 8,
    "feature_projection_input_dim": 160,  # SeamlessM4TFeatureExtractor: 80 bins x stride 2
    "left_max_position_embeddings": 64,  # w2v-bert-2.0's
    "right_max_position_embeddings": 8,
    "conv_depthwise_kernel_size": 5,
}

GPT_2_0 = gpt.config(
    model_dim=GPT_DIM_2_0, layers=1, heads=2, max_mel_tokens=32, max_text_tokens=16,
    condition_module={"output_size": 8, "linear_units": 16, "attention_heads": 2, "num_blocks": 1,
                      "input_layer": "conv2d2", "perceiver_mult": 0.01},
    emo_condition_module={"output_size": 4, "linear_units": 12, "attention_heads": 1, "num_blocks": 1,
                          "input_layer": "conv2d2", "perceiver_mult": 0.01},
)

SPECT = {"n_fft": 1024, "win_length": 1024, "hop_length": HOP, "n_mels": N_MELS, "fmin": 0, "fmax": "None"}


def s2mel_config() -> dict:
    cfg = s2mel.variant(in_channels=N_MELS)
    cfg["preprocess_params"] = {"sr": SAMPLE_RATE, "spect_params": dict(SPECT)}
    cfg["style_encoder"]["dim"] = STYLE
    cfg["length_regulator"]["in_channels"] = W2V_HIDDEN
    return cfg


BIGVGAN = {
    **bigvgan.TINY,
    "num_mels": N_MELS,
    "upsample_rates": [8, 8, 4],
    "upsample_kernel_sizes": [16, 16, 8],
    "upsample_initial_channel": 16,
    "hop_size": HOP,
    "n_fft": SPECT["n_fft"],
    "win_size": SPECT["win_length"],
    "fmin": 0,
    "fmax": None,
    "sampling_rate": SAMPLE_RATE,
}

# Two nudges to the random weights, so that the end-to-end run is a meaningful comparison:
# the stop code's logit is lowered a little (the 2.0 GPT then writes 10 codes and stops, so
# a run with max_codes=12 ends at the stop code, not at the cap), and BigVGAN's last conv
# (no bias) is scaled down: at random weights its output is ~750 wide, so the clamp to
# [-1, 1] would leave nothing but +-1 samples to compare.
STOP_LOGIT_SHIFT = -1.5
BIGVGAN_OUTPUT_SCALE = 3e-4

CODEC_2_0 = {**semantic_codec.TINY, "hidden_size": W2V_HIDDEN, "codebook_size": 16}
CODEC_2_5 = {**semantic_codec25.TINY, "hidden_size": W2V_HIDDEN, "codebook_size": 16}

# The released keys that name files, as scripts/make_demo.py writes them.
FILES = {"gpt_checkpoint": "gpt.pth", "s2mel_checkpoint": "s2mel.pth", "w2v_stat": "wav2vec2bert_stats.pt"}
SEED_OFFSETS = {"gpt": 0, "s2mel": 1, "w2v": 2, "stats": 3, "bigvgan": 4, "codec": 5, "campplus": 6, "spk": 7, "emo": 8}


def _seed(seed: int, part: str) -> int:
    return 1000 * seed + SEED_OFFSETS[part]


def write_bpe(release_dir: str, vocab: int, name: str = "bpe.model") -> str:
    """bpe.model: a SentencePiece BPE trained on tests/upstream/tokenizer.py's words in
    upper case.  infer_v2's TextTokenizer upper-cases the text (tokenize_by_CJK_char)
    before SentencePiece, so a model trained on lower-case words would turn every
    letter into <unk>, which inference_speech then drops (ids 0 and 1 are
    start/stop_text_token)."""
    import sentencepiece as spm

    words = [w.upper() for w in tokenizer.WORDS]
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab,
                                   model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2,
                                   normalization_rule_name="identity")
    path = os.path.join(release_dir, name)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _no_init():
    """transformers' ``no_init_weights``: the modules' own random initialisation (torch's
    and transformers') is skipped.  The builders overwrite every parameter with their own
    seeded draws anyway; skipping the ~150M draws they would overwrite saves seconds
    (the values differ from the same builder without it, deterministically)."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _gpt(builder, cfg: dict, seed: int):
    with _no_init():
        m = builder.build(cfg, seed=_seed(seed, "gpt"))
    with torch.no_grad():
        m.mel_head.bias[cfg["stop_mel_token"]] += STOP_LOGIT_SHIFT
    return m


def _bigvgan(folder: str, seed: int) -> None:
    m = bigvgan.build(BIGVGAN, seed=_seed(seed, "bigvgan"))
    with torch.no_grad():
        m.conv_post.weight_g.mul_(BIGVGAN_OUTPUT_SCALE)
    bigvgan.save_release(m, folder, BIGVGAN)


def _save_w2v(folder: str, seed: int, w2v_from: str | None = None) -> None:
    if w2v_from is not None:  # the same model, written by an earlier write_release with this seed: linked
        os.makedirs(folder)
        for n in sorted(os.listdir(w2v_from)):
            try:
                os.link(os.path.join(w2v_from, n), os.path.join(folder, n))
            except OSError:  # another filesystem
                import shutil

                shutil.copyfile(os.path.join(w2v_from, n), os.path.join(folder, n))
        return
    with _no_init():
        m = w2v_bert.build(W2V, seed=_seed(seed, "w2v"))
    w2v_bert.save_plain(m, folder)
    w2v_bert.save_preprocessor(folder)
    del m


def _save_s2mel(path: str, seed: int, cfg: dict, layout: str) -> None:
    m = s2mel.build(cfg, seed=_seed(seed, "s2mel"))
    if layout == "training":  # 2.0: the training checkpoint, a DDP ``module.`` prefix on length_regulator
        s2mel.save_training_checkpoint(m, path)
    else:  # 2.5: {"net": ...}, parameters only
        torch.save({"net": s2mel.net(m)}, path)


def _matrices(release_dir: str, seed: int, model_dim: int) -> None:
    n = sum(speaker_matrix.EMO_NUM)
    torch.save(speaker_matrix.build(n, STYLE, seed=_seed(seed, "spk")), os.path.join(release_dir, "feat1.pt"))
    torch.save(speaker_matrix.build(n, model_dim, seed=_seed(seed, "emo")), os.path.join(release_dir, "feat2.pt"))


def config_2_0() -> dict:
    return {
        "dataset": {"bpe_model": "bpe.model"},
        "gpt": copy.deepcopy(GPT_2_0),
        "semantic_codec": dict(CODEC_2_0),
        "s2mel": s2mel_config(),
        **FILES,
        **speaker_matrix.demo_config(),
        **qwen_emotion.demo_config(),
        "vocoder": {"type": "bigvgan", "name": "bigvgan"},  # the release's own bigvgan/ folder (as the demo)
        "version": 2.0,
    }


def config_2_5(number_text_tokens: int) -> dict:
    g = gpt25.config(model_dim=16, layers=1, heads=2, max_mel_tokens=32, max_text_tokens=16,
                     number_text_tokens=number_text_tokens,
                     emo_condition_module=copy.deepcopy(GPT_2_0["emo_condition_module"]))
    return {
        "dataset": {"bpe_model": "bpe.model"},  # as the released 2.5 config; infer_v2_5 never reads it
        "gpt": g,
        "semantic_codec": dict(CODEC_2_5),
        "s2mel": s2mel_config(),
        **FILES,  # relative: infer_v2_5 joins them to model_dir (the released config's absolute paths would not load)
        **speaker_matrix.demo_config(),
        **qwen_emotion.demo_config(),
        "vocoder": {"type": "bigvgan", "name": "bigvgan_generator.pt"},  # as released; infer_v2_5 ignores it
        "version": 2.0,  # as released (the files say 2.5)
    }


def _write_config(release_dir: str, config: dict, version: str) -> None:
    with open(os.path.join(release_dir, "config.yaml"), "w") as f:
        f.write(f"# Tiny IndexTTS-{version} release whose widths chain end to end (tests/upstream/chain.py).\n")
        yaml.safe_dump(config, f, sort_keys=False)


def tiktoken_vocab(release_dir: str) -> int:
    """The size of upstream's 2.5 text encoding on the release's tiktoken file (the
    ranks plus the special tokens get_encoding appends)."""
    from converters.cli.forward import indextts25

    enc = indextts25("utils.tokenizer").get_encoding.__wrapped__(
        "multilingual_zh_ja_yue_char_del", model_dir=release_dir)
    return enc.n_vocab


def write_release(folder, version: str = "2.0", seed: int = 0, w2v_from: str | None = None) -> str:
    """A complete release folder that ``convert.py all --src folder`` converts and
    upstream's inference loads (tests/upstream/e2e.py).  ``w2v_from``: the w2v-bert
    folder of a release written before with the same ``seed`` (either version: both
    write the same model), whose files are linked instead of building and saving the
    0.5 GB model again (see :func:`w2v_folder`)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    if version == "2.0":
        cfg = config_2_0()
        _write_config(folder, cfg, version)
        m = _gpt(gpt, cfg["gpt"], seed)
        torch.save(gpt.release_state_dict(m), os.path.join(folder, "gpt.pth"))
        del m
        _save_s2mel(os.path.join(folder, "s2mel.pth"), seed, cfg["s2mel"], "training")
        _save_w2v(os.path.join(folder, "w2v-bert-2.0"), seed, w2v_from)
        semantic_codec.save_release(semantic_codec.build(cfg["semantic_codec"], seed=_seed(seed, "codec")),
                                    os.path.join(folder, "MaskGCT"), write_config=False)
        campplus.save_release(campplus.build(campplus.REAL, seed=_seed(seed, "campplus")), os.path.join(folder, "campplus"))
        _bigvgan(os.path.join(folder, "bigvgan"), seed)
        write_bpe(folder, cfg["gpt"]["number_text_tokens"])
        model_dim = cfg["gpt"]["model_dim"]
    elif version == "2.5":
        tokenizer.write_tiktoken(folder)
        cfg = config_2_5(tiktoken_vocab(folder))
        _write_config(folder, cfg, version)
        m = _gpt(gpt25, cfg["gpt"], seed)
        torch.save(gpt25.release_state_dict(m), os.path.join(folder, "gpt.pth"))
        del m
        _save_s2mel(os.path.join(folder, "s2mel.pth"), seed, cfg["s2mel"], "net")
        semantic_codec25.save_release(semantic_codec25.build(cfg["semantic_codec"], seed=_seed(seed, "codec")), folder,
                                      write_config=False)
        cache = os.path.join(folder, "hf_cache")
        _save_w2v(os.path.join(cache, "w2v-bert-2.0"), seed, w2v_from)
        campplus.save_release(campplus.build(campplus.REAL, seed=_seed(seed, "campplus")), cache)
        _bigvgan(os.path.join(cache, "bigvgan"), seed)
        model_dim = cfg["gpt"]["model_dim"]
    else:
        raise ValueError(f"version {version!r}: 2.0 or 2.5")
    w2v_bert.write_stats(os.path.join(folder, FILES["w2v_stat"]), w2v_bert.stats(W2V_HIDDEN, seed=_seed(seed, "stats")))
    _matrices(folder, seed, model_dim)
    qwen_emotion.write_demo(folder, cfg)
    return folder


def w2v_folder(release_dir, version: str) -> str:
    """Where write_release puts the w2v-bert model of a ``version`` release."""
    return os.path.join(str(release_dir), *(("hf_cache",) if version == "2.5" else ()), "w2v-bert-2.0")


# ------------------------------------------------------------------ prompts


def prompt_samples(seconds: float = 1.6, seed: int = 0, sr: int = SAMPLE_RATE) -> list[float]:
    """A speech-like signal in [-1, 1]: a few 'syllables' (raised-cosine envelopes) of a
    harmonic voice whose pitch glides around 110-220 Hz, with formant-like harmonic
    weights, a little breath noise and short pauses; seeded, pure Python (computed once
    per process for each set of arguments: ~0.4 s a call)."""
    return list(_prompt_samples(seconds, seed, sr))


@functools.lru_cache(maxsize=16)
def _prompt_samples(seconds: float, seed: int, sr: int) -> tuple[float, ...]:
    rng = random.Random(seed)
    n = int(seconds * sr)
    out = [0.0] * n
    t0 = int(0.05 * sr)
    phase = 0.0
    while t0 < n:
        length = int(rng.uniform(0.12, 0.25) * sr)
        f_start, f_end = rng.uniform(110, 220), rng.uniform(110, 220)
        formants = (rng.uniform(300, 900), rng.uniform(900, 2500))
        amp = rng.uniform(0.25, 0.6)
        for i in range(min(length, n - t0)):
            x = i / length
            f0 = f_start + (f_end - f_start) * x
            phase += 2 * math.pi * f0 / sr
            env = 0.5 - 0.5 * math.cos(2 * math.pi * x)
            v = 0.0
            for h in range(1, 12):
                fh = h * f0
                w = sum(math.exp(-((fh - fm) / 250.0) ** 2) for fm in formants) + 0.05
                v += w * math.sin(h * phase) / h
            out[t0 + i] = amp * env * (0.35 * v + 0.02 * rng.gauss(0, 1))
        t0 += length + int(rng.uniform(0.02, 0.08) * sr)
    peak = max(abs(v) for v in out) or 1.0
    return tuple(0.9 * v / peak for v in out)


def write_prompt_wav(path, seconds: float = 1.6, seed: int = 0, sr: int = SAMPLE_RATE) -> str:
    """``prompt_samples`` as a mono 16-bit PCM WAV (stdlib ``wave``)."""
    samples = prompt_samples(seconds, seed, sr)
    pcm = struct.pack(f"<{len(samples)}h", *(max(-32768, min(32767, round(v * 32767))) for v in samples))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm)
    return str(path)
