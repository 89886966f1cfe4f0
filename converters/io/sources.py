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
- legacy (pre-1.6, non-zip) ``.pth`` files, via ``torch.load(weights_only=True)``, after
  their pickles pass the same scan (:func:`pth_reader.check_legacy`)

Both ``.pth`` kinds become a :class:`MappingSource` over the unwrapped tensors.

Tensors are handed out as numpy arrays of the stored bytes, and dtypes named by their
safetensors names (see :mod:`arrays`), whichever reader read them.

Known wrapper dicts (``generator``, ``model``, ``state_dict``, ``net``) are unwrapped,
nested dicts of state dicts (``net = {"cfm": sd, ...}``) are flattened with ``.``, and
DDP ``module.`` prefixes are stripped.  Whatever sits beside a wrapper (optimizer state,
counters) is recorded in ``dropped`` with the reason and never read.  Both walks are
loops, not recursion: a dict met twice (a wrapper that contains itself, two dicts that
contain each other, one dict under two names) is refused, and so is nesting deeper than
:data:`MAX_DEPTH` (32) dicts from the top of the checkpoint down to a tensor, wrappers
included.  Dicts are read only through ``dict``'s own methods (``dict.items(d)``), never
through a method looked up on the object, which a pickle's ``BUILD`` can hide (an
``OrderedDict`` whose instance attribute ``items`` is 1).

A path that is not a regular file (a FIFO, a device, a socket, a folder) is refused
before it is opened, so a FIFO cannot hang the tool.

A file holding one bare tensor (``torch.save(tensor)``, as IndexTTS-2's ``feat1.pt`` and
``feat2.pt``) becomes a one-entry view named :data:`BARE_TENSOR_NAME`.

Every source is a context manager, and ``close`` may be called any number of times:
``with open_source(path) as src: ...``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import numpy as np

