"""The reader layer: every source file becomes a flat ``name -> tensor`` view.

Supported inputs:
- ``.safetensors`` (header validated by :mod:`safetensors_io`, tensors read one at a time)
- zip ``.pth``/``.pt`` checkpoints, via ``torch.load(weights_only=True, mmap=True)``,
  after checking the archive records (see :func:`_check_zip`)
- legacy (pre-1.6, non-zip) ``.pth`` files, via ``torch.load(weights_only=True)``

Known wrapper dicts (``generator``, ``model``, ``state_dict``, ``net``) are unwrapped,
nested dicts of state dicts (``net = {"cfm": sd, ...}``) are flattened with ``.``, and
DDP ``module.`` prefixes are stripped.  Whatever sits beside a wrapper (optimizer state,
counters) is recorded in ``dropped`` with the reason and never read.

A file holding one bare tensor (``torch.save(tensor)``, as IndexTTS-2's ``feat1.pt`` and
``feat2.pt``) becomes a one-entry view named :data:`BARE_TENSOR_NAME`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch

from . import safetensors_io as stio
from .errors import ConvertError
from .schema import SCHEMA_NAME

WRAPPERS = ("generator", "model", "state_dict", "net")
BARE_TENSOR_NAME = "tensor"  # the name of the single tensor in a bare torch.save(tensor) file

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # legacy torch.save prefix


@dataclass
class Source:
    path: str
    format: str  # "safetensors" | "pth-zip" | "pth-legacy"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] | None = None
    _header: stio.Header | None = None
    _fh: object = None

    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise ConvertError(f"{self.path}: no tensor {name!r}")
        if self._tensors is not None:
            t = self._tensors[name]
            if self.format == "pth-zip":
                _populate(t)
            return t
        assert self._header is not None
        if self._fh is None:
            self._fh = open(self.path, "rb")
        return stio.read_tensor(self.path, self._header.tensors[name], self._fh)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tensors = None


_MADV_POPULATE_READ = 22  # Linux 5.14+
_madvise = None


def _populate(t: torch.Tensor) -> None:
    """Map a memory-mapped tensor's pages in one call (MADV_POPULATE_READ) instead of
    one page fault per 4 KiB on first touch; page faults are costly in VMs and made
    transposed reads of mmap-backed tensors several times slower.  The pages stay
    file-backed (page cache), so no anonymous memory is used.  A no-op where the
    kernel does not support it."""
    global _madvise
    if _madvise is False:
        return
    if _madvise is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
            return
    st = t.untyped_storage()
    ptr, n = st.data_ptr(), st.nbytes()
    if n:
        base = ptr & ~4095
        if _madvise(base, ptr + n - base, _MADV_POPULATE_READ) != 0:
            import ctypes

            if ctypes.get_errno() == 22:  # EINVAL: kernel without MADV_POPULATE_READ
                _madvise = False


def sniff(path: str) -> str:
    """Tell the container format from the first bytes, or refuse with a reason."""
    if os.path.isdir(path):
        raise ConvertError(f"{path}: is a folder, expected a checkpoint file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror}") from None
    if size == 0:
        raise ConvertError(f"{path}: file is empty (0 bytes); the download probably failed")
    if head.startswith(b"version https://git-lfs"):
        raise ConvertError(f"{path}: is a git-lfs pointer file, not the weights; run `git lfs pull` in that repository")
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        raise ConvertError(f"{path}: is an HTML/XML page, not a checkpoint; the download saved an error page")
    if head.startswith(ZIP_MAGIC):
        return "pth-zip"
    if head.startswith(LEGACY_MAGIC):
        return "pth-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise ConvertError(f"{path}: not a safetensors file or a torch checkpoint (unrecognised first bytes); the file may be damaged")


def open_source(path: str) -> Source:
    fmt = sniff(path)
    if fmt == "safetensors":
        return _open_safetensors(path)
    return _open_pth(path, fmt)


def _open_safetensors(path: str) -> Source:
    header = stio.read_header(path)
    if header.metadata.get("schema") == SCHEMA_NAME:
        raise ConvertError(
            f"{path}: is already a canonical file (model {header.metadata.get('model', '?')}); "
            "converting it again would transform its tensors twice. Use `convert.py check` on it instead"
        )
    src = Source(path, "safetensors", {}, {}, metadata=dict(header.metadata), _header=header)
    renamed: dict[str, str] = {}
    for name, info in header.tensors.items():
        flat = _strip_module(name)
        if flat in renamed.values():
            raise ConvertError(f"{path}: tensor names {name!r} and another collide after stripping 'module.' prefixes")
        renamed[name] = flat
    if any(k != v for k, v in renamed.items()):
        src.notes.append("stripped DDP 'module.' prefixes")
        src._header = stio.Header(header.path, header.metadata, {renamed[k]: v for k, v in header.tensors.items()}, header.data_start, header.file_size)
    for name, info in src._header.tensors.items():
        src.shapes[name] = info.shape
        src.dtypes[name] = stio.DTYPES[info.dtype][0]
    return src


# Bytes per element of the storage classes torch.save writes in persistent ids.
STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "UntypedStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
    "Float8_e4m3fnStorage": 1, "Float8_e5m2Storage": 1,
}


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


def _declared_storages(path: str, pkl: bytes) -> list[tuple[str, str, int]]:
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

    import io

    try:
        Scanner(io.BytesIO(pkl)).load()
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged pickle
        raise ConvertError(f"{path}: damaged data.pkl ({type(e).__name__}: {e})") from None
    return found


def _check_zip(path: str) -> bool:
    """Validate a torch zip archive before loading it.

    Every storage data.pkl refers to must have its record in the archive, lying inside
    the file, with exactly the declared number of bytes: ``torch.load(mmap=True)`` does
    not check this, so a forged pickle would read neighbouring bytes.  Returns True
    when every record is stored uncompressed (safe to memory-map), False when one is
    compressed (the caller then loads without mmap).
    """
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            pkl_names = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl_names) != 1:
                raise ConvertError(f"{path}: zip file with {len(pkl_names)} data.pkl records; not a torch checkpoint")
            pkl_name = pkl_names[0]
            pkl = z.read(pkl_name)
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on damaged input
        raise ConvertError(f"{path}: damaged zip checkpoint ({type(e).__name__}: {e}); the file is truncated or corrupt") from None
    size = os.path.getsize(path)
    for i in infos.values():
        if i.header_offset + 30 + len(i.filename) + i.compress_size > size:
            raise ConvertError(f"{path}: zip record {i.filename} lies past the end of the file; truncated")
    prefix = pkl_name[: -len("data.pkl")]
    mmap_ok = True
    for key, cls, numel in _declared_storages(path, pkl):
        rec = infos.get(f"{prefix}data/{key}")
        if rec is None:
            raise ConvertError(f"{path}: data.pkl refers to storage {key!r}, which the archive does not contain")
        if cls not in STORAGE_ITEMSIZE:
            raise ConvertError(f"{path}: storage {key!r} has unsupported type {cls}")
        want = numel * STORAGE_ITEMSIZE[cls]
        if rec.file_size != want:
            raise ConvertError(f"{path}: storage {key!r} declares {want} bytes but its zip record holds {rec.file_size}; the file is forged or damaged")
        if rec.compress_type != zipfile.ZIP_STORED:
            mmap_ok = False
    return mmap_ok


def _load_pickle(path: str, mmap: bool):
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


def _open_pth(path: str, fmt: str) -> Source:
    if fmt == "pth-zip":
        obj = _load_pickle(path, mmap=_check_zip(path))
    else:
        obj = _load_pickle(path, mmap=False)
    src = Source(path, fmt, {}, {})
    tensors = unwrap(obj, src)
    src._tensors = tensors
    for name, t in tensors.items():
        src.shapes[name] = tuple(t.shape)
        src.dtypes[name] = t.dtype
    return src


def _strip_module(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def unwrap(obj, src: Source) -> dict[str, torch.Tensor]:
    """Peel known wrapper dicts and flatten to ``name -> tensor``."""
    path = src.path
    if isinstance(obj, torch.Tensor):
        src.notes.append(f"a bare tensor, read as {BARE_TENSOR_NAME!r}")
        return {BARE_TENSOR_NAME: obj}
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    trail: list[str] = []
    while not _is_tensor_dict(obj):
        keys = [k for k in WRAPPERS if k in obj]
        if not keys:
            if all(isinstance(v, dict) for v in obj.values()) and trail and trail[-1] == "net":
                break  # net = {submodule: state_dict}: flattened below
            raise ConvertError(f"{path}: no state dict found: top-level keys are {sorted(map(str, obj))[:12]}, none of the known wrappers {list(WRAPPERS)}")
        key = keys[0]
        for other in obj:
            if other != key:
                src.dropped[".".join(trail + [str(other)])] = f"beside the {key!r} wrapper: not model weights (training state or bookkeeping); never read"
        trail.append(key)
        obj = obj[key]
        if not isinstance(obj, dict):
            raise ConvertError(f"{path}: wrapper {'.'.join(trail)!r} holds a {type(obj).__name__}, expected a dict")
    if trail:
        src.notes.append(f"unwrapped {' -> '.join(repr(k) for k in trail)}")
    out: dict[str, torch.Tensor] = {}
    stripped = False

    def walk(d: dict, prefix: str) -> None:
        nonlocal stripped
        for k, v in d.items():
            if not isinstance(k, str):
                raise ConvertError(f"{path}: non-string key {k!r} under {prefix or 'the top level'}")
            name = _strip_module(k)
            stripped |= name != k
            full = prefix + name
            if isinstance(v, torch.Tensor):
                if full in out:
                    raise ConvertError(f"{path}: tensor {full!r} appears twice after stripping 'module.' prefixes")
                out[full] = v
            elif isinstance(v, dict):
                walk(v, full + ".")
            else:
                raise ConvertError(f"{path}: entry {full!r} is a {type(v).__name__}, not a tensor")

    walk(obj, "")
    if stripped:
        src.notes.append("stripped DDP 'module.' prefixes")
    if not out:
        raise ConvertError(f"{path}: the checkpoint holds no tensors")
    return out


class CombinedSource(Source):
    """A main source plus extra files whose tensors appear under a prefix
    (``stats/mean``), for models built from more than one upstream file."""

    def __init__(self, main: Source, extras: dict[str, Source]):
        super().__init__(main.path, main.format, dict(main.shapes), dict(main.dtypes),
                         dict(main.dropped), list(main.notes), dict(main.metadata))
        self.parts: dict[str, Source] = {"": main}
        for prefix, src in extras.items():
            self.parts[prefix] = src
            for n in src.names():
                self.shapes[prefix + n] = src.shapes[n]
                self.dtypes[prefix + n] = src.dtypes[n]
            self.dropped.update({prefix + k: v for k, v in src.dropped.items()})
            self.notes.extend(f"{src.path}: {n}" for n in src.notes)

    def get(self, name: str) -> torch.Tensor:
        for prefix, src in self.parts.items():
            if prefix and name.startswith(prefix):
                return src.get(name[len(prefix):])
        return self.parts[""].get(name)

    def close(self) -> None:
        for src in self.parts.values():
            src.close()
