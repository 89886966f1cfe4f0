"""Reading ``.pth``/``.pt`` checkpoints safely: archive validation with bounded
inflation, the stub scan of ``data.pkl``, the weights-only load (torch-free where the
pickle allows, see :func:`load_arrays`), and page population of memory-mapped tensors.

A zip checkpoint is validated before torch sees it (:func:`check_zip`):

- Every record lies inside the file.
- **Bounded memory.**  ``data.pkl`` is refused when its declared size is over
  :data:`MAX_PICKLE_BYTES` (16 MiB), before anything is read, and it is inflated in a
  stream that stops one byte past the declared size, so a record whose deflate stream
  lies about its size is refused after at most that much output.  Any other compressed
  record the loader would inflate whole (``version``, ``byteorder``, ...) is held to
  the same limit.  Deflated storages may inflate to at most
  :data:`INFLATE_ALLOWANCE` (64 MiB) in total, or :data:`MAX_INFLATE_RATIO` (20) times
  their compressed size where that is more.
- Every storage ``data.pkl`` refers to, found by running the pickle with stub globals
  (nothing is imported or called), has its record in the archive with exactly the
  declared number of bytes: ``torch.load(mmap=True)`` does not check this, so a forged
  pickle would read neighbouring bytes.

Why these limits: the pickles of real checkpoints are small, because the weights live
in the storage records: 17-26 KB in the demo, 83 KB for a full-size ``gpt.pth``,
107 KB for ``s2mel.pth`` and 122 KB for CAMPPlus (its ~940 records); a training
checkpoint with optimizer state has about three entries per parameter, still well
under a megabyte.  16 MiB is over 100 times that.  It also bounds what unpickling can
build: a pickle can make objects about 37 times its size (two opcodes, an empty dict
appended to a list, are 2 bytes and 72 bytes of objects), so a 16 MiB pickle can cost
at most about 0.6 GiB in the scan, where 64 MiB could cost 2.3 GiB.  Storages are the
weights themselves, so their size is not limited, only their compression ratio: float
weights deflate by well under 2x, and only a bomb inflates 20x over more than 64 MiB.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from .arrays import NUMPY
from .errors import ConvertError

MAX_PICKLE_BYTES = 16 << 20  # data.pkl (and any other non-storage record torch inflates)
INFLATE_ALLOWANCE = 64 << 20  # deflated storages, in total, inflate to at most this ...
MAX_INFLATE_RATIO = 20  # ... or this many times their compressed size where that is more
CHUNK = 1 << 20  # bytes of compressed input read at a time

# Bytes per element of the storage classes torch.save writes in persistent ids.
STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "UntypedStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
    "Float8_e4m3fnStorage": 1, "Float8_e5m2Storage": 1,
}

_MiB = 1 << 20


def _mib(n: int) -> str:
    return f"{n / _MiB:.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.1f} GiB"


class _Stub:
    """Stands in for every global while scanning a pickle: nothing real is imported or called."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setitem__(self, key, value):
        pass

    def append(self, x):
        pass

    def extend(self, xs):
        pass


def declared_storages(path: str, pkl: bytes) -> list[tuple[str, str, int]]:
    """(key, storage class, numel) of every storage a torch pickle refers to, found by
    running the pickle with stub globals (no real import, no real call)."""
    found: list[tuple[str, str, int]] = []

    class Scanner(pickle.Unpickler):
        def find_class(self, module, name):
            return type(name, (_Stub,), {"_qualname": f"{module}.{name}"})

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise ConvertError(f"{path}: unexpected persistent id in data.pkl: {str(pid)[:80]}")
            _, cls, key, _location, numel = pid
            cls_name = getattr(cls, "__name__", str(cls))
            if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
                raise ConvertError(f"{path}: malformed storage reference in data.pkl: {str(pid)[:80]}")
            found.append((key, cls_name, numel))
            return _Stub()

    try:
        Scanner(io.BytesIO(pkl)).load()
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged pickle
        raise ConvertError(f"{path}: damaged data.pkl ({type(e).__name__}: {e})") from None
    return found


def read_record(path: str, f, info: zipfile.ZipInfo, limit: int) -> bytes:
    """One zip record's bytes, never more than ``limit``: refused from its declared
    size before anything is read, and inflated in a stream that is refused as soon as
    it goes past the declared size (a deflate stream can expand over 1000 times)."""
    what = f"{path}: zip record {info.filename}"
    if info.file_size > limit:
        raise ConvertError(f"{what} declares {_mib(info.file_size)}, over the {_mib(limit)} limit for records "
                           "inflated into memory; a checkpoint's pickle is kilobytes, so this is a zip bomb or "
                           "not a torch checkpoint; refused before reading it")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ConvertError(f"{what} uses compression method {info.compress_type}; torch checkpoints are stored or deflated")
    try:
        data = _read_bounded(what, f, info)
    except (zlib.error, OSError, ValueError) as e:
        raise ConvertError(f"{what} cannot be read ({type(e).__name__}: {e}); the file is damaged") from None
    if zlib.crc32(data) != info.CRC:
        raise ConvertError(f"{what} fails its CRC check; the file is damaged")
    return data


