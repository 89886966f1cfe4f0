"""Reference front ends (``reference/front_ends.py``) against the implementations that
upstream IndexTTS-2 (``infer_v2``) calls, on speech-like signals (harmonics of a gliding
f0 under a syllable envelope, plus noise), digital silence and clipping (runs at +-1), of
lengths from about one frame to 3 s, with the parameters as the manifest carries them
(``converters/release/pipeline.py``, through a JSON round trip).

The oracles:

- ``torchaudio.compliance.kaldi`` and ``torchaudio/functional/functional.py`` of the
  torchaudio 2.11.1 wheel, installed ``--no-deps`` beside the venv (the Makefile's .dev
  target; torchaudio has no build for our torch) and loaded as single files: ``kaldi.py``
  with an empty ``torchaudio`` module for its unused ``import torchaudio``,
  ``functional.py`` with empty ``torchaudio``/``torchaudio.functional`` packages and a
  ``filtering`` stub (the two biquads it imports are not used by resampling), each
  removed again after the load.  ``transforms.Resample`` is those two kernel functions
  (its forward returns the input itself for equal rates), so they are called directly;
- ``kaldi_native_fbank`` as an independent second Kaldi filterbank;
- transformers' ``SeamlessM4TFeatureExtractor`` (the demo's preprocessor_config.json, and
  the class defaults);
- ``indextts.s2mel.modules.audio.mel_spectrogram`` from indextts2-inference (its module
  caches are cleared before each call: they are keyed by rate and fmax only);
- ``librosa.load`` of WAV files written with soundfile (librosa calls soxr), and
  soundfile/stdlib ``wave`` for :func:`reference.front_ends.read_wav`.

Tolerance: ``max|diff| <= 1e-4 * max|oracle|`` (exact where the oracle is all zeros).
Measured: every primary oracle bit-identical; kaldi_native_fbank within 3.5e-5 of scale.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import struct
import sys
import types
import warnings
import wave

import numpy as np
import pytest
import torch

from converters.release import pipeline
from reference import front_ends as fe
from tests.helpers import ROOT

W2V = os.path.join(ROOT, "demo", "release", "w2v-bert-2.0")
# The rates a prompt file may come at, and the front ends' own.
RATES = (8000, 16000, 22050, 44100, 48000)
KINDS = ("speech", "silence", "clipped")


def manifest_json(value):
    """A value as a runtime reads it back from manifest.json."""
    return json.loads(json.dumps(value))


W2V_PARAMS = manifest_json(pipeline.seamless_params(W2V))
KALDI_PARAMS = manifest_json(pipeline.KALDI_FBANK)
RESAMPLING = manifest_json(pipeline.RESAMPLING)
# s2mel spect_params: IndexTTS-2's release, the demo's tiny one, infer_v2's fmax-is-not-"None"
# branch (8000) with a window shorter than the FFT, and a 44.1 kHz variant.
MEL_CONFIGS = {
    "release": dict(sampling_rate=22050, n_fft=1024, win_length=1024, hop_length=256, n_mels=80, fmin=0, fmax=None),
    "demo": dict(sampling_rate=22050, n_fft=32, win_length=32, hop_length=8, n_mels=8, fmin=0, fmax=None),
    "fmax8000": dict(sampling_rate=22050, n_fft=1024, win_length=800, hop_length=200, n_mels=80, fmin=50, fmax=8000),
    "44k": dict(sampling_rate=44100, n_fft=2048, win_length=2048, hop_length=512, n_mels=128, fmin=0, fmax=None),
}


def signal(kind: str, n: int, sr: int, seed: int = 0) -> torch.Tensor:
    return _signal(kind, n, sr, seed).clone()


@functools.lru_cache(maxsize=64)
def _signal(kind: str, n: int, sr: int, seed: int) -> torch.Tensor:
    """[1, n] float32: 'speech' (24 harmonics of an f0 gliding around 140 Hz, below
    Nyquist, under a 3 Hz syllable envelope, plus noise at -40 dB), 'silence' (zeros) or
    'clipped' (the speech at 6x, clipped to +-1: long runs at exactly +-1)."""
    if kind == "silence":
        return torch.zeros(1, n)
    rng = np.random.RandomState(seed)
    t = np.arange(n) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 1.3 * t + seed) + 20 * t
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum((0.6 / k) * np.sin(k * phase + k) for k in range(1, 25) if k * 200 < sr / 2)
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2) + 0.01 * rng.randn(n)
    x = np.clip(3.0 * x, -1, 1) if kind == "clipped" else 0.5 * x
    return torch.tensor(x, dtype=torch.float32)[None]


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """Assert the tolerance; the max |diff| relative to the oracle's scale."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, upstream {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, upstream {want.dtype}"
    diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert diff <= 1e-4 * scale, f"{what}: max |diff| {diff:.3g} > 1e-4 * max |upstream| {scale:.3g}"
    return diff / scale if scale else 0.0


