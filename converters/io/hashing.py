"""sha256 of files, and a background service that hashes sources ahead of the conversion.

Hashing is the largest single piece of CPU work in a conversion (a 3.5 GB checkpoint
takes about 2.5 s on one core), so the CLI asks for every source's digest before it
even imports torch: :data:`SERVICE` hashes the files in the order asked for, one at a
time, while the main thread imports, plans and converts.

The hashing runs in a small child Python process (fed paths on stdin, answering
digests on stdout), not in a thread: a thread that hashes 1 MiB at a time has to win
the GIL back from the main thread twice per MiB, and while the main thread runs Python
code (imports, planning) that slowed the hash down (in a gpt conversion it finished
4.5 s in instead of 3.3 s).  Torch-free.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from concurrent.futures import Future

CHUNK = 1 << 20  # read size: small enough that the buffer stays in the CPU cache while hashed


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read through one reused buffer (reading into fresh
    multi-MB buffers was 1.5x slower here: every read faults in new pages)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])


def serve() -> None:
    """The child's loop: one JSON-encoded path per line in, "ok DIGEST" or
    "err [errno, message]" out."""
    for line in sys.stdin:
        path = json.loads(line)
        try:
            out = "ok " + sha256_file(path)
        except OSError as e:
            out = "err " + json.dumps([e.errno, e.strerror or str(e)])
        sys.stdout.write(out + "\n")
        sys.stdout.flush()


# Started isolated (-I: no environment, user site or current folder; -S: no site), with
# this package's folder put on the path, so it imports only this torch-free module.
_CHILD = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))!r}); " \
         "from converters.io.hashing import serve; serve()"


_CHILDREN: list["_Child"] = []


class _Child:
    """The hashing child process; started on first use, killed at exit."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, encoding="utf-8")
        atexit.register(self.close)
        _CHILDREN.append(self)

    def sha256(self, path: str) -> str:
        try:
            self.proc.stdin.write(json.dumps(path) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        except (OSError, ValueError):
            reply = ""
        if reply.startswith("ok "):
            return reply[3:].strip()
        if reply.startswith("err "):
            code, msg = json.loads(reply[4:])
            raise OSError(code, msg, path)
        raise OSError(f"the hashing process stopped (exit code {self.proc.wait()})")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _key(path: str) -> tuple:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the hashing child for ever
        raise OSError(errno.EINVAL, "not a regular file; not hashed", path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


class HashService:
    """Hashes requested files one at a time, in request order, in the child process
    (a daemon thread here hands it the paths and collects the digests).

    A file asked for twice (same real path, size, mtime and inode) is hashed once.
    A process that stops early (an error) does not wait: the child is killed at exit.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queue: list[tuple[str, Future]] = []
        self._futures: dict[tuple, Future] = {}
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def request(self, path: str) -> Future:
        """A future for ``path``'s digest; hashing starts when the files asked for
        earlier are done.  The future raises the OSError if the file cannot be read."""
        try:
            key = _key(path)
        except OSError as e:
            f: Future = Future()
            f.set_exception(e)
            return f
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                fut = self._futures[key] = Future()
                self._queue.append((path, fut))
                self._wake.notify()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="source-hash", daemon=True)
                    self._thread.start()
            return fut

    def prefetch(self, paths) -> None:
        for p in paths:
            if p and os.path.isfile(p):
                self.request(p)

    def digest(self, path: str) -> str:
        return self.request(path).result()

    def _run(self) -> None:
        child = None
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                path, fut = self._queue.pop(0)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if child is None or not child.alive():
                    child = _Child()  # first use, or the last one stopped
                fut.set_result(child.sha256(path))
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits)
                with self._lock:  # a failure is not remembered: asking again retries
                    self._futures = {k: f for k, f in self._futures.items() if f is not fut}
                fut.set_exception(e)


SERVICE = HashService()


def shutdown() -> None:
    """Stop the hashing child now (also done at exit)."""
    for c in list(_CHILDREN):
        c.close()
