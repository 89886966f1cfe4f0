"""The staging writer: one file written sequentially through two page-aligned buffers,
filled by worker threads while a writer thread writes the other one.

Where each tensor's bytes go is planned by :mod:`staging_plan` (a pure function); this
module carries the plan out: copies, checks, hashing and the writes.

The writes go through :func:`write_at`, which works everywhere:

- fast path, where the platform has it (Linux): ``O_DIRECT`` turned on with ``fcntl``
  for the aligned part of every hand-over (no page-cache copy of the output: buffered
  writes of a multi-GB file followed by fsync are several times slower than the device
  on some machines), and ``os.pwrite`` at explicit offsets;
- portable path (macOS, Windows, filesystems that refuse ``O_DIRECT``): plain writes
  through the page cache; without ``os.pwrite`` a seek and a write, which is the same
  thing here because only one thread writes at a time and the data is written in file
  order (the header patch at offset 0 comes after every other write).

Nothing platform-specific is imported at module level; ``fcntl`` is imported only
where ``os.O_DIRECT`` exists.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

import numpy as np

from .staging_plan import Cursor, Geometry, HandOver, Spec, plan_tensor

STAGE_BYTES = 32 << 20  # per buffer (two are used); a multiple of ALIGN
ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the block size
WHOLE_BYTES = STAGE_BYTES - ALIGN  # a non-contiguous tensor up to this size is copied into staging in one go
PIECE_BYTES = 1 << 20  # larger copies go piece by piece (each piece checked while in the CPU cache)
FILL_THREADS = 2  # threads copying into staging (numpy releases the GIL while copying)
TILE_ROWS, TILE_BYTES = 2048, 32  # a transposing copy goes in tiles of 2048 rows x 32 bytes of the destination

Check = Callable[[np.ndarray], None]


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for fd; False where the platform (no ``os.O_DIRECT`` or
    no ``fcntl``) or the filesystem refuses."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (fl | flag) if on else (fl & ~flag))
    except OSError:
        if on:
            return False
        raise
    return on


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of data at offset: ``os.pwrite`` where the platform has it, else a
    seek and sequential writes (callers never write from two threads at once)."""
    pwrite = getattr(os, "pwrite", None)
    if pwrite is None:
        os.lseek(fd, offset, os.SEEK_SET)
    while len(data):
        n = pwrite(fd, data, offset) if pwrite is not None else os.write(fd, data)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no space left on device (short write)")
        data, offset = data[n:], offset + n


