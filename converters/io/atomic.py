"""Atomic output: a file that appears at its path only when complete, on Linux, macOS
and Windows.

Nothing platform-specific is imported or assumed at module level; each feature is
looked up where it is used, and its absence selects the portable way:

- Linux, with ``os.O_TMPFILE`` on a filesystem that can link one in: the data goes to
  an anonymous file in the target folder, which a killed process cannot leave behind.
  It needs the process umask, read from ``/proc/self/status`` (see :func:`process_umask`).
- Elsewhere (macOS, Windows, overlayfs, no ``/proc``): a hidden temporary name beside
  the target, ``.NAME.<random>.tmp``, created with ``O_EXCL`` and mode 0o666, so the
  operating system applies the umask (and any default ACL) as for any new file.

Either way ``commit`` fsyncs the data, gives the anonymous file its hidden name, and
renames that over the target in one step (``os.replace``), then fsyncs the folder where
a folder can be opened (``os.O_DIRECTORY``; not on Windows, whose NTFS journals the
rename).  Only the instant between that link and the rename can leave a hidden
temporary file behind when the process is killed; it then holds the complete output.
"""

from __future__ import annotations

import os


def process_umask() -> int | None:
    """The process umask, read without changing it: the ``Umask:`` line of
    ``/proc/self/status`` (Linux 4.7+).  None where it cannot be read that way.

    ``os.umask`` can only read the mask by setting it, and setting it to 0 even for an
    instant lets a file another thread creates meanwhile come out world-writable, so it
    is never called; callers without a umask use the named temporary file, whose mode
    the kernel computes itself."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _anonymous(folder: str, mode: int) -> int | None:
    """An unnamed O_TMPFILE in folder, or None where the platform or filesystem has none."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, mode)
    except OSError:
        return None


def _link_fd(fd: int, path: str) -> None:
    """Give an anonymous O_TMPFILE a name (Linux only, as O_TMPFILE is): linkat through
    /proc (works unprivileged), else linkat(fd, "", AT_EMPTY_PATH) (needs
    CAP_DAC_READ_SEARCH on older kernels, but works where /proc links are refused, as in
    some sandboxes)."""
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


def tmpfile_links(folder: str) -> bool:
    """Whether an O_TMPFILE in ``folder`` can later be linked in (some filesystems,
    such as overlayfs, refuse; other platforms have no O_TMPFILE).  Probed once per
    folder with an empty file."""
    if folder not in _LINKABLE:
        ok = False
        fd = _anonymous(folder, 0o600)
        if fd is not None:
            import secrets

            probe = os.path.join(folder, f".probe-{secrets.token_hex(6)}.tmp")
            try:
                _link_fd(fd, probe)
                os.unlink(probe)
                ok = True
            except (OSError, AttributeError):
                ok = False
            finally:
                os.close(fd)
        _LINKABLE[folder] = ok
    return _LINKABLE[folder]


def _hidden_name(folder: str, base: str) -> str:
    import secrets

    return os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")


def _open_named(folder: str, base: str) -> tuple[int, str]:
    """A new hidden file beside the target, mode 0o666 less the umask (applied by the
    operating system), binary and not inherited on Windows."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)
    for _ in range(100):
        name = _hidden_name(folder, base)
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {base} in {folder}")


def _fsync_dir(folder: str) -> None:
    """Make the rename durable: fsync the folder, where the platform can open one."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:  # Windows: a folder cannot be opened this way; NTFS journals the rename
        return
    dfd = os.open(folder, os.O_RDONLY | flag)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class AtomicOutput:
    """A file that appears at ``path`` only when complete (see the module docstring).

    ``fd`` and ``file`` (unbuffered, binary) are where the data goes.  ``commit`` makes
    it appear; used as a context manager, leaving the block without ``commit`` (an
    error) aborts, leaving any earlier file at ``path`` as it was.
    """

    def __init__(self, path: str):
        self.path = path
        self.dir = os.path.dirname(os.path.abspath(path))
        self.tmp_name: str | None = None
        self.fd: int | None = None
        if tmpfile_links(self.dir):
            umask = process_umask()
            if umask is not None:
                self.fd = _anonymous(self.dir, 0o666 & ~umask)
        if self.fd is None:
            self.fd, self.tmp_name = _open_named(self.dir, os.path.basename(path))
        self.file = os.fdopen(self.fd, "wb", buffering=0)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.fd)
        if self.tmp_name is None:
            name = _hidden_name(self.dir, os.path.basename(self.path))
            _link_fd(self.fd, name)
            self.tmp_name = name
        self.file.close()  # before the rename: Windows cannot rename an open file
        os.replace(self.tmp_name, self.path)
        self.tmp_name = None
        _fsync_dir(self.dir)

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
            self.tmp_name = None
