"""The reader layer: every source file becomes a :class:`Source`, a flat
``name -> tensor`` view.

Supported inputs (told apart by :func:`sniff` from the first bytes):

- ``.safetensors``: :class:`SafetensorsSource`, header validated by the strict reader
  (:mod:`st_header`), tensors read one at a time (:mod:`st_read`)
- zip ``.pth``/``.pt`` checkpoints, after the archive checks of :mod:`pth_reader`
  (records, sizes, bounded inflation), by its torch-free reader
  (:func:`pth_reader.load_arrays`: memory-mapped, the globals ``torch.save`` writes for
  state dicts only); a pickle that needs more is loaded with
  ``torch.load(weights_only=True, mmap=True)``, which accepts or refuses it as it always
  did, and the source's notes say so
- legacy (pre-1.6, non-zip) ``.pth`` files, via ``torch.load(weights_only=True)``

Both ``.pth`` kinds become a :class:`MappingSource` over the unwrapped tensors.

Tensors are handed out as numpy arrays of the stored bytes, and dtypes named by their
safetensors names (see :mod:`arrays`), whichever reader read them.

Known wrapper dicts (``generator``, ``model``, ``state_dict``, ``net``) are unwrapped,
nested dicts of state dicts (``net = {"cfm": sd, ...}``) are flattened with ``.``, and
DDP ``module.`` prefixes are stripped.  Whatever sits beside a wrapper (optimizer state,
counters) is recorded in ``dropped`` with the reason and never read.

A file holding one bare tensor (``torch.save(tensor)``, as IndexTTS-2's ``feat1.pt`` and
``feat2.pt``) becomes a one-entry view named :data:`BARE_TENSOR_NAME`.

Every source is a context manager, and ``close`` may be called any number of times:
``with open_source(path) as src: ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import arrays, pth_reader
from .errors import ConvertError
from .pth_reader import Stored
from .schema import SCHEMA_NAME
from .st_header import Header, read_header
from .st_read import read_array

WRAPPERS = ("generator", "model", "state_dict", "net")
BARE_TENSOR_NAME = "tensor"  # the name of the single tensor in a bare torch.save(tensor) file

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # legacy torch.save prefix


@dataclass(eq=False)
class Source:
    """The one interface to a checkpoint: what the table resolver, the engine,
    ``inspect`` and ``verify`` use.

    ``shapes`` and ``dtypes`` (safetensors dtype names) describe every tensor (by flat
    name), ``dropped`` what the reader left out and why, ``notes`` what it did
    (unwrapping, prefixes), ``metadata`` a safetensors file's ``__metadata__``.  ``get(name)`` returns one tensor; ``close()``
    releases the file (idempotent; ``get`` is refused afterwards).

    The readers are :class:`SafetensorsSource` and :class:`MappingSource`
    (:class:`CombinedSource` joins several).  A plain ``Source`` describes tensors
    without holding any (planning at full size on the meta device, tests): its ``get``
    is refused.
    """

    path: str
    format: str  # "safetensors" | "pth-zip" | "pth-legacy" | a description ("meta")
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.shapes)

    def _known(self, name: str) -> None:
        if name not in self.shapes:
            raise ConvertError(f"{self.path}: no tensor {name!r}")

    def get(self, name: str) -> np.ndarray:
        self._known(name)
        raise ConvertError(f"{self.path}: tensor {name!r}: this source describes shapes only and holds no data")

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _closed(self, name: str) -> ConvertError:
        return ConvertError(f"{self.path}: tensor {name!r} asked for after the source was closed (converter bug)")


@dataclass(eq=False)
class MappingSource(Source):
    """A ``.pth`` checkpoint, unwrapped into ``name -> tensor``.  With ``populate`` (the
    tensors are memory-mapped) each tensor's pages are mapped in one call when asked
    for (:func:`pth_reader.populate`)."""

    tensors: dict[str, np.ndarray | None] | None = field(default=None, repr=False)
    populate: bool = False

    def get(self, name: str) -> np.ndarray:
        self._known(name)
        if self.tensors is None:
            raise self._closed(name)
        t = self.tensors[name]
        if t is None:
            raise ConvertError(f"{self.path}: tensor {name!r} has unsupported dtype {self.dtypes[name]}")
        if self.populate:
            pth_reader.populate(t)
        return t

    def close(self) -> None:
        self.tensors = None  # drops the memory maps once the last tensor is gone


@dataclass(eq=False)
class SafetensorsSource(Source):
    """A ``.safetensors`` file: its validated header, each tensor read on demand into
    a fresh tensor through one open file."""

    header: Header | None = field(default=None, repr=False)
    _fh: object = field(default=None, repr=False)
    _is_closed: bool = field(default=False, repr=False)

    def get(self, name: str) -> np.ndarray:
        self._known(name)
        if self._is_closed:
            raise self._closed(name)
        if self._fh is None:
            self._fh = open(self.path, "rb")
        return read_array(self.path, self.header.tensors[name], self._fh)

    def close(self) -> None:
        self._is_closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
    """The right reader for the file, or a refusal that says what the file is."""
    fmt = sniff(path)
    if fmt == "safetensors":
        return _open_safetensors(path)
    return _open_pth(path, fmt)


def _open_safetensors(path: str) -> SafetensorsSource:
    header = read_header(path)
    if header.metadata.get("schema") == SCHEMA_NAME:
        raise ConvertError(
            f"{path}: is already a canonical file (model {header.metadata.get('model', '?')}); "
            "converting it again would transform its tensors twice. Use `convert.py check` on it instead"
        )
    src = SafetensorsSource(path, "safetensors", {}, {}, metadata=dict(header.metadata), header=header)
    renamed: dict[str, str] = {}
    for name in header.tensors:
        flat = _strip_module(name)
        if flat in renamed.values():
            raise ConvertError(f"{path}: tensor names {name!r} and another collide after stripping 'module.' prefixes")
        renamed[name] = flat
    if any(k != v for k, v in renamed.items()):
        src.notes.append("stripped DDP 'module.' prefixes")
        src.header = Header(header.path, header.metadata, {renamed[k]: v for k, v in header.tensors.items()}, header.data_start, header.file_size)
    for name, info in src.header.tensors.items():
        src.shapes[name] = info.shape
        src.dtypes[name] = info.dtype
    return src


# Set by tests to read every .pth with torch.load, as before the torch-free reader, to
# show that both give the same bytes.
FORCE_TORCH_READER = False


def _open_pth(path: str, fmt: str) -> MappingSource:
    mmap = pth_reader.check_zip(path) if fmt == "pth-zip" else False
    src = MappingSource(path, fmt, {}, {}, populate=mmap)
    obj = None
    if fmt == "pth-zip" and not FORCE_TORCH_READER:
        try:
            obj = pth_reader.load_arrays(path, mapped=mmap)
        except pth_reader.NeedsTorch as e:
            src.notes.append(f"read with torch.load(weights_only=True): its pickle uses {e}, which the torch-free "
                             "reader does not build")
    if obj is None:
        obj = _torch_leaves(pth_reader.load_pickle(path, mmap=mmap))
    tensors = unwrap(obj, src)
    src.tensors = {}
    for name, t in tensors.items():
        src.tensors[name] = t.array
        src.shapes[name] = tuple(t.array.shape) if t.array is not None else t.shape
        src.dtypes[name] = t.dtype
    return src


@dataclass(frozen=True)
class _Unsupported(Stored):
    shape: tuple = ()


def _torch_leaves(obj):
    """What torch.load returned, with each tensor as a :class:`Stored` (zero-copy)."""
    import torch

    def leaf(t):
        dt = arrays.torch_dtype_name(t.dtype)
        if dt not in arrays.NUMPY:
            return _Unsupported(None, dt, tuple(t.shape))
        return Stored(arrays.from_torch(t), dt)

    def walk(o):
        if isinstance(o, torch.Tensor):
            return leaf(o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        return o

    return walk(obj)


def _strip_module(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, Stored) for v in d.values())


def unwrap(obj, src: Source) -> dict[str, Stored]:
    """Peel known wrapper dicts and flatten to ``name -> tensor``."""
    path = src.path
    if isinstance(obj, Stored):
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
    out: dict[str, Stored] = {}
    stripped = False

    def walk(d: dict, prefix: str) -> None:
        nonlocal stripped
        for k, v in d.items():
            if not isinstance(k, str):
                raise ConvertError(f"{path}: non-string key {k!r} under {prefix or 'the top level'}")
            name = _strip_module(k)
            stripped |= name != k
            full = prefix + name
            if isinstance(v, Stored):
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
    (``stats/mean``), for models built from more than one upstream file.  Closing it
    closes every part."""

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

    def get(self, name: str) -> np.ndarray:
        for prefix, src in self.parts.items():
            if prefix and name.startswith(prefix):
                return src.get(name[len(prefix):])
        return self.parts[""].get(name)

    def close(self) -> None:
        for src in self.parts.values():
            src.close()