def _fill(dst: np.ndarray, src: np.ndarray, check: Check | None, piece: int) -> None:
    """Copy src into the staged region dst, then check it, piece by piece where both
    are contiguous."""
    if src.flags.c_contiguous and dst.nbytes > piece:
        d, s_ = dst.reshape(-1), src.reshape(-1)
        step = max(1, piece // dst.itemsize)
        for i in range(0, d.size, step):
            np.copyto(d[i:i + step], s_[i:i + step])
            if check is not None:
                check(d[i:i + step])
        return
    if src.ndim == 2 and src.strides[0] < src.strides[1]:  # transposed: columns are contiguous
        _copy_tiled(dst, src)
    else:
        np.copyto(dst, src)
    if check is not None:
        check(dst)


def _copy_tiled(dst: np.ndarray, src: np.ndarray) -> None:
    """A transposed 2-D copy in tall, narrow tiles (2048 rows of 32 bytes of the
    destination: a few source rows, read along their contiguous direction, while the
    destination's lines stay in the L1 cache).  numpy's element loop over a whole
    transposed matrix misses the cache on nearly every read, worst where the source's
    row stride is a multiple of 4 KiB; measured here on the gpt shapes (1280 and 5120
    wide, float32 and 16-bit): 0.4-1.3 GB/s whole, 2.4-3.9 GB/s in these tiles (torch's
    blocked transpose: 2.7)."""
    rows, cols = TILE_ROWS, max(1, TILE_BYTES // dst.itemsize)
    n, m = dst.shape
    for i in range(0, n, rows):
        for j in range(0, m, cols):
            np.copyto(dst[i:i + rows, j:j + cols], src[i:i + rows, j:j + cols])


def _apply(x: np.ndarray, steps: tuple, copies: dict) -> np.ndarray:
    """The piece of x that a plan's steps name.  ``copies`` keeps the contiguous copy
    of a strided chunk while the plan places it in parts (across a hand-over)."""
    t = x
    for k, s in enumerate(steps):
        op = s[0]
        if op == "select":
            t = t[s[1]]
        elif op == "slice":
            t = t[s[1]:s[2]]
        elif op == "flat":
            t = t.reshape(-1)[s[1]:s[2]]
        elif op == "contiguous":
            key = steps[:k + 1]
            if key not in copies:
                copies.clear()
                copies[key] = np.ascontiguousarray(t)
            t = copies[key]
        else:
            raise ValueError(f"unknown plan step {s!r}")
    return t


class Staging:
    """Sequential writer of one file through two page-aligned buffers.

    The caller's thread plans each tensor (:func:`staging_plan.plan_tensor`) and hands
    each placed piece to ``FILL_THREADS`` worker threads, which copy (and transpose) it
    into the buffer and run its ``check``; a writer thread writes the other buffer
    meanwhile.  Copies of different tensors run in parallel (a transposing copy is
    bound by memory latency, and two of them run nearly twice as fast as one).

    Every hand-over starts at a multiple of ``ALIGN`` and has a length that is one, so
    the data can go to the device with ``O_DIRECT`` where the platform and filesystem
    allow it.  The unaligned end of the file and a patched header are written through
    the page cache; the caller's fsync covers both.  Without ``O_DIRECT`` the same
    pipeline writes through the page cache.

    With a ``hasher`` (a ``hashlib`` object) the file's bytes are also hashed, in file
    order, on another thread while they are written: no second read of the output.
    ``check``, given per tensor, is called on each staged piece of it (a contiguous
    view in the output dtype).  Errors from the workers (a failed check, a write
    error) surface on the caller's thread at the next hand-over or in :meth:`finish`.
    """

    def __init__(self, fd: int, hasher=None):
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        self.geometry = Geometry.of(STAGE_BYTES, ALIGN, WHOLE_BYTES, PIECE_BYTES)
        self.fd = fd
        self.direct = set_direct(fd, True)
        stage = self.geometry.stage
        self.bufs = [mmap.mmap(-1, stage) for _ in range(2)]
        self.views = [np.frombuffer(b, dtype=np.uint8) for b in self.bufs]
        self.filling: list[list] = [[], []]  # per buffer: copy tasks into it
        self.pending: list[list] = [[], []]  # per buffer: its write (and hash)
        self.fill_pool = ThreadPoolExecutor(max_workers=FILL_THREADS, thread_name_prefix="stage-fill")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self.hasher = hasher
        self.hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="output-hash") if hasher is not None else None
        self.cur = 0  # the buffer being filled
        self.cursor = Cursor()  # bytes laid out in it, its file offset

    def _hand_over(self, a: HandOver) -> None:
        """Hand the current buffer's aligned part to the writer (and the hasher) once
        its copies are done, and carry its tail to the front of the other buffer."""
        k = self.cur
        self._settle(k)
        data = memoryview(self.bufs[k])[:a.cut]
        self.pending[k] = [self.pool.submit(self._write, data, a.offset)]
        if self.hash_pool is not None:
            self.pending[k].append(self.hash_pool.submit(self.hasher.update, data))
        self.cur = 1 - k
        self._wait(self.cur)
        if a.tail:
            self.views[self.cur][:a.tail] = self.views[k][a.cut:a.cut + a.tail]

    def _write(self, data: memoryview, offset: int) -> None:
        try:
            write_at(self.fd, data, offset)
        except OSError as e:
            if not (self.direct and e.errno == errno.EINVAL):
                raise
            # The filesystem took the flag but refuses direct writes: use the page cache.
            set_direct(self.fd, False)
            self.direct = False
            write_at(self.fd, data, offset)

    def _settle(self, k: int) -> None:
        futs, self.filling[k] = self.filling[k], []
        for f in futs:
            f.result()

    def _wait(self, k: int) -> None:
        futs, self.pending[k] = self.pending[k], []
        for f in futs:
            f.result()

    def write_bytes(self, data: bytes) -> None:
        self.write_tensor(np.frombuffer(bytearray(data), dtype=np.uint8))

    def write_tensor(self, x: np.ndarray, check: Check | None = None) -> None:
        """Append x's bytes (in row-major order, whatever its strides).  x must not
        change until the copy is done (at the hand-over of its buffer)."""
        if x.size == 0:
            return
        if any(st < 0 or st % x.itemsize for st in x.strides):
            x = np.ascontiguousarray(x)  # negative or odd strides (never made by the converter)
        spec = Spec(tuple(x.shape), tuple(st // x.itemsize for st in x.strides), x.itemsize)
        actions, self.cursor = plan_tensor(self.cursor, spec, self.geometry)
        copies: dict = {}
        for a in actions:
            if isinstance(a, HandOver):
                self._hand_over(a)
                continue
            src = _apply(x, a.view, copies)
            dst = self.views[self.cur][a.start:a.start + a.nbytes].view(src.dtype).reshape(src.shape)
            self.filling[self.cur].append(self.fill_pool.submit(_fill, dst, src, check, self.geometry.piece))

    def finish(self) -> None:
        """Write (and hash) what is left, and wait for every write."""
        k, n, offset = self.cur, self.cursor.pos, self.cursor.offset
        align = self.geometry.align
        self._settle(k)
        self._wait(1 - k)
        data = memoryview(self.bufs[k])[:n]
        if self.hasher is not None:
            self.hasher.update(data)
        aligned = n - n % align if self.direct else n
        if aligned:
            self._write(data[:aligned], offset)
            aligned = n - n % align if self.direct else n  # _write may have turned O_DIRECT off
        if self.direct:
            set_direct(self.fd, False)
        if n > aligned:
            write_at(self.fd, data[aligned:n], offset + aligned)
        self.cursor = Cursor(0, offset + n)

    def close(self) -> None:
        self.fill_pool.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True)
        if self.hash_pool is not None:
            self.hash_pool.shutdown(wait=True)
        self.views, self.bufs = [], []
        if self.direct:
            try:
                set_direct(self.fd, False)
            except OSError:
                pass