def _data_offset(what: str, f, info: zipfile.ZipInfo) -> int:
    """Where a record's bytes start in the file: after its local header, whose name and
    extra lengths may differ from the central directory's."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ConvertError(f"{what}: no local header at its offset; the file is damaged")
    n_name, n_extra = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + n_name + n_extra


def _read_bounded(what: str, f, info: zipfile.ZipInfo) -> bytes:
    f.seek(_data_offset(what, f, info))
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise ConvertError(f"{what}: stored with {info.compress_size} bytes but declares {info.file_size}; the file is damaged")
        data = f.read(info.file_size)
        if len(data) != info.file_size:
            raise ConvertError(f"{what} ends early; the file is truncated")
    else:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        out = bytearray()
        left, pending = info.compress_size, b""
        while not d.eof:
            if not pending:
                pending = f.read(min(CHUNK, left)) if left else b""
                left -= len(pending)
                if not pending:
                    break
            out += d.decompress(pending, info.file_size + 1 - len(out))
            pending = d.unconsumed_tail
            if len(out) > info.file_size:
                raise ConvertError(f"{what} inflates past its declared {info.file_size} bytes; the file is forged "
                                   "(a zip bomb) or damaged; refused after inflating only that much")
        if not d.eof or len(out) != info.file_size:
            raise ConvertError(f"{what} inflates to {len(out)} bytes, not its declared {info.file_size}; the file is damaged")
        data = bytes(out)
    return data


def check_zip(path: str) -> bool:
    """Validate a torch zip archive before loading it (see the module docstring).
    Returns True when every storage record is stored uncompressed (safe to
    memory-map), False when one is compressed (the caller then loads without mmap)."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
    except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on damaged input
        raise ConvertError(f"{path}: damaged zip checkpoint ({type(e).__name__}: {e}); the file is truncated or corrupt") from None
    pkl_names = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl_names) != 1:
        raise ConvertError(f"{path}: zip file with {len(pkl_names)} data.pkl records; not a torch checkpoint")
    pkl_name = pkl_names[0]
    for i in infos.values():
        if i.header_offset + 30 + len(i.filename) + i.compress_size > size:
            raise ConvertError(f"{path}: zip record {i.filename} lies past the end of the file; truncated")
    with open(path, "rb") as f:
        pkl = read_record(path, f, infos[pkl_name], MAX_PICKLE_BYTES)
    prefix = pkl_name[: -len("data.pkl")]
    mmap_ok = True
    storages: set[str] = set()
    inflated = compressed = 0
    for key, cls, numel in declared_storages(path, pkl):
        name = f"{prefix}data/{key}"
        rec = infos.get(name)
        if rec is None:
            raise ConvertError(f"{path}: data.pkl refers to storage {key!r}, which the archive does not contain")
        if cls not in STORAGE_ITEMSIZE:
            raise ConvertError(f"{path}: storage {key!r} has unsupported type {cls}")
        want = numel * STORAGE_ITEMSIZE[cls]
        if rec.file_size != want:
            raise ConvertError(f"{path}: storage {key!r} declares {want} bytes but its zip record holds {rec.file_size}; the file is forged or damaged")
        if rec.compress_type == zipfile.ZIP_STORED and rec.compress_size != rec.file_size:
            raise ConvertError(f"{path}: storage {key!r} is stored with {rec.compress_size} bytes but declares {rec.file_size}; the file is forged or damaged")
        if rec.compress_type != zipfile.ZIP_STORED:
            mmap_ok = False
            if name not in storages:
                inflated += rec.file_size
                compressed += rec.compress_size
        storages.add(name)
    if inflated > max(INFLATE_ALLOWANCE, MAX_INFLATE_RATIO * compressed):
        raise ConvertError(f"{path}: its compressed storages inflate to {_mib(inflated)} from {_mib(compressed)}, over "
                           f"{MAX_INFLATE_RATIO}x beyond the {_mib(INFLATE_ALLOWANCE)} allowance; weights barely compress, "
                           "so this is a zip bomb; refused before inflating anything")
    for i in infos.values():
        if i.filename not in storages and i.filename != pkl_name and i.compress_type != zipfile.ZIP_STORED \
                and i.file_size > MAX_PICKLE_BYTES:
            raise ConvertError(f"{path}: zip record {i.filename} declares {_mib(i.file_size)} compressed, over the "
                               f"{_mib(MAX_PICKLE_BYTES)} limit for records inflated into memory; refused before reading it")
    return mmap_ok


