"""safetensors on disk with torch: reading one tensor, and the streaming, atomic writer.

Header parsing lives in :mod:`st_header` (torch-free, so ``check`` starts fast); it is
re-exported here.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConvertError
from reference.load import DTYPES as TORCH_DTYPES

from .st_header import ITEMSIZE, MAX_HEADER_BYTES, Header, TensorInfo, read_header  # noqa: F401 (re-exported)

# safetensors dtype name -> (torch dtype, item size): the reference loader's table
DTYPES: dict[str, tuple[torch.dtype, int]] = {name: (dt, ITEMSIZE[name]) for name, dt in TORCH_DTYPES.items()}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items()}


def st_dtype(dtype: torch.dtype, what: str = "tensor") -> str:
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise ConvertError(f"{what}: unsupported dtype {dtype}") from None


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
    check: Callable[[torch.Tensor], None] | None = None  # called on each staged piece (see _Staging)

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
    under a temporary name and renames it over ``path`` in one step.  Used as a
    context manager, leaving the block without ``commit`` (an error) aborts.
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

    def __enter__(self) -> "AtomicOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

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


# Staging for the streaming writer: page-aligned buffers, filled by worker threads
# while a writer thread writes the previous one.
STAGE_BYTES = 32 << 20  # per buffer (two are used); a multiple of ALIGN
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the block size
WHOLE_BYTES = STAGE_BYTES - ALIGN  # a non-contiguous tensor up to this size is copied into staging in one go
PIECE_BYTES = 1 << 20  # larger copies go piece by piece (each piece checked while in the CPU cache)
FILL_THREADS = 2  # threads copying into staging (torch releases the GIL while copying)

Check = Callable[[torch.Tensor], None]


def _fill(dst: torch.Tensor, src: torch.Tensor, check: Check | None) -> None:
    """Copy src into the staged region dst, then check it, piece by piece where both
    are contiguous."""
    if src.is_contiguous() and dst.numel() * dst.element_size() > PIECE_BYTES:
        d, s_ = dst.reshape(-1), src.reshape(-1)
        step = max(1, PIECE_BYTES // dst.element_size())
        for i in range(0, d.numel(), step):
            d[i:i + step].copy_(s_[i:i + step])
            if check is not None:
                check(d[i:i + step])
        return
    dst.copy_(src)
    if check is not None:
        check(dst)


class _Staging:
    """Sequential writer of one file through two page-aligned buffers.

    The caller's thread lays tensors out in the current buffer and hands each region
    to ``FILL_THREADS`` worker threads, which copy (and transpose) the tensor into it
    and run its ``check``; a writer thread writes the other buffer meanwhile.  Copies
    of different tensors run in parallel (a transposing copy is bound by memory
    latency, and two of them run nearly twice as fast as one).

    Every write starts at a multiple of ``ALIGN`` and has a length that is one (a
    buffer handed over early keeps its unaligned tail, which moves to the front of the
    next buffer), so the data can go to the device with ``O_DIRECT`` where the
    filesystem allows it: no page-cache copy of the output (buffered writes of a
    multi-GB file followed by fsync are several times slower than the device on some
    machines).  The unaligned end of the file and a patched header are written through
    the page cache; the caller's fsync covers both.  Without ``O_DIRECT`` the same
    pipeline writes through the page cache.

    With a ``hasher`` (a ``hashlib`` object) the file's bytes are also hashed, in file
    order, on another thread while they are written: no second read of the output.
    ``check``, given per tensor, is called on each staged piece of it (a contiguous
    view in the output dtype).  Errors from the workers (a failed check, a write
    error) surface on the caller's thread at the next hand-off or in :meth:`finish`.
    """

    def __init__(self, fd: int, hasher=None):
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        assert STAGE_BYTES % ALIGN == 0
        self.whole = min(WHOLE_BYTES, STAGE_BYTES - ALIGN)  # fits a buffer after an early hand-over
        self.fd = fd
        self.direct = _set_direct(fd, True)
        self.bufs = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]
        self.views = [torch.frombuffer(b, dtype=torch.uint8) for b in self.bufs]
        self.filling: list[list] = [[], []]  # per buffer: copy tasks into it
        self.pending: list[list] = [[], []]  # per buffer: its write (and hash)
        self.fill_pool = ThreadPoolExecutor(max_workers=FILL_THREADS, thread_name_prefix="stage-fill")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self.hasher = hasher
        self.hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="output-hash") if hasher is not None else None
        self.cur, self.pos, self.offset = 0, 0, 0  # current buffer, bytes laid out in it, its file offset

    def _flush(self) -> None:
        """Hand the current buffer's aligned part to the writer (and the hasher) once
        its copies are done, and carry its tail (< ALIGN bytes) to the front of the
        other buffer."""
        k, n = self.cur, self.pos
        cut = n - n % ALIGN
        if cut == 0:
            return
        self._settle(k)
        data = memoryview(self.bufs[k])[:cut]
        self.pending[k] = [self.pool.submit(self._write, data, self.offset)]
        if self.hash_pool is not None:
            self.pending[k].append(self.hash_pool.submit(self.hasher.update, data))
        self.offset += cut
        self.cur = 1 - k
        self._wait(self.cur)
        self.pos = n - cut
        if self.pos:
            self.views[self.cur][:self.pos].copy_(self.views[k][cut:n])

    def _write(self, data: memoryview, offset: int) -> None:
        try:
            _pwrite_all(self.fd, data, offset)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
            # The filesystem took the flag but refuses direct writes: use the page cache.
            _set_direct(self.fd, False)
            self.direct = False
            _pwrite_all(self.fd, data, offset)

    def _settle(self, k: int) -> None:
        futs, self.filling[k] = self.filling[k], []
        for f in futs:
            f.result()

    def _wait(self, k: int) -> None:
        futs, self.pending[k] = self.pending[k], []
        for f in futs:
            f.result()

    def _place(self, src: torch.Tensor, check: Check | None) -> None:
        """Lay src (its bytes fit the current buffer) out at the current position and
        queue its copy."""
        nb = src.numel() * src.element_size()
        dst = self.views[self.cur][self.pos:self.pos + nb].view(src.dtype).view(src.shape)
        self.filling[self.cur].append(self.fill_pool.submit(_fill, dst, src, check))
        self.pos += nb
        if self.pos == STAGE_BYTES:
            self._flush()

    def write_bytes(self, data: bytes) -> None:
        self.write_tensor(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def write_tensor(self, x: torch.Tensor, check: Check | None = None) -> None:
        """Append x's bytes (in row-major order, whatever its strides).  x must not
        change until the copy is done (at the hand-off of its buffer)."""
        if x.numel() == 0:
            return
        size = x.element_size()
        if x.is_contiguous():
            flat = x.reshape(-1)
            i, n = 0, flat.numel()
            while i < n:
                k = min(n - i, (STAGE_BYTES - self.pos) // size)
                self._place(flat[i:i + k], check)
                i += k
            return
        nb = x.numel() * size
        if nb <= self.whole:
            # One copy into the buffer: torch transposes a whole matrix in cache-sized
            # blocks (copies of row slices of a transposed matrix are 4-10x slower).
            if nb > STAGE_BYTES - self.pos:
                self._flush()  # early hand-over: the buffer is then (nearly) empty
            self._place(x, check)
            return
        if x.dim() == 1:  # a strided 1-D view: pieces made contiguous
            step = max(1, PIECE_BYTES // size)
            for i in range(0, x.shape[0], step):
                self.write_tensor(x[i:i + step].contiguous(), check)
            return
        # Blocks of rows, each copied straight into the buffer where it fits.
        row = x[0].numel() * size
        step = max(1, PIECE_BYTES // max(row, 1))
        for i in range(0, x.shape[0], step):
            piece = x[i:i + step]
            if piece.numel() * size <= STAGE_BYTES - self.pos:
                self._place(piece, check)
            elif row > PIECE_BYTES:
                for r in piece:
                    self.write_tensor(r, check)
            else:
                self.write_tensor(piece.contiguous(), check)

    def finish(self) -> None:
        """Write (and hash) what is left, and wait for every write."""
        k, n = self.cur, self.pos
        self._settle(k)
        self._wait(1 - k)
        data = memoryview(self.bufs[k])[:n]
        if self.hasher is not None:
            self.hasher.update(data)
        aligned = n - n % ALIGN if self.direct else n
        if aligned:
            self._write(data[:aligned], self.offset)
            aligned = n - n % ALIGN if self.direct else n
        if self.direct:
            _set_direct(self.fd, False)
        if n > aligned:
            _pwrite_all(self.fd, data[aligned:n], self.offset + aligned)
        self.offset += n
        self.pos = 0

    def close(self) -> None:
        self.fill_pool.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True)
        if self.hash_pool is not None:
            self.hash_pool.shutdown(wait=True)
        self.views, self.bufs = [], []
        if self.direct:
            try:
                _set_direct(self.fd, False)
            except OSError:
                pass


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for fd; False where the filesystem or platform refuses."""
    import fcntl

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (fl | flag) if on else (fl & ~flag))
    except OSError:
        if on:
            return False
        raise
    return on


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(28, "no space left on device (short write)")
        data, offset = data[n:], offset + n