# ------------------------------------------------------------------ oracles


def _side_torchaudio() -> str:
    for base in (sys.prefix, os.path.join(ROOT, ".venv")):
        path = os.path.join(base, "torchaudio-side", "torchaudio")
        if os.path.isdir(path):
            return path
    pytest.fail("torchaudio's files are not installed beside the venv: the Makefile's .dev target installs them "
                "(pip install --no-deps --target .venv/torchaudio-side torchaudio==2.11.1)")


def _load_alone(name: str, path: str, stubs: dict[str, types.ModuleType]):
    """Execute one source file as module ``name`` with ``stubs`` in sys.modules only
    while it loads (transformers and others probe for torchaudio; none must see one)."""
    from converters.cli.forward import stand_ins

    with stand_ins(stubs, also=(name,)):
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


@functools.cache
def torchaudio_kaldi():
    return _load_alone("_torchaudio_side_kaldi", os.path.join(_side_torchaudio(), "compliance", "kaldi.py"),
                       {"torchaudio": types.ModuleType("torchaudio")})


@functools.cache
def torchaudio_functional():
    pkg, sub = types.ModuleType("torchaudio"), types.ModuleType("torchaudio.functional")
    pkg.__path__, sub.__path__ = [], []
    filtering = types.ModuleType("torchaudio.functional.filtering")
    filtering.highpass_biquad = filtering.treble_biquad = None  # imported by functional.py, unused by resampling
    return _load_alone("torchaudio.functional.functional", os.path.join(_side_torchaudio(), "functional", "functional.py"),
                       {"torchaudio": pkg, "torchaudio.functional": sub, "torchaudio.functional.filtering": filtering})


def torchaudio_resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """``torchaudio.transforms.Resample(orig, new)(x)``: its __init__'s kernel (defaults
    sinc_interp_hann, width 6, rolloff 0.99, dtype None) and its forward."""
    if orig == new:
        return x
    f = torchaudio_functional()
    g = math.gcd(orig, new)
    kernel, width = f._get_sinc_resample_kernel(orig, new, g, 6, 0.99, "sinc_interp_hann", None, dtype=None)
    return f._apply_sinc_resample_kernel(x, orig, new, g, kernel, width)


def kaldi_oracle(x: torch.Tensor) -> torch.Tensor:
    """infer_v2: ``kaldi.fbank(audio_16k, num_mel_bins=80, dither=0, sample_frequency=16000)``, minus its mean."""
    feat = torchaudio_kaldi().fbank(x, num_mel_bins=80, dither=0, sample_frequency=16000)
    return feat - feat.mean(dim=0, keepdim=True)


def knf_oracle(x: torch.Tensor) -> torch.Tensor:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, x[0].tolist())
    fb.input_finished()
    feat = torch.tensor(np.array([fb.get_frame(i) for i in range(fb.num_frames_ready)]), dtype=torch.float32)
    return feat - feat.mean(dim=0, keepdim=True)


@functools.cache
def seamless(defaults: bool = False):
    from transformers import SeamlessM4TFeatureExtractor

    return SeamlessM4TFeatureExtractor() if defaults else SeamlessM4TFeatureExtractor.from_pretrained(W2V)