def load_pickle(path: str, mmap: bool):
    """torch.load with weights_only, whatever the environment says."""
    import torch

    try:
        # weights_only is passed explicitly so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        if "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise ConvertError(
                f"{path}: refused: the pickle asks for code or objects a weights-only load does not allow "
                f"({_unsupported_global(str(e)) or first}); this is not a plain checkpoint and was not run"
            ) from None
        raise ConvertError(f"{path}: cannot unpickle checkpoint: {first}") from None
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: damaged checkpoint: {first}") from None


def _unsupported_global(msg: str) -> str | None:
    for line in msg.splitlines():
        if "Unsupported global" in line:
            return line.strip().rstrip(".")
    return None


# ------------------------------------------------------------------ the torch-free reader

# Storage classes the torch-free reader builds, with the safetensors dtype they hold.
STORAGE_DTYPE = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


class NeedsTorch(Exception):
    """The checkpoint uses something the torch-free reader does not build (a global
    outside its list, another storage type, big-endian data): it is loaded with
    ``torch.load(weights_only=True)`` instead, which accepts or refuses it as before."""


@dataclass(frozen=True)
class Stored:
    """One tensor of a checkpoint: its bytes as a numpy array (see :mod:`arrays`) and
    its safetensors dtype name.  ``array`` is None for a dtype the converter does not
    support (the table refuses such a tensor if a row uses it)."""

    array: np.ndarray | None
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


class _Global:
    """A global the reader knows; calling it builds the plain value."""

    def __init__(self, name: str, build):
        self.name, self.build = name, build

    def __call__(self, *args):
        return self.build(*args)


