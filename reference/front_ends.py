"""The audio front ends of IndexTTS-2's ``infer_v2``, configured from the bundle alone.

Every number comes from ``manifest.json`` ``pipeline.front_ends`` (built by
``converters/release/pipeline.py``; ``canonical_schema.json`` "pipeline" documents the keys):
the ``params`` of each function, ``front_ends.resampling.prompt_load`` and ``.sinc`` for
:func:`load_prompt` and :func:`resample` (whose defaults are those values; a test keeps
them equal).  What the manifest names is implemented by its name: the povey window (the
symmetric hann ** 0.85), the kaldi mel scale (1127 ln(1 + f / 700)), the slaney mel scale
and normalisation; a name this module does not implement (another window or mel scale,
``center=True``, dither, energy) is refused rather than approximated.  Plain torch, with
numpy where upstream computes a small table or a statistic in numpy (so the
float64/float32 steps are upstream's), and the ``soxr`` package for librosa's resampling
(imported only when a prompt's rate differs).

What each function reproduces (the upstream call as ``infer_v2`` makes it):

- :func:`read_wav`: what ``soundfile`` (libsndfile) gives ``librosa.load`` for a WAV file,
  read as float32: PCM 8-bit (unsigned; ``(u - 128) / 128``), 16, 24 and 32-bit
  (``x / 2**(bits - 1)``, the 32-bit integer rounded to float32 first), IEEE float 32 and
  64-bit (as stored; 64-bit rounded to float32), in a plain RIFF file or
  WAVE_FORMAT_EXTENSIBLE.  A stdlib RIFF reader (``struct``): Python 3.11's ``wave``
  refuses IEEE float and WAVE_FORMAT_EXTENSIBLE.  Deviation: libsndfile also decodes
  A-law, mu-law and ADPCM WAVs and RF64/RIFX files; these are refused by name.
- :func:`load_prompt`: ``librosa.load(path, sr=target_sr)`` after the decoding: the mean of
  the channels (``librosa.to_mono``, on the same interleaved layout, so the float32 sums
  are numpy's), then, when the rate differs, ``soxr.resample(..., quality="soxr_hq")`` cut
  or zero-padded to ``ceil(n * target_sr / sr)`` samples (``librosa.util.fix_length``).
  Bit-identical.  :func:`cut` is ``_load_and_cut_audio``'s cut to ``int(seconds * sr)``.
- :func:`resample`: ``torchaudio.transforms.Resample(orig, new)`` (sinc_interp_hann,
  lowpass_filter_width 6, rolloff 0.99, gcd-reduced rates; the input itself when the
  rates are equal).  The kernel is computed as torchaudio computes it; bit-identical.
- :func:`w2v_bert_features`: ``SeamlessM4TFeatureExtractor(audio_16k, sampling_rate=16000,
  return_tensors="pt")`` for one utterance: the Kaldi-style povey filterbank in float64
  on ``audio * 2**15`` (each frame's FFT rounded to complex64, as the extractor stores
  it), natural log, float32; per-bin normalisation with the sample variance (numpy's
  float32 mean and var, as upstream); padding with ``padding_value`` to a multiple of
  ``pad_to_multiple_of`` frames; stride stacking; the mask of each stacked frame is that
  of its second frame.  Deviations: the attention mask is int64 (upstream's is int32,
  same values); fewer than 2 frames (under 560 samples at 16 kHz) are refused, where
  upstream returns NaN features (1 frame: the sample variance is 0/0) or fails (none).
- :func:`campplus_fbank`: ``torchaudio.compliance.kaldi.fbank(audio_16k, num_mel_bins=80,
  dither=0, sample_frequency=16000)`` then ``feat - feat.mean(dim=0, keepdim=True)``:
  float32 throughout, the same torch operations; bit-identical.  Under one frame (400
  samples) is refused (torchaudio asserts).
- :func:`s2mel_mel`: ``indextts.s2mel.modules.audio.mel_spectrogram(x, n_fft, num_mels,
  sampling_rate, hop_size, win_size, fmin, fmax, center=False)`` with infer_v2's fmax
  (None, written ``"sampling_rate / 2"`` in the manifest, or a number); the slaney mel
  filters computed as ``librosa.filters.mel`` computes them (float64, rounded to float32
  before the slaney normalisation); bit-identical.  An input too short for the reflect
  padding or for one frame is refused (torch raises).

Measured on CPU against those implementations (tests/test_front_ends.py: speech-like
signals, digital silence and clipping, from about one frame to 3 s, prompt files at 8 to
48 kHz): every output bit-identical.  On another device the torch steps run there (as
upstream runs them: campplus_fbank and s2mel_mel on the model's device, the w2v-bert
features on the host), so they agree to that device's float32 rounding instead.
"""