from ..format import arrays
from . import pth_reader
from ..errors import ConvertError
from .pth_reader import MAX_DEPTH, Stored, describe
from .files import not_regular
from ..format.schema import SCHEMA_NAME
from ..format.st_header import Header, read_header
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
    """Tell the container format from the first bytes, or refuse with a reason.  The
    path is stat'ed before it is opened, and opened without blocking: a FIFO, a device
    or a socket is refused as not a regular file, never read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode, "a checkpoint file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # the file opened, should the path have changed meanwhile
            if not stat.S_ISREG(st.st_mode):
                raise not_regular(path, st.st_mode, "a checkpoint file")
            size = st.st_size
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
    archive = pth_reader.open_archive(path) if fmt == "pth-zip" else None
    mmap = pth_reader.check_zip(path, archive) if fmt == "pth-zip" else False
    if fmt == "pth-legacy":
        pth_reader.check_legacy(path)  # its pickles are scanned before torch runs them
    src = MappingSource(path, fmt, {}, {}, populate=mmap)
    obj = None
    if fmt == "pth-zip" and not FORCE_TORCH_READER:
        try:
            obj = pth_reader.load_arrays(path, mapped=mmap, archive=archive)
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
    """What torch.load returned, with each tensor as a :class:`Stored` (zero-copy):
    dicts are copied (as plain dicts) with their tensors converted, everything else is
    kept.  A loop with a memo: a dict met twice becomes one copy met twice, so shared
    and cyclic dicts stay as they were (and :func:`unwrap` judges them, as it judges the
    torch-free reader's)."""
    import torch

    def leaf(t):
        dt = arrays.torch_dtype_name(t.dtype)
        if dt not in arrays.NUMPY:
            return _Unsupported(None, dt, tuple(t.shape))
        return Stored(arrays.from_torch(t), dt)

    def convert(o, todo: list, copies: dict):
        if isinstance(o, torch.Tensor):
            return leaf(o)
        if not isinstance(o, dict):
            return o
        if id(o) not in copies:
            copies[id(o)] = {}
            todo.append(o)
        return copies[id(o)]

    todo: list = []
    copies: dict[int, dict] = {}
    top = convert(obj, todo, copies)
    while todo:
        d = todo.pop()
        copy = copies[id(d)]
        for k, v in dict.items(d):
            copy[k] = convert(v, todo, copies)
    return top


def _strip_module(name: str) -> str:
    i = 0
    while name.startswith("module.", i):
        i += len("module.")
    return name[i:]


def _is_tensor_dict(d: dict) -> bool:
    return bool(dict.__len__(d)) and all(isinstance(v, Stored) for v in dict.values(d))


def _keys(d: dict) -> list[str]:
    """A dict's first keys, sorted, for a message (long or odd keys shortened)."""
    return sorted(k if type(k) is str and len(k) <= 60 else describe(k) for k in dict.keys(d))[:12]


def unwrap(obj, src: Source) -> dict[str, Stored]:
    """Peel known wrapper dicts and flatten to ``name -> tensor`` (see the module
    docstring: loops, each dict once, at most :data:`MAX_DEPTH` deep)."""
    path = src.path
    if isinstance(obj, Stored):
        src.notes.append(f"a bare tensor, read as {BARE_TENSOR_NAME!r}")
        return {BARE_TENSOR_NAME: obj}
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    trail: list[str] = []
    seen = {id(obj)}
    while not _is_tensor_dict(obj):
        keys = [k for k in WRAPPERS if dict.__contains__(obj, k)]
        if not keys:
            if trail and trail[-1] == "net" and all(isinstance(v, dict) for v in dict.values(obj)):
                break  # net = {submodule: state_dict}: flattened below
            raise ConvertError(f"{path}: no state dict found: {'.'.join(trail) or 'top-level'} keys are {_keys(obj)}, "
                               f"none of the known wrappers {list(WRAPPERS)}")
        key = keys[0]
        for other in dict.keys(obj):
            if other != key:
                name = other if type(other) is str else describe(other)
                src.dropped[".".join(trail + [name])] = f"beside the {key!r} wrapper: not model weights (training state or bookkeeping); never read"
        trail.append(key)
        obj = dict.__getitem__(obj, key)
        where = ".".join(trail) if len(trail) <= 6 else ".".join(trail[:6]) + f"... ({len(trail)} wrappers)"
        if not isinstance(obj, dict):
            raise ConvertError(f"{path}: wrapper {where!r} holds a {type(obj).__name__}, expected a dict")
        if id(obj) in seen:
            raise ConvertError(f"{path}: wrapper {where!r} holds a dict met above it (data.pkl refers back to a dict "
                               "that contains it: a cycle); refused")
        if len(trail) + 1 > MAX_DEPTH:  # the top-level dict, then one per wrapper
            raise ConvertError(f"{path}: wrappers nest dicts {len(trail) + 1} deep ({where}), over the limit of "
                               f"{MAX_DEPTH}; refused")
        seen.add(id(obj))
    if trail:
        src.notes.append(f"unwrapped {' -> '.join(repr(k) for k in trail)}")
    out, stripped = _flatten(obj, path, seen, len(trail) + 1)
    if stripped:
        src.notes.append("stripped DDP 'module.' prefixes")
    if not out:
        raise ConvertError(f"{path}: the checkpoint holds no tensors")
    return out


def _flatten(top: dict, path: str, seen: set, depth: int) -> tuple[dict[str, Stored], bool]:
    """``name -> tensor`` of a state dict, nested dicts joined with ``.``, in the order
    of the dicts (depth first); ``depth`` is how deep ``top`` already is.  Refuses a
    dict met twice (``seen`` holds the wrappers above) and nesting over MAX_DEPTH."""
    out: dict[str, Stored] = {}
    stripped = False
    stack = [(iter(dict.items(top)), "", depth)]
    while stack:
        items, prefix, level = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        k, v = entry
        if not isinstance(k, str):
            raise ConvertError(f"{path}: non-string key {describe(k)} under {describe(prefix[:-1]) if prefix else 'the top level'}")
        name = _strip_module(k)
        stripped |= name != k
        full = prefix + name
        if isinstance(v, Stored):
            if full in out:
                raise ConvertError(f"{path}: tensor {describe(full)} appears twice after stripping 'module.' prefixes")
            out[full] = v
        elif isinstance(v, dict):
            if id(v) in seen:
                raise ConvertError(f"{path}: entry {describe(full)} is a dict met before (data.pkl refers to one dict "
                                   "twice, or to a dict inside itself); refused")
            if level >= MAX_DEPTH:
                raise ConvertError(f"{path}: entry {describe(full)} nests dicts {level + 1} deep, over the limit of "
                                   f"{MAX_DEPTH}; refused")
            seen.add(id(v))
            stack.append((iter(dict.items(v)), full + ".", level + 1))
        else:
            raise ConvertError(f"{path}: entry {describe(full)} is a {type(v).__name__}, not a tensor")
    return out, stripped


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