def load_arrays(path: str, mapped: bool) -> object:
    """Unpickle a zip checkpoint (already validated by :func:`check_zip`) without torch.

    The pickle may use only the globals ``torch.save`` writes for state dicts and
    training checkpoints (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
    ``_rebuild_parameter``, ``_rebuild_parameter_with_state`` and the typed storage
    classes of :data:`STORAGE_DTYPE`); each tensor becomes a :class:`Stored` over its
    storage record, a view of one private (copy-on-write) memory map of the file when
    ``mapped`` (every storage record stored uncompressed), else of the record inflated
    into memory.  A tensor whose offset, shape and strides reach outside its storage is
    refused.  Anything else raises :class:`NeedsTorch` before a tensor is built."""
    import collections
    import mmap as mmap_mod

    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
    pkl_name = next(n for n in infos if n.endswith("/data.pkl") or n == "data.pkl")
    prefix = pkl_name[: -len("data.pkl")]
    with open(path, "rb") as f:
        order = infos.get(prefix + "byteorder")
        if order is not None and read_record(path, f, order, MAX_PICKLE_BYTES) != b"little":
            raise NeedsTorch("big-endian data")
        pkl = read_record(path, f, infos[pkl_name], MAX_PICKLE_BYTES)
        mm = mmap_mod.mmap(f.fileno(), 0, access=mmap_mod.ACCESS_COPY) if mapped else None
        bases: dict[str, np.ndarray] = {}

        def base(st: _Storage) -> np.ndarray:
            if st.key not in bases:
                info = infos[f"{prefix}data/{st.key}"]
                dt = NUMPY[st.dtype]
                if mm is not None:
                    what = f"{path}: zip record {info.filename}"
                    start = _data_offset(what, f, info)
                    if start + info.file_size > os.path.getsize(path):
                        raise ConvertError(f"{what} lies past the end of the file; truncated")
                    bases[st.key] = np.ndarray((st.numel,), dt, buffer=mm, offset=start)
                else:
                    raw = bytearray(read_record(path, f, info, max(info.file_size, 1)))
                    bases[st.key] = np.frombuffer(raw, dtype=dt, count=st.numel)
            return bases[st.key]

        def rebuild_tensor(storage, offset, size, stride, *rest):
            if not isinstance(storage, _Storage):
                raise ConvertError(f"{path}: a tensor in data.pkl is built from {type(storage).__name__}, not a storage")
            size, stride = tuple(size), tuple(stride)
            if not (isinstance(offset, int) and offset >= 0 and len(size) == len(stride)
                    and all(isinstance(v, int) and v >= 0 for v in size + stride)):
                raise ConvertError(f"{path}: malformed tensor in data.pkl (storage {storage.key!r}, offset {offset!r}, "
                                   f"shape {list(size)}, strides {list(stride)})")
            numel = 1
            for d in size:
                numel *= d
            if numel and offset + sum((d - 1) * st for d, st in zip(size, stride)) >= storage.numel:
                raise ConvertError(f"{path}: a tensor of shape {list(size)} (strides {list(stride)}, offset {offset}) "
                                   f"reaches past the end of its storage {storage.key!r} ({storage.numel} elements); "
                                   "the file is forged or damaged")
            b = base(storage)
            item = b.itemsize
            if numel == 0:
                return Stored(np.zeros(size, b.dtype), storage.dtype)
            arr = np.ndarray(size, b.dtype, buffer=b, offset=offset * item, strides=tuple(st * item for st in stride))
            return Stored(arr, storage.dtype)

        def parameter(data, *rest):
            return data

        known = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _Global("_rebuild_tensor_v2", rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): _Global("_rebuild_parameter", parameter),
            ("torch._utils", "_rebuild_parameter_with_state"): _Global("_rebuild_parameter_with_state", parameter),
        }

        seen: dict[str, _Storage] = {}

        class Reader(_RestrictedUnpickler):
            def find_class(self, module, name):
                if module == "torch" and name in STORAGE_DTYPE:
                    return _Global(name, None)
                if (module, name) in known:
                    return known[(module, name)]
                raise NeedsTorch(f"{module}.{name}")

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise ConvertError(f"{path}: unexpected persistent id in data.pkl: {str(pid)[:80]}")
                _, cls, key, _location, numel = pid
                if not isinstance(cls, _Global) or cls.name not in STORAGE_DTYPE:
                    raise NeedsTorch(f"storage type {getattr(cls, 'name', cls)}")
                if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
                    raise ConvertError(f"{path}: malformed storage reference in data.pkl: {str(pid)[:80]}")
                st = _Storage(key, STORAGE_DTYPE[cls.name], numel)
                if seen.setdefault(key, st) != st:
                    # torch reinterprets such a storage; we do not guess
                    raise NeedsTorch(f"storage {key!r} under two types or sizes")
                return st

        try:
            return Reader(io.BytesIO(pkl)).load()
        except (ConvertError, NeedsTorch):
            raise
        except Exception as e:  # noqa: BLE001 - any other failure here means a damaged pickle
            raise ConvertError(f"{path}: cannot unpickle checkpoint: {type(e).__name__}: {e}") from None


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with one opcode narrowed: ``BUILD`` (set an object's
    state) is allowed only on an ``OrderedDict`` instance (``torch.save`` writes a state
    dict's ``_metadata`` so), as in torch's weights-only unpickler.  Anywhere else it
    could rewrite the reader's own objects (a storage's size after :func:`check_zip`
    checked it) or a class; such a pickle goes to torch, which refuses it.  The pure-
    Python class is what lets an opcode be replaced; pickles are small (83 KB for a
    full-size gpt.pth)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self):
        import collections

        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is collections.OrderedDict and type(state) is dict:
            inst.__dict__.update(state)
            return
        raise NeedsTorch(f"a BUILD of {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = load_build


# ------------------------------------------------------------------ page population

# madvise advice that maps a range's pages in one call: Linux 5.14+ only.  None turns
# population off (every other platform; the portable-path tests set it so on Linux).
MADV_POPULATE_READ: int | None = 22 if sys.platform.startswith("linux") else None
_madvise = None  # libc's madvise once looked up; False where unusable


def populate(x: np.ndarray) -> None:
    """Map a memory-mapped array's pages in one call (MADV_POPULATE_READ) instead of
    one page fault per 4 KiB on first touch; page faults are costly in VMs and made
    transposed reads of mmap-backed tensors several times slower.  The pages stay
    file-backed (page cache), so no anonymous memory is used.  A no-op where the
    platform or kernel does not support it."""
    global _madvise
    if _madvise is False or MADV_POPULATE_READ is None or x.size == 0:
        return
    if _madvise is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = libc.madvise
        except Exception:  # noqa: BLE001 - no ctypes, no libc, no madvise: just skip
            _madvise = False
            return
    ptr = x.__array_interface__["data"][0]
    n = x.itemsize + sum((d - 1) * st for d, st in zip(x.shape, x.strides))  # strides are never negative here
    base = ptr & ~4095
    if _madvise(base, ptr + n - base, MADV_POPULATE_READ) != 0:
        import ctypes

        if ctypes.get_errno() == 22:  # EINVAL: kernel without MADV_POPULATE_READ
            _madvise = False
