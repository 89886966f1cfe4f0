"""safetensors on disk: a strict header reader and a streaming, atomic writer.

The format is an 8-byte little-endian header length N, N bytes of JSON, then the data.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``__metadata__`` map of
strings.  We parse the header ourselves so that every attack the Python reader lets
through (duplicate keys, a tensor called ``__metadata__``) is refused too, and so that
``check`` never touches tensor data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .errors import ConvertError

MAX_HEADER_BYTES = 100_000_000  # the same bound the safetensors library enforces

# safetensors dtype name -> (torch dtype, item size)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items()}


def st_dtype(dtype: torch.dtype, what: str = "tensor") -> str:
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise ConvertError(f"{what}: unsupported dtype {dtype}") from None


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
        if dtype not in DTYPES:
            raise ConvertError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ConvertError(f"{where}: malformed shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ConvertError(f"{where}: malformed data_offsets {offs!r}")
        begin, end = offs
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * DTYPES[dtype][1]:
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


def read_tensor(path: str, info: TensorInfo, f=None) -> torch.Tensor:
    """Read one tensor's bytes into a fresh, owned torch tensor."""
    dt = DTYPES[info.dtype][0]
    t = torch.empty(info.shape, dtype=dt)
    nbytes = info.end - info.begin
    if nbytes:
        buf = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.dim() else memoryview(t.reshape(1).view(torch.uint8).numpy()).cast("B")
        own = f is None
        f = f or open(path, "rb")
        try:
            f.seek(info.begin)
            got = f.readinto(buf)
        finally:
            if own:
                f.close()
        if got != nbytes:
            raise ConvertError(f"{path}: tensor data ends early; truncated file")
    return t


# ---------------------------------------------------------------- writing


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def layout(tensors: list[OutTensor]) -> list[OutTensor]:
    """Deterministic data order: widest items first (so every tensor is naturally
    aligned once the header is padded to 8 bytes), then by name."""
    return sorted(tensors, key=lambda t: (-DTYPES[t.dtype][1], t.name))


def encode_header(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


class AtomicOutput:
    """A file that appears at ``path`` only when complete.

    Data goes to an anonymous O_TMPFILE in the target folder where the filesystem
    supports it (a killed process then leaves nothing behind), else to a hidden
    temporary name that is removed on failure.  ``commit`` fsyncs, links the file in
    under a temporary name and renames it over ``path`` in one step.
    """

    def __init__(self, path: str):
        self.path = path
        self.dir = os.path.dirname(os.path.abspath(path))
        self.tmp_name: str | None = None
        mode = 0o666 & ~_umask()
        self.fd = _open_anonymous(self.dir, mode) if _tmpfile_links(self.dir) else None
        if self.fd is None:
            import tempfile

            self.fd, self.tmp_name = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=self.dir)
            os.fchmod(self.fd, mode)
        self.file = os.fdopen(self.fd, "wb", buffering=0)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.fd)
        if self.tmp_name is None:
            import secrets

            self.tmp_name = os.path.join(self.dir, f".{os.path.basename(self.path)}.{secrets.token_hex(6)}.tmp")
            _link_fd(self.fd, self.tmp_name)
        os.replace(self.tmp_name, self.path)
        self.tmp_name = None
        self.file.close()
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        if self.tmp_name is not None:
            try:
                os.unlink(self.tmp_name)
            except FileNotFoundError:
                pass


def _open_anonymous(folder: str, mode: int) -> int | None:
    try:
        return os.open(folder, os.O_TMPFILE | os.O_WRONLY, mode)
    except (AttributeError, OSError):
        return None


def _link_fd(fd: int, path: str) -> None:
    """Give an anonymous O_TMPFILE a name: linkat through /proc (works unprivileged),
    else linkat(fd, "", AT_EMPTY_PATH) (needs CAP_DAC_READ_SEARCH on older kernels,
    but works where /proc links are refused, as in some sandboxes)."""
    try:
        os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
        return
    except OSError as first:
        err = first
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_empty_path = -100, 0x1000
    if libc.linkat(fd, b"", at_fdcwd, os.fsencode(path), at_empty_path) != 0:
        raise OSError(ctypes.get_errno(), f"cannot link temporary file ({err.strerror})", path)


_LINKABLE: dict[str, bool] = {}


def _tmpfile_links(folder: str) -> bool:
    """Whether an O_TMPFILE in ``folder`` can later be linked in (some filesystems,
    such as overlayfs, refuse).  Probed once per folder with an empty file."""
    if folder not in _LINKABLE:
        ok = False
        fd = _open_anonymous(folder, 0o600)
        if fd is not None:
            import secrets

            probe = os.path.join(folder, f".probe-{secrets.token_hex(6)}.tmp")
            try:
                _link_fd(fd, probe)
                os.unlink(probe)
                ok = True
            except OSError:
                ok = False
            finally:
                os.close(fd)
        _LINKABLE[folder] = ok
    return _LINKABLE[folder]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def write_stream(
    path: str,
    tensors: list[OutTensor],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] = lambda n: None,
    finalize_metadata: Callable[[], dict[str, str]] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor, atomically.

    The header goes first, then each tensor is produced, checked against the header,
    written and dropped, so memory stays at one tensor.  ``finalize_metadata``, if
    given, is called after all data is written and must return metadata whose encoded
    header has exactly the same length (used to fill in a source hash computed while
    converting); the header is then rewritten in place.
    """
    tensors = layout(tensors)
    header = encode_header(tensors, metadata)
    out = AtomicOutput(path)
    try:
        f = out.file
        f.write(header)
        for t in tensors:
            x = t.produce()
            want = (DTYPES[t.dtype][0], tuple(t.shape))
            if (x.dtype, tuple(x.shape)) != want:
                raise ConvertError(f"{path}: tensor {t.name!r} came out as {x.dtype} {tuple(x.shape)}, header says {want[0]} {want[1]} (converter bug)")
            x = x.contiguous()
            if x.numel():
                data = memoryview(x.reshape(-1).view(torch.uint8).numpy())
                f.write(data)
            on_bytes(t.nbytes)
            del x
        if finalize_metadata is not None:
            final = encode_header(tensors, finalize_metadata())
            if len(final) != len(header):
                raise ConvertError(f"{path}: final header changed length (converter bug)")
            f.seek(0)
            f.write(final)
        out.commit()
    except BaseException:
        out.abort()
        raise
