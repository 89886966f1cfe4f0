"""The source-hashing service: a child process hashes files in request order (issue 8)."""

from __future__ import annotations

import hashlib

import pytest

from converters.io import hashing


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_digests_match_hashlib_in_request_order(tmp_path):
    svc = hashing.HashService()
    files = []
    for i, (name, size) in enumerate([("plain.bin", 0), ("with space.bin", 5), ("new\nline é.bin", (3 << 20) + 7)]):
        p = tmp_path / name
        p.write_bytes(bytes((j * 31 + i) % 251 for j in range(size)))
        files.append(p)
    futs = [svc.request(str(p)) for p in files]
    assert [f.result(timeout=60) for f in futs] == [_sha(p) for p in files]
    assert svc.request(str(files[1])) is futs[1]  # same file, same size and mtime: hashed once
    assert hashing.sha256_file(str(files[2])) == _sha(files[2])


def test_changed_file_is_hashed_again(tmp_path):
    svc = hashing.HashService()
    p = tmp_path / "f.bin"
    p.write_bytes(b"one")
    assert svc.digest(str(p)) == _sha(p)
    p.write_bytes(b"two, longer")
    assert svc.digest(str(p)) == _sha(p)


def test_missing_and_unreadable_files_raise(tmp_path):
    svc = hashing.HashService()
    with pytest.raises(FileNotFoundError):
        svc.digest(str(tmp_path / "nope"))
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(OSError):  # a folder: the child's open/read fails and says why
        svc.digest(str(d))


def test_a_killed_child_is_replaced(tmp_path):
    svc = hashing.HashService()
    p = tmp_path / "a.bin"
    p.write_bytes(b"a" * 1000)
    assert svc.digest(str(p)) == _sha(p)
    hashing.shutdown()  # kills every child, as at exit
    q = tmp_path / "b.bin"
    q.write_bytes(b"b" * 1000)
    assert svc.digest(str(q)) == _sha(q)
