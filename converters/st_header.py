"""safetensors headers: a strict, torch-free parser (``check`` reads nothing else).

The format is an 8-byte little-endian header length N, N bytes of JSON, then the data.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``__metadata__`` map of
strings.  We parse it ourselves so that what the Python reader lets through (duplicate
keys, a tensor called ``__metadata__``) is refused too.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from .errors import ConvertError

MAX_HEADER_BYTES = 100_000_000  # the same bound the safetensors library enforces

# safetensors dtype name -> item size in bytes
ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


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
                raise ConvertError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ConvertError(f"{path}: safetensors header claims {n} bytes, over the {MAX_HEADER_BYTES} limit")
            if 8 + n > size:
                raise ConvertError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes); truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror}") from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ConvertError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise ConvertError(f"{where}: malformed header entry")
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in ITEMSIZE:
            raise ConvertError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ConvertError(f"{where}: malformed shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ConvertError(f"{where}: malformed data_offsets {offs!r}")
        begin, end = offs
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * ITEMSIZE[dtype]:
            raise ConvertError(f"{where}: data_offsets {offs} do not match shape {shape} and dtype {dtype}")
        tensors[name] = TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)
    # Offsets must tile the data section exactly: no overlap, no gap, no trailing bytes.
    pos = data_start
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            kind = "overlaps the previous tensor" if info.begin < pos else "leaves a gap before it"
            raise ConvertError(f"{path}: tensor {name!r} {kind} (offset {info.begin - data_start}, expected {pos - data_start})")
        pos = info.end
    if pos != size:
        if pos > size:
            raise ConvertError(f"{path}: data section needs {pos} bytes but the file has {size}; truncated")
        raise ConvertError(f"{path}: {size - pos} trailing bytes after the last tensor")
    return Header(path, metadata, tensors, data_start, size)