def write_stream(
    path: str,
    tensors: list[OutTensor],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None] = lambda n: None,
    finalize_metadata: Callable[[], dict[str, str]] | None = None,
    hash_output: bool = False,
) -> str | None:
    """Write a safetensors file tensor by tensor, atomically.

    The header goes first, then each tensor is produced, checked against the header,
    copied into a staging buffer (see :class:`_Staging`), checked there with its
    ``check`` and dropped once copied, so memory stays at the two staging buffers and
    the tensors still being copied into them (plus the ops' temporaries).

    ``finalize_metadata``, if given, is called after all data is written and must
    return metadata whose encoded header has exactly the same length (used to fill in
    a source hash computed while converting); the header is then rewritten in place.
    With ``hash_output`` (metadata final from the start) the file's sha256 is computed
    from the staged bytes and returned.
    """
    import hashlib

    if hash_output and finalize_metadata is not None:
        raise ValueError("hash_output needs the final metadata up front")
    tensors = layout(tensors)
    header = encode_header(tensors, metadata)
    hasher = hashlib.sha256() if hash_output else None
    with AtomicOutput(path) as out:
        stage = _Staging(out.fd, hasher)
        try:
            stage.write_bytes(header)
            for t in tensors:
                x = t.produce()
                want = (DTYPES[t.dtype][0], tuple(t.shape))
                if (x.dtype, tuple(x.shape)) != want:
                    raise ConvertError(f"{path}: tensor {t.name!r} came out as {x.dtype} {tuple(x.shape)}, header says {want[0]} {want[1]} (converter bug)")
                stage.write_tensor(x, t.check)
                on_bytes(t.nbytes)
                del x
            stage.finish()
            if finalize_metadata is not None:
                final = encode_header(tensors, finalize_metadata())
                if len(final) != len(header):
                    raise ConvertError(f"{path}: final header changed length (converter bug)")
                _pwrite_all(out.fd, memoryview(final), 0)
        finally:
            stage.close()
        out.commit()
    return hasher.hexdigest() if hasher is not None else None