def seamless_oracle(x: torch.Tensor, defaults: bool = False):
    """infer_v2: ``extract_features(audio_16k, sampling_rate=16000, return_tensors="pt")``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's 0/0 for one frame
        out = seamless(defaults)(x, sampling_rate=16000, return_tensors="pt")
    return out["input_features"], out["attention_mask"]


def upstream_mel(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """infer_v2's mel_fn: ``mel_spectrogram(x, **mel_fn_args)`` with fmax None or 8000."""
    from converters.cli.forward import indextts

    audio = indextts("s2mel.modules.audio")
    audio.mel_basis.clear()
    audio.hann_window.clear()
    return audio.mel_spectrogram(x, cfg["n_fft"], cfg["n_mels"], cfg["sampling_rate"], cfg["hop_length"],
                                 cfg["win_length"], cfg["fmin"], cfg["fmax"], center=False)


def mel_params(cfg: dict) -> dict:
    return manifest_json(pipeline.mel_params(cfg))


# ------------------------------------------------------------------ resample (torchaudio.transforms.Resample)


@pytest.mark.parametrize("orig", RATES)
def test_resample_is_torchaudio_resample(orig):
    for new in (16000, 22050):
        for n in (1, 2, 7, 441, 4411, orig + 1) + ((3 * orig,) if orig == 22050 else (2 * orig - 1,)):
            for kind in KINDS if 441 < n < 2 * orig - 1 else ("speech",):
                x = signal(kind, n, orig, seed=n)
                close(fe.resample(x, orig, new, RESAMPLING["sinc"]), torchaudio_resample(x, orig, new),
                      f"resample {orig}->{new} {kind} n={n}")
    x = signal("speech", 1000, orig)
    assert fe.resample(x, orig, orig) is x  # Resample(sr, sr) returns its input
    assert fe.resample(x, orig, 16000).shape == fe.resample(x, orig, 16000, None).shape


def test_resample_refuses():
    x = signal("speech", 100, 16000)
    for args, needle in (((x, 0, 16000), "positive integers"), ((x, 16000.5, 8000), "positive integers"),
                         ((x.long(), 16000, 8000), "floating-point"),
                         ((x, 16000, 8000, {**RESAMPLING["sinc"], "method": "sinc_interp_kaiser"}), "not implemented")):
        with pytest.raises(ValueError, match=needle):
            fe.resample(*args)


# ------------------------------------------------------------------ campplus_fbank (torchaudio.compliance.kaldi.fbank)


@pytest.mark.parametrize("kind", KINDS)
def test_campplus_fbank_is_torchaudio_kaldi_fbank(kind):
    for n in (400, 401, 559, 560, 16000, 24001, 48000):
        x = signal(kind, n, 16000, seed=n)
        got = fe.campplus_fbank(x, KALDI_PARAMS)
        close(got, kaldi_oracle(x), f"campplus_fbank {kind} n={n}")
        if n in (400, 24001):
            close(got, knf_oracle(x), f"campplus_fbank vs kaldi-native-fbank {kind} n={n}")


def test_campplus_fbank_refuses():
    with pytest.raises(ValueError, match="less than one 400-sample frame"):
        fe.campplus_fbank(signal("speech", 399, 16000), KALDI_PARAMS)
    with pytest.raises(AssertionError):  # torchaudio refuses it too
        kaldi_oracle(signal("speech", 399, 16000))
    with pytest.raises(ValueError, match="mono"):
        fe.campplus_fbank(torch.zeros(2, 1000), KALDI_PARAMS)
    with pytest.raises(ValueError, match="dither"):
        fe.campplus_fbank(signal("speech", 1000, 16000), {**KALDI_PARAMS, "dither": 1.0})


# ------------------------------------------------------------------ w2v_bert_features (SeamlessM4TFeatureExtractor)


def test_w2v_bert_features_are_seamless_m4t():
    # (the oracles that import transformers or librosa run in as few tests as possible: one import per worker)
    for kind in KINDS:
        # 560: the fewest samples with 2 frames; 720: 3 frames, padded to 4 (the last stacked frame masked)
        for n in (560, 561, 719, 720, 881, 16000, 16160) + ((40001,) if kind == "speech" else ()):
            x = signal(kind, n, 16000, seed=n)
            feats, mask = fe.w2v_bert_features(x, W2V_PARAMS)
            want, want_mask = seamless_oracle(x)
            close(feats, want, f"w2v_bert_features {kind} n={n}")
            assert mask.dtype == torch.int64 and torch.equal(mask, want_mask.long()), f"attention_mask {kind} n={n}"
        x = signal(kind, 16160, 16000)  # class defaults (no preprocessor_config.json: padding_value 0.0)
        feats, mask = fe.w2v_bert_features(x, manifest_json(pipeline.seamless_params(None)))
        want, want_mask = seamless_oracle(x, defaults=True)
        close(feats, want, f"w2v_bert_features (class defaults) {kind}")
        assert torch.equal(mask, want_mask.long()) and mask[0, -1] == 0 and feats[0, -1, 80:].eq(0).all()
    # one frame: upstream's sample variance is 0/0 (NaN features); the reference refuses it
    assert seamless_oracle(signal("speech", 400, 16000))[0][0, 0, :80].isnan().all()