from __future__ import annotations

import functools
import math
import os
import struct

import numpy as np
import torch

# ------------------------------------------------------------------ WAV files

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
# The tail of the KSDATAFORMAT_SUBTYPE GUIDs of WAVE_FORMAT_EXTENSIBLE (after the format tag).
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_FORMAT_NAMES = {0x0002: "Microsoft ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM",
                 0x0031: "GSM 6.10", 0x0050: "MPEG", 0x0055: "MPEG layer 3"}


def read_wav(path) -> tuple[np.ndarray, int]:
    """``(samples float32 [channels, n], sample_rate)`` of a WAV file, scaled as
    libsndfile reads it as float32.  ``ValueError`` naming the file for a file that
    cannot be read, is not a WAV, holds no samples, or is in a format not supported."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{name}: cannot be read ({e.strerror or e})") from None
    if len(data) < 12 or data[8:12] != b"WAVE":
        raise ValueError(f"{name}: not a WAV file (no RIFF/WAVE header)")
    if data[:4] != b"RIFF":
        kind = data[:4].decode("latin-1")
        raise ValueError(f"{name}: {kind!r} WAV files are not supported (only little-endian RIFF)")
    fmt, body, size = None, None, 0
    pos = 12
    while pos + 8 <= len(data):  # the RIFF size field is not trusted (streamed files leave it 0 or wrong)
        cid = data[pos:pos + 4]
        n = struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt " and fmt is None:
            fmt = data[pos + 8:pos + 8 + n]
        elif cid == b"data" and body is None:
            body, size = pos + 8, min(n, len(data) - pos - 8)  # a truncated file: what is there
            if fmt is not None:
                break
        pos += 8 + n + (n & 1)
    if fmt is None:
        raise ValueError(f"{name}: not a WAV file (no fmt chunk)")
    if body is None:
        raise ValueError(f"{name}: no data chunk")
    if len(fmt) < 16:
        raise ValueError(f"{name}: malformed WAV fmt chunk ({len(fmt)} bytes)")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE:
        if len(fmt) < 40 or fmt[26:40] != _GUID_TAIL:
            raise ValueError(f"{name}: unsupported WAV format (WAVE_FORMAT_EXTENSIBLE with an unknown sub-format)")
        tag = struct.unpack_from("<H", fmt, 24)[0]
    ok = (tag == _PCM and bits in (8, 16, 24, 32)) or (tag == _FLOAT and bits in (32, 64))
    if not ok:
        what = ("PCM" if tag == _PCM else "IEEE float" if tag == _FLOAT else
                _FORMAT_NAMES.get(tag, f"format tag 0x{tag:04x}"))
        raise ValueError(f"{name}: unsupported WAV format ({what}, {bits}-bit); "
                         "supported: PCM 8/16/24/32-bit and IEEE float 32/64-bit")
    if channels == 0 or rate == 0:
        raise ValueError(f"{name}: unsupported WAV format ({channels} channels at {rate} Hz)")
    width = bits // 8
    frames = size // (width * channels)
    if frames == 0:
        raise ValueError(f"{name}: no samples")
    raw = np.frombuffer(data, dtype=np.uint8, count=frames * width * channels, offset=body)
    if tag == _FLOAT:
        x = raw.view("<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:
        x = (raw.astype(np.float32) - np.float32(128)) * np.float32(1 / 128)
    elif bits == 16:
        x = raw.view("<i2").astype(np.float32) * np.float32(2.0 ** -15)
    elif bits == 24:
        b = raw.reshape(-1, 3).astype(np.uint32)
        v = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).view(np.int32)  # libsndfile's left-justified int32
        x = v.astype(np.float32) * np.float32(2.0 ** -31)
    else:
        x = raw.view("<i4").astype(np.float32) * np.float32(2.0 ** -31)
    # [channels, n]: a view of the interleaved frames, the layout soundfile gives librosa (.T).
    return x.reshape(frames, channels).T, rate


# ------------------------------------------------------------------ prompt loading (librosa.load)

_PROMPT_LOAD = {"soxr_quality": "soxr_hq", "mono": "mean over the channels (librosa.to_mono)"}
_SINC = {"method": "sinc_interp_hann", "lowpass_filter_width": 6, "rolloff": 0.99}


def load_prompt(samples, sr: int, target_sr: int, params: dict | None = None) -> torch.Tensor:
    """``librosa.load(path, sr=target_sr)`` as ``infer_v2`` gets it, given the decoded
    ``samples`` ([channels, n] or [n], as :func:`read_wav` returns) at ``sr``: float32
    ``[1, n']``.  ``params`` is ``front_ends.resampling.prompt_load`` (its values are the
    defaults here; tests/test_front_ends.py checks that they are the manifest's)."""
    p = {**_PROMPT_LOAD, **(params or {})}
    y = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    if y.ndim not in (1, 2) or y.shape[-1] == 0 or (y.ndim == 2 and y.shape[0] == 0):
        raise ValueError(f"load_prompt: expected samples [channels, n] with n > 0, got shape {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.floating):
        raise ValueError(f"load_prompt: samples must be floating point, got {y.dtype}")
    y = y.astype(np.float32, copy=False)
    if not np.isfinite(y).all():
        raise ValueError("load_prompt: the audio is not finite everywhere (librosa refuses it too)")
    if y.ndim == 2:
        if y.shape[0] == 1:
            y = y[0]
        else:
            # librosa.to_mono: np.mean over the channel axis of soundfile's [n, channels] read, transposed.
            y = np.ascontiguousarray(y.T).T.mean(axis=0)
    if sr != target_sr:
        import soxr

        n_out = int(np.ceil(y.shape[-1] * (float(target_sr) / sr)))
        y = soxr.resample(np.ascontiguousarray(y), sr, target_sr, quality=p["soxr_quality"])
        y = y[:n_out] if len(y) >= n_out else np.pad(y, (0, n_out - len(y)))
        y = np.asarray(y, dtype=np.float32)
    return torch.from_numpy(np.array(y, dtype=np.float32)).unsqueeze(0)


def cut(audio: torch.Tensor, seconds: float, sr: int) -> torch.Tensor:
    """``_load_and_cut_audio``'s cut: the first ``int(seconds * sr)`` samples of ``[1, n]``
    audio (``seconds`` is ``pipeline.inference.max_reference_audio_s``)."""
    n = int(seconds * sr)
    return audio[:, :n] if audio.shape[1] > n else audio


# ------------------------------------------------------------------ torchaudio.transforms.Resample


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """The windowed-sinc polyphase kernel [new, 1, 2 * width + orig] for gcd-reduced
    rates, in torchaudio's float64 arithmetic (the phase offsets j / new in float32, as
    its integer arange divided), cast to float32."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    phases = torch.arange(0, -new, -1)[:, None, None] / new  # float32
    t = (phases + taps) * cutoff
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    k = torch.where(t == 0, torch.tensor(1.0, dtype=t.dtype), t.sin() / t)
    k = k * (window * (cutoff / orig))
    return k.to(torch.float32), width


def resample(x: torch.Tensor, orig_sr: int, new_sr: int, params: dict | None = None) -> torch.Tensor:
    """``torchaudio.transforms.Resample(orig_sr, new_sr)(x)`` for float ``x [..., n]``.
    ``params`` is ``front_ends.resampling.sinc`` (its values are the defaults here)."""
    p = {**_SINC, **(params or {})}
    if p["method"] != "sinc_interp_hann":
        raise ValueError(f"resample: method {p['method']!r} is not implemented (sinc_interp_hann is)")
    if orig_sr <= 0 or new_sr <= 0 or int(orig_sr) != orig_sr or int(new_sr) != new_sr:
        raise ValueError(f"resample: rates must be positive integers, got {orig_sr} and {new_sr}")
    if orig_sr == new_sr:
        return x
    if not x.is_floating_point():
        raise ValueError(f"resample: expected floating-point audio, got {x.dtype}")
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, int(p["lowpass_filter_width"]), float(p["rolloff"]))
    shape = x.shape
    n = shape[-1]
    flat = torch.nn.functional.pad(x.reshape(-1, n), (width, width + orig))
    y = torch.nn.functional.conv1d(flat[:, None], kernel.to(device=x.device, dtype=x.dtype), stride=orig)
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)
    keep = int(np.ceil(np.float32(new * n / orig)))
    return y[..., :keep].reshape(shape[:-1] + (min(keep, y.shape[-1]),))


# ------------------------------------------------------------------ shared helpers


def _one_row(audio, what: str) -> torch.Tensor:
    x = audio if isinstance(audio, torch.Tensor) else torch.as_tensor(np.asarray(audio))
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"{what}: expected mono audio [1, n], got shape {tuple(audio.shape)}")
    return x.to(torch.float32)


def _need(params: dict, key: str, want, what: str):
    if params[key] != want:
        raise ValueError(f"{what}: {key} = {params[key]!r} is not implemented (the reference implements {want!r})")


def _nyquist(value, sr):
    return sr / 2 if value == "sampling_rate / 2" else float(value)


# ------------------------------------------------------------------ SeamlessM4TFeatureExtractor


@functools.lru_cache(maxsize=4)
def _kaldi_mel_filters_f64(n_bins: int, n_mels: int, fmin: float, fmax: float, sr: int) -> np.ndarray:
    """Triangles in kaldi-mel space (1127 ln(1 + f / 700)), no normalisation, float64
    [n_bins, n_mels]: transformers' mel_filter_bank(..., mel_scale="kaldi",
    triangularize_in_mel_space=True)."""
    def mel(f):
        return 1127.0 * np.log(1.0 + (f / 700.0))

    edges = np.linspace(mel(fmin), mel(fmax), n_mels + 2)
    bin_mels = mel(sr / ((n_bins - 1) * 2) * np.arange(n_bins))
    widths = np.diff(edges)
    rel = np.expand_dims(edges, 0) - np.expand_dims(bin_mels, 1)
    rising = -rel[:, :-2] / widths[:-1]
    falling = rel[:, 2:] / widths[1:]
    return np.maximum(np.zeros(1), np.minimum(rising, falling))


@functools.lru_cache(maxsize=4)
def _povey_f64(n: int) -> np.ndarray:
    return np.power(np.hanning(n), 0.85)  # Kaldi's povey window: the symmetric hann ** 0.85


def w2v_bert_features(audio_16k, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_features float32 [1, T, num_mel_bins * stride], attention_mask int64 [1, T])``
    of one 16 kHz utterance, as ``SeamlessM4TFeatureExtractor`` returns them.  ``params``
    is ``front_ends.w2v_bert_features``."""
    what = "w2v_bert_features"
    p = params
    for key, want in (("window", "povey"), ("mel_scale", "kaldi"), ("mel_norm", None), ("log", "natural"),
                      ("center", False), ("power", 2.0), ("remove_dc_offset", True)):
        _need(p, key, want, what)
    x = _one_row(audio_16k, what)
    device, x = x.device, x.cpu()  # the extractor computes in numpy on the host; infer_v2 moves its output
    frame, hop, n_fft = int(p["frame_length"]), int(p["hop_length"]), int(p["fft_length"])
    n_mels, stride, sr = int(p["num_mel_bins"]), int(p["stride"]), int(p["sampling_rate"])
    n = x.shape[0]
    t_frames = 1 + (n - frame) // hop if n >= frame else 0
    if t_frames < 2:
        raise ValueError(f"{what}: {n} samples give {t_frames} frame(s); the per-bin normalisation needs at least 2 "
                         f"({frame + hop} samples at {sr} Hz; upstream returns NaN features for one frame)")
    wav = x.to(torch.float64) * float(p["waveform_scale"])
    frames = wav.unfold(0, frame, hop)  # [T, frame]
    frames = frames - frames.mean(dim=1, keepdim=True)
    a = float(p["preemphasis"])
    frames = torch.cat([frames[:, :1] * (1 - a), frames[:, 1:] - a * frames[:, :-1]], dim=1)
    frames = frames * torch.from_numpy(_povey_f64(frame))
    spec = torch.fft.rfft(frames, n=n_fft)  # float64 frames, as numpy's rfft
    power = spec.to(torch.complex64).to(torch.complex128).abs() ** 2  # the extractor stores complex64
    fb = _kaldi_mel_filters_f64(n_fft // 2 + 1, n_mels, float(p["mel_fmin"]), _nyquist(p["mel_fmax"], sr), sr)
    mel = torch.clamp(power @ torch.from_numpy(fb), min=float(p["mel_floor"]))
    logmel = torch.log(mel).to(torch.float32)  # [T, n_mels]
    # numpy's float32 statistics over time, each bin's frames contiguous (upstream's memory order).
    v = np.ascontiguousarray(logmel.T.numpy())  # [n_mels, T]
    mean = v.mean(axis=1, keepdims=True)
    var = v.var(axis=1, ddof=int(p["normalize_ddof"]), keepdims=True)
    normed = torch.from_numpy(((v - mean) / np.sqrt(var + float(p["normalize_epsilon"]))).T.copy())  # [T, n_mels]
    m = int(p["pad_to_multiple_of"])
    t_pad = t_frames if t_frames % m == 0 else (t_frames // m + 1) * m
    mask = torch.zeros(t_pad, dtype=torch.int64)
    mask[:t_frames] = 1
    if t_pad > t_frames:
        pad = torch.full((t_pad - t_frames, n_mels), float(p["padding_value"]), dtype=torch.float32)
        normed = torch.cat([normed, pad], dim=0)
    t_use = t_pad - t_pad % stride
    feats = normed[:t_use].reshape(1, t_use // stride, n_mels * stride)
    keep = torch.arange(t_use) % stride == 1
    return feats.to(device), mask[:t_use][keep].unsqueeze(0).to(device)


# ------------------------------------------------------------------ torchaudio.compliance.kaldi.fbank


@functools.lru_cache(maxsize=4)
def _kaldi_fbank_filters(n_mels: int, n_fft: int, sr: float, fmin: float, fmax: float) -> torch.Tensor:
    """Kaldi's mel banks in float32 [n_mels, n_fft // 2 + 1] (the Nyquist bin weight 0),
    as torchaudio's get_mel_banks computes them without VTLN."""
    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(fmin), mel(fmax)
    step = (hi - lo) / (n_mels + 1)
    i = torch.arange(n_mels).unsqueeze(1)
    left, centre, right = lo + i * step, lo + (i + 1.0) * step, lo + (i + 2.0) * step
    bin_mel = 1127.0 * (1.0 + (sr / n_fft) * torch.arange(n_fft / 2) / 700.0).log()
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    banks = torch.max(torch.zeros(1), torch.min(rising, falling))
    return torch.nn.functional.pad(banks, (0, 1))


def campplus_fbank(audio_16k, params: dict) -> torch.Tensor:
    """CAMPPlus's input ``[T, num_mel_bins]``: the Kaldi log filterbank of one 16 kHz
    utterance, minus its mean over time.  ``params`` is ``front_ends.campplus_fbank``."""
    what = "campplus_fbank"
    p = params
    for key, want in (("window", "povey"), ("mel_scale", "kaldi"), ("dither", 0.0), ("snip_edges", True),
                      ("use_energy", False), ("power", 2.0), ("remove_dc_offset", True)):
        _need(p, key, want, what)
    x = _one_row(audio_16k, what) * float(p["waveform_scale"])
    sr = float(p["sampling_rate"])
    shift = int(sr * float(p["frame_shift_ms"]) * 0.001)
    size = int(sr * float(p["frame_length_ms"]) * 0.001)
    n_fft = int(p["fft_length"])
    n = x.shape[0]
    if n < size:
        raise ValueError(f"{what}: {n} samples are less than one {size}-sample frame")
    frames = x.unfold(0, size, shift)  # [T, size], snip_edges
    frames = frames - torch.mean(frames, dim=1).unsqueeze(1)
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # Kaldi: x[-1] = x[0]
    frames = frames - float(p["preemphasis"]) * prev
    povey = torch.hann_window(size, periodic=False, dtype=torch.float32, device=x.device).pow(0.85)
    frames = frames * povey.unsqueeze(0)
    frames = torch.nn.functional.pad(frames, (0, n_fft - size))
    spectrum = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _kaldi_fbank_filters(int(p["num_mel_bins"]), n_fft, sr, float(p["mel_fmin"]), _nyquist(p["mel_fmax"], sr))
    energies = torch.mm(spectrum, banks.to(x.device).T)
    feat = torch.max(energies, torch.tensor(float(p["log_floor"]), dtype=torch.float32, device=x.device)).log()
    return feat - feat.mean(dim=0, keepdim=True)


# ------------------------------------------------------------------ indextts.s2mel.modules.audio.mel_spectrogram


def slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> torch.Tensor:
    """``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)``
    (slaney mel scale, slaney area normalisation) as float32 [n_mels, n_fft // 2 + 1]."""
    return _slaney_mel_filters(sr, n_fft, n_mels, fmin, fmax).clone()


@functools.lru_cache(maxsize=4)
def _slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> torch.Tensor:
    if fmax is None:
        fmax = float(sr) / 2
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        m = f / f_sp
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep, m)

    def to_hz(m):
        hz = f_sp * m
        log_t = m >= min_log_mel
        hz[log_t] = min_log_hz * np.exp(logstep * (m[log_t] - min_log_mel))
        return hz

    edges = to_hz(np.linspace(to_mel(fmin), to_mel(fmax), n_mels + 2))
    bins = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    widths = np.diff(edges)
    rel = np.subtract.outer(edges, bins)
    w = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
    for i in range(n_mels):
        w[i] = np.maximum(0, np.minimum(-rel[i] / widths[i], rel[i + 2] / widths[i + 1]))
    w *= (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[:, np.newaxis]  # float64 product, stored float32
    return torch.from_numpy(w)


def s2mel_mel(audio_22k, params: dict) -> torch.Tensor:
    """The s2mel prompt mel ``[1, n_mels, T]`` of ``[1, n]`` audio at the mel rate.
    ``params`` is ``front_ends.s2mel_mel``."""
    what = "s2mel_mel"
    p = params
    for key, want in (("center", False), ("mel_norm", "slaney")):
        _need(p, key, want, what)
    if not str(p["mel_scale"]).startswith("slaney"):
        raise ValueError(f"{what}: mel_scale = {p['mel_scale']!r} is not implemented (slaney is)")
    y = audio_22k if isinstance(audio_22k, torch.Tensor) else torch.as_tensor(np.asarray(audio_22k))
    if y.dim() != 2:
        raise ValueError(f"{what}: expected audio [1, n], got shape {tuple(y.shape)}")
    y = y.to(torch.float32)
    sr, n_fft, hop = int(p["sampling_rate"]), int(p["n_fft"]), int(p["hop_length"])
    win, n_mels = int(p["win_length"]), int(p["n_mels"])
    fmax = None if p["fmax"] == "sampling_rate / 2" else float(p["fmax"])
    pad = int((n_fft - hop) / 2)
    n = y.shape[1]
    if n <= pad or n + 2 * pad < n_fft:
        raise ValueError(f"{what}: {n} samples are too few: the reflect padding needs more than {pad} and one frame "
                         f"{n_fft - 2 * pad} or more")
    basis = _slaney_mel_filters(sr, n_fft, n_mels, p["fmin"], fmax).to(y.device)
    y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(y, n_fft, hop_length=hop, win_length=win, window=torch.hann_window(win, device=y.device), center=False,
                      pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec)
    mag = torch.sqrt(spec.pow(2).sum(-1) + float(p["magnitude_epsilon"]))
    return torch.log(torch.clamp(torch.matmul(basis, mag), min=float(p["log_clamp_min"])))
