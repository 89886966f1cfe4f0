"""The strict safetensors header reader of the canonical format (standard library only).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then
the data section.  The JSON maps each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the start of the data section),
plus an optional ``__metadata__`` map of strings to strings.

:func:`read_header` refuses what the Python reader lets through: duplicate keys, a
tensor named ``__metadata__``, offsets that overlap, leave gaps or run past the end,
trailing bytes, unknown dtypes, headers over 100 MB.

:func:`layout_problems` states the canonical format's layout promise, which is what
lets a loader read a file's data section with one bulk read and hand out every tensor
as a view into that one buffer:

- the data section starts at a multiple of 8 bytes (the header is padded with spaces)
- every tensor's offset is a multiple of its item size (so it is naturally aligned in
  any buffer that is itself 8-byte aligned)
- tensors are ordered by item size, widest first, then by name

The converter (``converters/format/st_header.py``, ``check``) and the reference loader
(:mod:`reference.load`) both read headers through this module.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

MAX_HEADER_BYTES = 100_000_000  # the same bound the safetensors library enforces
DATA_ALIGNMENT = 8  # where the data section starts, and the widest item size

# safetensors dtype name -> item size in bytes (every dtype the format allows)
ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class HeaderError(ValueError):
    """A file that is not a valid safetensors file; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


@dataclass(frozen=True)
class Header:
    path: str
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_header(path: str) -> Header:
    """Parse and fully validate a safetensors header without reading tensor data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"{path}: safetensors header claims {n} bytes, over the {MAX_HEADER_BYTES} limit")
            if 8 + n > size:
                raise HeaderError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes); truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise HeaderError(f"{path}: cannot read: {e.strerror}") from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderError(f"{path}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"{where}: malformed header entry")
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in ITEMSIZE:
            raise HeaderError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise HeaderError(f"{where}: malformed shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise HeaderError(f"{where}: malformed data_offsets {offs!r}")
        begin, end = offs
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * ITEMSIZE[dtype]:
            raise HeaderError(f"{where}: data_offsets {offs} do not match shape {shape} and dtype {dtype}")
        tensors[name] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
    # Offsets must tile the data section exactly: no overlap, no gap, no trailing bytes.
    pos = data_start
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            kind = "overlaps the previous tensor" if info.begin < pos else "leaves a gap before it"
            raise HeaderError(f"{path}: tensor {name!r} {kind} (offset {info.begin - data_start}, expected {pos - data_start})")
        pos = info.end
    if pos != size:
        if pos > size:
            raise HeaderError(f"{path}: data section needs {pos} bytes but the file has {size}; truncated")
        raise HeaderError(f"{path}: {size - pos} trailing bytes after the last tensor")
    return Header(path, metadata, tensors, data_start, size)


def alignment_problems(h: Header) -> list[str]:
    """What breaks zero-copy views: a data section not starting at a multiple of 8, or a
    tensor whose offset is not a multiple of its item size."""
    errs = []
    if h.data_start % DATA_ALIGNMENT:
        errs.append(f"{h.path}: data section starts at byte {h.data_start}, not a multiple of {DATA_ALIGNMENT} "
                    "(the header must be padded)")
    for name, info in h.tensors.items():
        if (info.begin - h.data_start) % ITEMSIZE[info.dtype]:
            errs.append(f"{h.path}: tensor {name!r} ({info.dtype}) starts at data offset {info.begin - h.data_start}, "
                        f"not a multiple of its item size {ITEMSIZE[info.dtype]}")
    return errs


def layout_problems(h: Header) -> list[str]:
    """Every way the file breaks the canonical layout promise (alignment and order)."""
    errs = alignment_problems(h)
    order = sorted(h.tensors.items(), key=lambda kv: kv[1].begin)
    want = sorted(h.tensors.items(), key=lambda kv: (-ITEMSIZE[kv[1].dtype], kv[0]))
    if [n for n, _ in order] != [n for n, _ in want]:
        first = next(i for i, (a, b) in enumerate(zip(order, want)) if a[0] != b[0])
        errs.append(f"{h.path}: tensor data is not ordered by item size then name (at position {first}: "
                    f"{order[first][0]!r}, expected {want[first][0]!r})")
    return errs