def test_w2v_bert_features_refuse_fewer_than_two_frames():
    for n in (100, 400, 559):
        with pytest.raises(ValueError, match="at least 2"):
            fe.w2v_bert_features(signal("speech", n, 16000), W2V_PARAMS)
    with pytest.raises(ValueError, match="mono"):
        fe.w2v_bert_features(torch.zeros(2, 1000), W2V_PARAMS)
    with pytest.raises(ValueError, match="window"):
        fe.w2v_bert_features(signal("speech", 1000, 16000), {**W2V_PARAMS, "window": "hamming"})


# ------------------------------------------------------------------ s2mel_mel (indextts mel_spectrogram)


def test_s2mel_mel_is_upstream_mel_spectrogram():
    for name, cfg in sorted(MEL_CONFIGS.items()):
        sr, pad = cfg["sampling_rate"], (cfg["n_fft"] - cfg["hop_length"]) // 2
        params = mel_params(cfg)
        assert params["fmax"] == (cfg["fmax"] if cfg["fmax"] is not None else "sampling_rate / 2")
        longest = 3 * sr + 1 if name == "release" else sr + 1
        for n in sorted({max(pad + 1, cfg["n_fft"] - 2 * pad), 1023, 4097, longest}):
            for kind in KINDS:
                x = signal(kind, n, sr, seed=n)
                close(fe.s2mel_mel(x, params), upstream_mel(x, cfg), f"s2mel_mel {name} {kind} n={n}")
    with pytest.raises(RuntimeError):  # too short for the reflect padding: torch refuses it upstream
        upstream_mel(signal("speech", 384, 22050), MEL_CONFIGS["release"])
    from librosa.filters import mel

    # the slaney filters alone, at the prompt rates too
    for sr, n_fft, n_mels, fmin, fmax in ((22050, 1024, 80, 0, None), (22050, 32, 8, 0, None), (16000, 512, 64, 20, 8000),
                                          (44100, 2048, 128, 0, None), (48000, 1024, 80, 30, 12000), (8000, 256, 40, 0, None)):
        want = mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        got = fe.slaney_mel_filters(sr, n_fft, n_mels, fmin, fmax).numpy()
        assert got.dtype == want.dtype and np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (sr, n_fft)


def test_s2mel_mel_refuses():
    params = mel_params(MEL_CONFIGS["release"])
    with pytest.raises(ValueError, match="too few"):
        fe.s2mel_mel(signal("speech", 384, 22050), params)
    with pytest.raises(ValueError, match="center"):
        fe.s2mel_mel(signal("speech", 4000, 22050), {**params, "center": True})


# ------------------------------------------------------------------ load_prompt and cut (librosa.load)


