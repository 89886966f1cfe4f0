"""Writing a synthesis trace or a WAV file: small, deterministic, atomic.

:func:`save_trace` writes a safetensors file (tensors in the order given, one
``__metadata__`` of JSON strings with sorted keys, 8-byte aligned header), so the same
trace gives the same bytes; :func:`save_wav` writes 16-bit mono PCM with the standard
library's ``wave``.  Both write a temporary file beside the target and rename it, so a
failure leaves no partial output.
"""

from __future__ import annotations

import json
import os
import tempfile
import wave

import torch

DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.float64: "F64"}


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_trace(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in DTYPES:
            raise ValueError(f"trace tensor {name!r} has dtype {t.dtype}, which a trace does not hold")
        data = t.numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for b in blobs:
            f.write(b)

    _atomic(path, write)


def pcm16(wav: torch.Tensor) -> bytes:
    """``round(clamp(32767 * wav, -32767, 32767))`` as little-endian int16 (manifest
    ``pipeline.inference.output_pcm16``)."""
    x = torch.clamp(32767 * wav.detach().cpu().float().reshape(-1), -32767.0, 32767.0).round().to(torch.int16)
    return x.numpy().astype("<i2").tobytes()


def save_wav(path: str, wav: torch.Tensor, sample_rate: int) -> None:
    frames = pcm16(wav)

    def write(f):
        with wave.open(f, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes(frames)

    _atomic(path, write)
