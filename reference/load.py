"""Load canonical files: each file's data in one allocation, every tensor a view into it.

    from reference.load import load
    files = load("canonical/", device="cuda")   # {model kind: CanonicalFile}
    gpt = files["gpt"]
    gpt.config["model_dim"], gpt["gpt.h.0.attn.q.weight"]

This is the loading half of the reference runtime, and a module a runtime may import
or copy: it needs torch and the standard library only (its header reader,
:mod:`reference.header`, is standard library only).

Why one allocation per file works: the canonical layout (see ``reference/header.py``
and ``canonical_schema.json`` ``layout``) puts the data section at a multiple of 8
bytes and every tensor at a multiple of its item size, so the data section can be read
with one bulk transfer into one buffer and each tensor is a ``view`` of that buffer with
its dtype and shape: no per-tensor allocation, copy or cast.

How it reads:

- ``device="cpu"``: the file is memory-mapped (copy-on-write, so writing to a tensor
  never changes the file) and the tensors are views into the mapping; nothing is read
  until it is used.
- ``device="cuda"``: ``threads`` workers (default: up to 16) each own two staging
  buffers, carved from one pinned allocation, and a CUDA stream.  They ``pread`` pieces
  of ``piece_bytes`` (default 4 MiB) of the data sections (of every file, from one
  shared queue) into a staging buffer while the other buffer's previous piece is still
  being copied to the device on the worker's stream.  The copies call the CUDA runtime
  library torch has loaded, through ctypes (which releases the GIL for each call, so
  the workers do not queue for it); where that library cannot be found (or
  ``copier="torch"``) they are torch's ``copy_``.  Where pinned memory cannot be had
  (or ``staging="pageable"``), the same path runs with ordinary buffers and
  synchronous copies.  ``timings`` (a dict) receives the setup and read/copy times.
- any other device: the CPU mapping, copied to the device in one transfer.

Every header is validated first (:func:`reference.header.read_header`'s strict rules,
and the alignment above); a file that fails is refused before anything is read, and a
read that comes up short (a file changed under us) fails the whole load.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from dataclasses import dataclass, field

import torch

from .header import Header, HeaderError, alignment_problems, read_header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
PIECE_BYTES = 4 << 20  # one staging transfer (fastest of those measured on an H100 host; bench/RESULTS.md)
MAX_THREADS = 16


class LoadError(ValueError):
    """A file the loader refuses; the message names the file (and tensor)."""


class Config(dict):
    """The metadata ``config`` of one file; a missing key names the file."""

    path = ""

    def __missing__(self, key):
        raise KeyError(f"{self.path}: metadata config has no {key!r}")


@dataclass
class CanonicalFile:
    path: str
    metadata: dict[str, str]
    config: Config
    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor = field(repr=False)  # the data section, uint8; every tensor is a view into it

    @property
    def model(self) -> str | None:
        return self.metadata.get("model")

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def float(self, dtype: torch.dtype = torch.float32) -> "CanonicalFile":
        """The same file with every floating tensor in ``dtype`` (float32 by default: the
        reference forwards compute in float32 whatever the file's storage dtype).
        Tensors already in ``dtype`` stay views into :attr:`buffer`."""
        cast = {n: t.to(dtype) if t.is_floating_point() else t for n, t in self.tensors.items()}
        return CanonicalFile(self.path, self.metadata, self.config, cast, self.buffer)


def validate(path: str) -> Header:
    """The file's header, validated; :class:`LoadError` if it breaks a rule."""
    try:
        h = read_header(path)
    except HeaderError as e:
        raise LoadError(str(e)) from None
    errs = alignment_problems(h)
    if errs:
        raise LoadError(errs[0])
    return h


def files_in(path: str) -> list[str]:
    """The ``.safetensors`` files of a folder (not its subfolders), sorted by name."""
    return sorted(os.path.join(path, n) for n in os.listdir(path)
                  if n.endswith(".safetensors") and os.path.isfile(os.path.join(path, n)))


def load(path, device: str | torch.device = "cuda", threads: int | None = None,
         piece_bytes: int = PIECE_BYTES, staged: bool | None = None, staging: str = "pinned",
         timings: dict | None = None, copier: str = "auto"):
    """Load one canonical file (a :class:`CanonicalFile`), or every ``.safetensors``
    file of a folder or of a list of paths (``{model kind: CanonicalFile}``), onto
    ``device``.

    ``staged`` forces (True) or avoids (False) the threaded staging path; by default it
    is used for CUDA devices only."""
    device = torch.device(device)
    if isinstance(path, (list, tuple)):
        single, paths = False, [str(p) for p in path]
    else:
        path = str(path)
        single = not os.path.isdir(path)
        paths = [path] if single else files_in(path)
    if not paths:
        raise LoadError(f"{path}: no .safetensors files in this folder")
    headers = [validate(p) for p in paths]  # every file is checked before any is read
    if staged is None:
        staged = device.type == "cuda"
    if staged:
        if staging not in STAGING:
            raise ValueError(f"staging must be one of {', '.join(STAGING)}, not {staging!r}")
        if copier not in COPIERS:
            raise ValueError(f"copier must be one of {', '.join(COPIERS)}, not {copier!r}")
        buffers = _read_staged(headers, device, threads or min(MAX_THREADS, os.cpu_count() or 1), piece_bytes,
                               staging, timings, copier)
    else:
        buffers = [_mapped(h) for h in headers]
        if device.type != "cpu":
            buffers = [b.to(device) for b in buffers]
    out = [_file(h, b) for h, b in zip(headers, buffers)]
    if single:
        return out[0]
    by_kind: dict[str, CanonicalFile] = {}
    for f in out:
        key = f.model or os.path.basename(f.path)[: -len(".safetensors")]
        if key in by_kind:
            raise LoadError(f"{path}: two files hold model {key!r}: {by_kind[key].path} and {f.path}")
        by_kind[key] = f
    return by_kind


def _file(h: Header, buf: torch.Tensor) -> CanonicalFile:
    tensors = {}
    for name, info in h.tensors.items():
        b, e = info.begin - h.data_start, info.end - h.data_start
        tensors[name] = buf[b:e].view(DTYPES[info.dtype]).view(info.shape)
    cfg = Config()
    cfg.path = h.path
    raw = h.metadata.get("config")
    if raw is not None:
        try:
            cfg.update(json.loads(raw))
        except ValueError:
            raise LoadError(f"{h.path}: metadata config is not valid JSON") from None
    return CanonicalFile(h.path, dict(h.metadata), cfg, tensors, buf)


def _mapped(h: Header) -> torch.Tensor:
    """The data section as a copy-on-write memory map (nothing read yet)."""
    if h.file_size == h.data_start:
        return torch.empty(0, dtype=torch.uint8)
    whole = torch.from_file(h.path, shared=False, size=h.file_size, dtype=torch.uint8)
    return whole[h.data_start:]


class _Queue:
    """The pieces of every file's data section, handed out in file order."""

    def __init__(self, items):
        self.items, self.next, self.lock = items, 0, threading.Lock()

    def take(self):
        with self.lock:
            if self.next == len(self.items):
                return None
            item = self.items[self.next]
            self.next += 1
            return item


def _reader(path: str):
    """A function reading ``len(view)`` bytes at an offset into ``view``, on its own
    handle (``preadv`` where the OS has it, else a private file object)."""
    if hasattr(os, "preadv"):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

        def read(view, offset):
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    break
                got += n
            return got

        return read, lambda: os.close(fd)
    f = open(path, "rb", buffering=0)

    def read(view, offset):
        f.seek(offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        return got

    return read, f.close


STAGING = ("pinned", "pageable")
COPIERS = ("auto", "cudart", "torch")


def _read_staged(headers: list[Header], device: torch.device, threads: int, piece: int,
                 staging: str = "pinned", timings: dict | None = None, copier: str = "auto") -> list[torch.Tensor]:
    """Read every file's data section into one device buffer per file: ``threads``
    workers take ``piece``-byte pieces from a shared queue, ``pread`` each into one of
    their two staging buffers and copy it to the device on their own CUDA stream while
    reading the next.

    Staging: ``"pinned"`` carves every worker's buffers from one pinned allocation
    (measured on an H100 host: cheaper than one per worker, by ``cudaHostAlloc`` or
    ``cudaHostRegister``, made at once in the workers); ``"pageable"`` (or pinned
    memory refused) uses ordinary buffers, whose copies are synchronous.

    Copies: ``"cudart"`` calls the CUDA runtime through ctypes, which releases the GIL
    for every call; ``"torch"`` is ``Tensor.copy_`` on a torch stream, whose per-call
    Python work the workers queue for (measured on an H100 host, 16 workers: 1.5x
    slower at 8 MiB pieces, and smaller pieces only cost it more); ``"auto"`` is cudart
    where the process has the library loaded (:class:`_Cudart`), else torch."""
    import time

    t0 = time.perf_counter()
    cuda = device.type == "cuda"
    rt = _runtime(device) if copier != "torch" else None
    if copier == "cudart" and rt is None:
        raise LoadError("copier='cudart': the CUDA runtime library is not loaded in this process")
    dests = [torch.empty(h.file_size - h.data_start, dtype=torch.uint8, device=device) for h in headers]
    if cuda:
        # the copies run on the workers' own streams: whatever the current stream still
        # has queued on memory the allocator just handed out must be done first
        torch.cuda.current_stream(device).synchronize()
    t1 = time.perf_counter()
    items = [(k, off, min(piece, dests[k].numel() - off))
             for k, h in enumerate(headers) for off in range(0, dests[k].numel(), piece)]
    queue = _Queue(items)
    threads = max(1, min(threads, len(items)))
    errors: list[BaseException] = []
    size = min(piece, max((n for _, _, n in items), default=1))
    block = _staging(threads * 2 * size, pinned=cuda and staging == "pinned")
    pinned = block.is_pinned()  # asynchronous copies need pinned memory
    t2 = time.perf_counter()
    dest_ptrs = [d.data_ptr() for d in dests]
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)

    def work(i: int):
        handles: dict[int, tuple] = {}
        copy = None
        try:
            bufs = [block[(2 * i + j) * size:(2 * i + j + 1) * size] for j in range(2)]
            views = [_bytes_view(b) for b in bufs]
            if rt is not None:
                copy = _RuntimeCopies(rt, index, dest_ptrs, [b.data_ptr() for b in bufs])
            else:
                copy = _TorchCopies(device if pinned else None, dests, bufs)
            slot = 0
            while not errors:
                item = queue.take()
                if item is None:
                    break
                k, off, n = item
                if k not in handles:
                    handles[k] = _reader(headers[k].path)
                copy.wait(slot)  # the copy out of this buffer has finished
                got = handles[k][0](views[slot][:n], headers[k].data_start + off)
                if got != n:
                    raise LoadError(f"{headers[k].path}: file ended {n - got} bytes early at offset "
                                    f"{headers[k].data_start + off + got}; it changed while loading")
                copy.put(slot, k, off, n)
                slot ^= 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            try:
                if copy is not None:
                    copy.finish()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
            for _, close in handles.values():
                close()

    pool = [threading.Thread(target=work, args=(i,), name=f"load-{i}") for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    if timings is not None:
        timings.update({"dest_s": t1 - t0, "staging_s": t2 - t1, "read_copy_s": time.perf_counter() - t2,
                        "setup_s": t2 - t0, "pinned": pinned, "copier": "cudart" if rt is not None else "torch"})
    return dests


class _TorchCopies:
    """One worker's copies with ``Tensor.copy_``: on its own stream (asynchronous, from
    pinned buffers) when ``device`` is given, else synchronous."""

    def __init__(self, device, dests, bufs):
        self.dests, self.bufs = dests, bufs
        self.stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self.events = [torch.cuda.Event(), torch.cuda.Event()] if self.stream is not None else None
        self.recorded = [False, False]

    def wait(self, slot):
        if self.recorded[slot]:
            self.events[slot].synchronize()

    def put(self, slot, k, off, n):
        if self.stream is None:
            self.dests[k][off:off + n].copy_(self.bufs[slot][:n])
            return
        with torch.cuda.stream(self.stream):
            self.dests[k][off:off + n].copy_(self.bufs[slot][:n], non_blocking=True)
        self.events[slot].record(self.stream)
        self.recorded[slot] = True

    def finish(self):
        if self.stream is not None:
            self.stream.synchronize()


class _RuntimeCopies:
    """One worker's copies through the CUDA runtime (GIL released for every call): its
    own non-blocking stream and one event per staging buffer."""

    def __init__(self, rt, index, dest_ptrs, ptrs):
        self.rt, self.dest_ptrs, self.ptrs = rt, dest_ptrs, ptrs
        rt.check(rt.lib.cudaSetDevice(index), "cudaSetDevice")
        s = ctypes.c_void_p()
        rt.check(rt.lib.cudaStreamCreateWithFlags(ctypes.byref(s), 1), "cudaStreamCreateWithFlags")
        self.stream = s
        self.events = []
        for _ in range(2):
            e = ctypes.c_void_p()
            rt.check(rt.lib.cudaEventCreateWithFlags(ctypes.byref(e), 2), "cudaEventCreateWithFlags")  # no timing
            self.events.append(e)
        self.recorded = [False, False]

    def wait(self, slot):
        if self.recorded[slot]:
            self.rt.check(self.rt.lib.cudaEventSynchronize(self.events[slot]), "cudaEventSynchronize")

    def put(self, slot, k, off, n):
        rt = self.rt
        rt.check(rt.lib.cudaMemcpyAsync(ctypes.c_void_p(self.dest_ptrs[k] + off), ctypes.c_void_p(self.ptrs[slot]),
                                        ctypes.c_size_t(n), 1, self.stream), "cudaMemcpyAsync")  # 1: host to device
        rt.check(rt.lib.cudaEventRecord(self.events[slot], self.stream), "cudaEventRecord")
        self.recorded[slot] = True

    def finish(self):
        rt = self.rt
        try:
            rt.check(rt.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        finally:
            for e in self.events:
                rt.lib.cudaEventDestroy(e)
            rt.lib.cudaStreamDestroy(self.stream)


def _runtime(device: torch.device) -> "_Cudart | None":
    """The CUDA runtime for copies to ``device`` (None: use torch's calls)."""
    return _Cudart.get() if device.type == "cuda" else None


class _Cudart:
    """The CUDA runtime library this process already has loaded (torch's), called
    through ctypes: every call releases the GIL, so worker threads spend almost no time
    holding it.  Found through ``/proc/self/maps`` (Linux); elsewhere :meth:`get` gives
    None and the torch calls are used."""

    _found: "_Cudart | None | bool" = False

    def __init__(self, path):
        self.path = path
        lib = ctypes.CDLL(path)
        vp, sz, i, u = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint
        for name, args in (("cudaSetDevice", [i]), ("cudaStreamCreateWithFlags", [ctypes.POINTER(vp), u]),
                           ("cudaStreamDestroy", [vp]), ("cudaStreamSynchronize", [vp]),
                           ("cudaEventCreateWithFlags", [ctypes.POINTER(vp), u]), ("cudaEventDestroy", [vp]),
                           ("cudaEventRecord", [vp, vp]), ("cudaEventSynchronize", [vp]),
                           ("cudaMemcpyAsync", [vp, vp, sz, i, vp])):
            f = getattr(lib, name)
            f.argtypes, f.restype = args, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self.lib = lib

    def check(self, err: int, what: str) -> None:
        if err:
            raise LoadError(f"{what} failed: {self.lib.cudaGetErrorString(err).decode(errors='replace')} ({err})")

    @classmethod
    def get(cls) -> "_Cudart | None":
        if cls._found is False:
            cls._found = None
            try:
                with open("/proc/self/maps") as f:
                    paths = {line.split(None, 5)[5].strip() for line in f if "libcudart.so" in line}
                if len(paths) == 1:
                    cls._found = cls(paths.pop())
            except (OSError, IndexError, AttributeError):
                cls._found = None
        return cls._found


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU uint8 tensor's bytes (no numpy needed);
    the caller keeps ``t`` alive while it is used."""
    return memoryview((ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())).cast("B")


def _staging(n: int, pinned: bool) -> torch.Tensor:
    if pinned:
        try:
            return torch.empty(n, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass  # no pinned memory here: the same path with an ordinary buffer
    return torch.empty(n, dtype=torch.uint8)