def write(path, kind, n, sr, channels=1, subtype="PCM_16", seed=0):
    import soundfile as sf

    x = np.stack([signal(kind if c == 0 else "clipped", n, sr, seed=seed + c)[0].numpy() for c in range(channels)], 1)
    sf.write(str(path), x, sr, subtype=subtype)
    return str(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # audioread, which librosa imports, imports aifc/audioop/sunau
def test_load_prompt_is_librosa_load(tmp_path):
    import librosa

    for sr, (n, channels, kind, subtype) in ((sr, case) for sr in RATES for case in (
            (1, 1, "speech", "PCM_16"), (3, 2, "speech", "FLOAT"), (sr // 100 + 1, 1, "speech", "PCM_16"),
            (sr + 7, 2, "speech", "PCM_16"), (2 * sr + 1, 1, "clipped", "PCM_24"), (sr, 1, "silence", "PCM_16"),
            (sr // 2, 3, "speech", "FLOAT"))):
        path = write(tmp_path / f"{sr}-{n}-{channels}.wav", kind, n, sr, channels, subtype, seed=n)
        samples, rate = fe.read_wav(path)
        assert rate == sr and samples.shape == (channels, n)
        for target in (RESAMPLING["prompt_load"]["speaker_prompt_hz"], RESAMPLING["prompt_load"]["emotion_prompt_hz"]):
            got = fe.load_prompt(samples, rate, target, RESAMPLING["prompt_load"])
            want = torch.tensor(librosa.load(path, sr=target)[0]).unsqueeze(0)  # infer_v2's torch.tensor(audio).unsqueeze(0)
            close(got, want, f"load_prompt {sr}->{target} {channels}ch {kind} n={n}")
            if channels == 1 and sr != target:  # soxr called as librosa calls it, then its length fix
                import soxr

                y = soxr.resample(samples[0], sr, target, quality="soxr_hq")
                m = math.ceil(n * target / sr)
                assert torch.equal(got[0, :min(m, len(y))], torch.from_numpy(y[:m]))


def test_load_prompt_and_cut():
    x = torch.rand(1, 22050 * 16 + 3, generator=torch.Generator().manual_seed(0)) - 0.5
    assert fe.cut(x, 15, 22050).shape == (1, 15 * 22050)  # _load_and_cut_audio: int(15 * sr)
    assert fe.cut(x[:, :100], 15, 22050).shape == (1, 100)
    assert fe.cut(x, 0.5, 16000).shape == (1, 8000)
    assert torch.equal(fe.load_prompt(x[0].numpy(), 22050, 22050), x)  # librosa.load at the file's rate: as read
    stereo = np.stack([x[0].numpy(), -x[0].numpy()])
    assert fe.load_prompt(stereo, 22050, 22050).abs().max() == 0  # the mean of the channels
    for bad, needle in ((np.array([1.0, np.nan], np.float32), "not finite"), (np.zeros((1, 0), np.float32), "n > 0"),
                        (np.zeros(10, np.int16), "floating point")):
        with pytest.raises(ValueError, match=needle):
            fe.load_prompt(bad, 16000, 22050)


def test_constants_are_the_manifests():
    """The defaults of load_prompt/resample are the manifest's values, and build() carries them."""
    assert {k: RESAMPLING["prompt_load"][k] for k in fe._PROMPT_LOAD} == fe._PROMPT_LOAD
    assert {k: RESAMPLING["sinc"][k] for k in fe._SINC} == fe._SINC
    for key in ("normalize_ddof", "normalize_epsilon", "pad_to_multiple_of"):
        assert key in W2V_PARAMS
    assert {"magnitude_epsilon", "log_clamp_min"} <= set(mel_params(MEL_CONFIGS["release"]))


# ------------------------------------------------------------------ read_wav


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_read_wav_is_soundfile(subtype, tmp_path):
    import soundfile as sf

    for channels, fmt in ((1, "WAV"), (2, "WAV"), (2, "WAVEX")):
        x = np.stack([signal("clipped", 4001, 16000, seed=c)[0].numpy() for c in range(channels)], 1)
        x[:7], x[7:14] = 1.0, -1.0  # full scale, and the most negative code
        path = str(tmp_path / f"{channels}-{fmt}.wav")
        sf.write(path, x, 16000, subtype=subtype, format=fmt)
        got, sr = fe.read_wav(path)
        want = sf.read(path, dtype="float32", always_2d=True)[0].T
        assert sr == 16000 and got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want), (subtype, channels, fmt)
        if subtype.startswith("PCM") and fmt == "WAV":  # the stdlib's reading, scaled
            with wave.open(path) as w:
                raw = w.readframes(w.getnframes())
                width = w.getsampwidth()
            if width == 3:
                b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int64)
                ints = ((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) ^ 0x800000) - 0x800000
            else:
                ints = np.frombuffer(raw, {1: np.uint8, 2: "<i2", 4: "<i4"}[width]).astype(np.int64)
            ints = ints - 128 if width == 1 else ints
            scaled = (ints.astype(np.float64) / 2.0 ** (8 * width - 1)).astype(np.float32)
            assert np.array_equal(got, scaled.reshape(-1, channels).T)


def _riff(*chunks: tuple[bytes, bytes], kind: bytes = b"RIFF") -> bytes:
    body = b"WAVE" + b"".join(cid + struct.pack("<I", len(d)) + d + b"\0" * (len(d) & 1) for cid, d in chunks)
    return kind + struct.pack("<I", len(body)) + body


def test_read_wav_refusals(tmp_path):
    import soundfile as sf

    pcm16 = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    cases = {
        "missing.wav": (None, "cannot be read"),
        "text.wav": (b"hello, this is not audio at all", "not a WAV file"),
        "short.wav": (b"RIFF", "not a WAV file"),
        "aiff.wav": (b"FORM\0\0\0\x10AIFFCOMM", "not a WAV file"),
        "rifx.wav": (_riff((b"fmt ", pcm16), (b"data", b"\0\0"), kind=b"RIFX"), "'RIFX' WAV files are not supported"),
        "nofmt.wav": (_riff((b"data", b"\0\0")), "no fmt chunk"),
        "nodata.wav": (_riff((b"fmt ", pcm16)), "no data chunk"),
        "badfmt.wav": (_riff((b"fmt ", pcm16[:10]), (b"data", b"\0\0")), "malformed"),
        "empty.wav": (_riff((b"fmt ", pcm16), (b"data", b"")), "no samples"),
        "halfframe.wav": (_riff((b"fmt ", pcm16), (b"data", b"\0")), "no samples"),
        "pcm12.wav": (_riff((b"fmt ", struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 12)), (b"data", b"\0\0")),
                      "unsupported WAV format (PCM, 12-bit)"),
        "float16.wav": (_riff((b"fmt ", struct.pack("<HHIIHH", 3, 1, 16000, 32000, 2, 16)), (b"data", b"\0\0")),
                        "unsupported WAV format (IEEE float, 16-bit)"),
        "nochannels.wav": (_riff((b"fmt ", struct.pack("<HHIIHH", 1, 0, 16000, 32000, 2, 16)), (b"data", b"\0\0")),
                           "0 channels"),
    }
    for subtype, needle in (("ALAW", "A-law"), ("ULAW", "mu-law"), ("IMA_ADPCM", "IMA ADPCM"), ("MS_ADPCM", "Microsoft ADPCM"),
                            ("GSM610", "GSM 6.10")):
        sf.write(str(tmp_path / f"{subtype}.wav"), np.zeros(1600), 16000, subtype=subtype)
        cases[f"{subtype}.wav"] = (None, f"unsupported WAV format ({needle}")
    sf.write(str(tmp_path / "rf64.wav"), np.zeros(100), 16000, format="RF64")
    cases["rf64.wav"] = (None, "'RF64' WAV files are not supported")
    wave_empty = tmp_path / "wave-empty.wav"
    with wave.open(str(wave_empty), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    cases["wave-empty.wav"] = (None, "no samples")
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            fe.read_wav(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg, (name, msg)


def test_read_wav_reads_odd_and_streamed_files(tmp_path):
    """Chunks before fmt, odd-sized chunks (padded), a RIFF size of 0 and a data size past
    the end (streamed or cut files: what is there), as libsndfile reads them."""
    import soundfile as sf

    pcm16 = struct.pack("<HHIIHH", 1, 2, 8000, 32000, 4, 16)
    frames = np.array([[1, -1], [32767, -32768], [100, 200]], "<i2")
    data = _riff((b"LIST", b"odd"), (b"fmt ", pcm16), (b"junk", b"x" * 5), (b"data", frames.tobytes()))
    data = data[:4] + b"\0\0\0\0" + data[8:]
    path = tmp_path / "odd.wav"
    path.write_bytes(data)
    got, sr = fe.read_wav(path)
    assert sr == 8000 and np.array_equal(got, frames.T.astype(np.float32) / 32768)
    assert np.array_equal(got, sf.read(str(path), dtype="float32", always_2d=True)[0].T)
    cut_file = tmp_path / "cut.wav"
    cut_file.write_bytes(data[:-3])  # the last frame incomplete
    got, _ = fe.read_wav(cut_file)
    assert got.shape == (2, 2)
