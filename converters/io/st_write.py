"""Writing a safetensors file: the canonical data order, the header encoding, and
:func:`write_stream`, which streams the tensors through the staging writer
(:mod:`staging`) into an atomic output (:mod:`atomic`)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import staging
from ..format.arrays import NUMPY, from_torch
from .atomic import AtomicOutput
from ..errors import ConvertError
from ..format.st_header import ITEMSIZE


@dataclass
class OutTensor:
    name: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    produce: Callable[[], object]  # a numpy array (arrays.NUMPY[dtype]) or a CPU torch tensor
    check: Callable[[np.ndarray], None] | None = None  # called on each staged piece (see staging.Staging)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def layout(tensors: list[OutTensor]) -> list[OutTensor]:
    """Deterministic data order: widest items first (so every tensor is naturally
    aligned once the header is padded to 8 bytes), then by name."""
    return sorted(tensors, key=lambda t: (-ITEMSIZE[t.dtype], t.name))


def encode_header(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header (metadata keys sorted, tensors in the order
    given), padded with spaces so the data section starts 8-byte aligned."""
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_stream(
    path: str,
    tensors: list[OutTensor],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] = lambda n: None,
    finalize_metadata: Callable[[], dict[str, str]] | None = None,
    hash_output: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> str | None:
    """Write a safetensors file tensor by tensor, atomically.

    The header goes first, then each tensor is produced, checked against the header,
    copied into a staging buffer (see :class:`staging.Staging`), checked there with its
    ``check`` and dropped once copied, so memory stays at the two staging buffers and
    the tensors still being copied into them (plus the ops' temporaries).

    ``finalize_metadata``, if given, is called after all data is written and must
    return metadata whose encoded header has exactly the same length (used to fill in
    a source hash computed while converting); the header is then rewritten in place.
    With ``hash_output`` (metadata final from the start) the file's sha256 is computed
    from the staged bytes and returned.  ``before_commit``, if given, runs once
    everything is written and before the file takes its name; raising there discards
    the output (an earlier file at ``path`` stays).
    """
    import hashlib

    if hash_output and finalize_metadata is not None:
        raise ValueError("hash_output needs the final metadata up front")
    tensors = layout(tensors)
    header = encode_header(tensors, metadata)
    hasher = hashlib.sha256() if hash_output else None
    with AtomicOutput(path) as out:
        stage = staging.Staging(out.fd, hasher)
        try:
            stage.write_bytes(header)
            for t in tensors:
                x = t.produce()
                if not isinstance(x, np.ndarray):
                    x = from_torch(x)
                want = (NUMPY[t.dtype], tuple(t.shape))
                if (x.dtype, tuple(x.shape)) != want:
                    raise ConvertError(f"{path}: tensor {t.name!r} came out as {x.dtype} {tuple(x.shape)}, header says "
                                       f"{t.dtype} ({want[0]}) {want[1]} (converter bug)")
                stage.write_tensor(x, t.check)
                on_bytes(t.nbytes)
                del x
            stage.finish()
            if finalize_metadata is not None:
                final = encode_header(tensors, finalize_metadata())
                if len(final) != len(header):
                    raise ConvertError(f"{path}: final header changed length (converter bug)")
                staging.write_at(out.fd, memoryview(final), 0)
        finally:
            stage.close()
        if before_commit is not None:
            before_commit()
        out.commit()
    return hasher.hexdigest() if hasher is not None else None
