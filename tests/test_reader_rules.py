"""The torch-free reader never disagrees with torch, never loops, never fails with an
internal error (issue 23): one test per archive rule (hand-forged zips), deep and cyclic
containers, BUILD state that hides an OrderedDict method, and special files where a
checkpoint should be.  The property tests are in test_fuzz.py."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest
import torch

from converters.io import sources
from converters.errors import ConvertError
from converters.io.pth_reader import check_zip, load_arrays, open_archive
from converters.io.sources import open_source
from tests import hostile
from tests.helpers import ROOT, assert_refused, run_cli

PEAK_LIMIT = 512 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A torch.save file: two float tensors and an int one."""
    path = str(tmp_path_factory.mktemp("ckpt") / "good.pth")
    torch.save({"a": torch.arange(6.0), "b": torch.ones(3, dtype=torch.int64), "c": torch.full((2,), 7.0)}, path)
    return path


def _read(path: str) -> dict[str, bytes]:
    with open_source(path) as src:
        return {n: src.get(n).tobytes() for n in src.names()}


def _torch(path: str) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def _refused(path: str, *needles: str) -> str:
    with pytest.raises(ConvertError) as e:
        open_source(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------ zip records


def test_forged_zip_writer_is_sound(ckpt, tmp_path):
    """The forger, telling the truth, writes what torch.save writes (flag bit 3, data
    descriptors, zip64 end record) and both readers read it; with sizes in the local
    header (bit 3 clear), or zip64 local fields, too."""
    recs = hostile.torch_records(ckpt)
    for flags in (0x808, 0x800):
        p = hostile.forge_zip(str(tmp_path / f"f{flags}.pth"), recs, flags=flags)
        assert _read(p) == _torch(p) == _torch(ckpt)
    zip64 = [hostile.ZipRecord(r.name, r.data, local={"csize": 0xFFFFFFFF, "usize": 0xFFFFFFFF},
                               extra=struct.pack("<HHQQ", 1, 16, len(r.data), len(r.data))) for r in recs]
    p = hostile.forge_zip(str(tmp_path / "zip64.pth"), zip64, flags=0x800)
    assert _read(p) == _torch(p) == _torch(ckpt)
    # torch.save itself writes zeros and a descriptor, exactly as the forger does
    raw = open(ckpt, "rb").read()
    assert struct.unpack_from("<H", raw, 6)[0] & 8 and struct.unpack_from("<III", raw, 14) == (0, 0, 0)


def _forge(ckpt, tmp_path, edit, **kw) -> str:
    recs = hostile.torch_records(ckpt)
    prefix = recs[0].name.split("/")[0]
    edit(recs, prefix)
    return hostile.forge_zip(str(tmp_path / "forged.pth"), recs, **kw)


def _find(recs, prefix, name):
    return next(r for r in recs if r.name == f"{prefix}/{name}")


def _dup(name, data=None, upper=False):
    def edit(recs, prefix):
        r = _find(recs, prefix, name)
        recs.append(hostile.ZipRecord(r.name.upper() if upper else r.name, r.data if data is None else data))
    return edit


def _lie(record, where, **fields):
    def edit(recs, prefix):
        getattr(_find(recs, prefix, record), where).update(fields)
    return edit


def _descriptor(name, value):
    def edit(recs, prefix):
        _find(recs, prefix, name).descriptor = value
    return edit


def _overlap(recs, prefix):
    """data/1's bytes are a complete record (local header and bytes) named data/7, and
    the central directory lists data/7 there: names, sizes and CRCs all agree, only the
    records overlap."""
    _find(recs, prefix, "data/1").data = hostile.local_header(f"{prefix}/data/7", bytes(8))
    recs.append(hostile.ZipRecord(f"{prefix}/data/7", bytes(8), central={"offset": f"{prefix}/data/1"}))


BIT3 = 0x808  # torch.save's flags; 0x800: sizes in the local header
ZIP_RULES = {
    "storage-twice": (_dup("data/0", data=bytes(24)), ("data/0 appears twice",), BIT3),
    "storage-twice-same-bytes": (_dup("data/0"), ("data/0 appears twice",), BIT3),
    "data.pkl-twice": (_dup("data.pkl"), ("data.pkl appears twice",), BIT3),
    "version-twice": (_dup("version"), ("version appears twice",), BIT3),
    "case-only": (_dup("data/0", upper=True), ("DATA/0", "differ only in case"), BIT3),
    "local-name": (_lie("data/0", "local", name=b"good/data/9"), ("data/0", "local header names it 'good/data/9'"), BIT3),
    "local-crc": (_lie("data/0", "local", crc=1), ("data/0", "local header gives CRC 00000001"), 0x800),
    "local-csize": (_lie("data/0", "local", csize=20), ("data/0", "20 bytes compressed"), 0x800),
    "local-usize": (_lie("data/0", "local", usize=20), ("data/0", "local header gives"), 0x800),
    "local-zip64-usize": (_lie("data/0", "local", usize=0xFFFFFFFF), ("data/0", "local header gives"), 0x800),
    "local-method": (_lie("data/0", "local", method=8), ("data/0", "compression method 8"), BIT3),
    "bit3-local-only": (_lie("data/0", "local", flags=0x800), ("data/0", "flag bit 3"), BIT3),
    "bit3-central-only": (_lie("data/0", "central", flags=0x800), ("data/0", "flag bit 3"), BIT3),
    "bit3-local-value-wrong": (_lie("data/0", "local", usize=99), ("data/0", "local header gives"), BIT3),
    "descriptor-wrong": (_descriptor("data/0", struct.pack("<IIII", 0x08074B50, 0, 24, 24)), ("data/0", "data descriptor"), BIT3),
    "descriptor-missing": (_descriptor("data/0", b""), ("data/0", "data descriptor"), BIT3),
    "central-sizes": (_lie("data/0", "central", usize=12, csize=12), ("data/0", "data descriptor"), BIT3),
    "central-sizes-no-bit3": (_lie("data/0", "central", usize=12, csize=12), ("data/0", "local header gives"), 0x800),
    "central-offset": (_lie("data/1", "central", offset=0), ("data/1", "local header names it"), BIT3),
    "overlap": (_overlap, ("data/1 and", "data/7 overlap"), 0x800),
}


@pytest.mark.parametrize("case", list(ZIP_RULES))
def test_zip_rules(ckpt, tmp_path, case):
    """Each forged archive is refused, naming the record, before anything is unpickled."""
    edit, needles, flags = ZIP_RULES[case]
    _refused(_forge(ckpt, tmp_path, edit, flags=flags), *needles)


def test_local_values_beside_bit3_are_allowed(ckpt, tmp_path):
    """With flag bit 3 the local header may also carry the true values (some writers
    do): read as torch reads it."""
    def edit(recs, prefix):
        import zlib

        for r in recs:
            r.local.update(crc=zlib.crc32(r.data), csize=len(r.data), usize=len(r.data))
    path = _forge(ckpt, tmp_path, edit)
    assert _read(path) == _torch(path) == _torch(ckpt)


def test_zip_whole_archive_rules(ckpt, tmp_path):
    """The end records and the central directory: the count, where the directory is,
    bytes after the end, the folder of data.pkl, the format version record."""
    recs = hostile.torch_records(ckpt)
    p = str(tmp_path / "z.pth")
    _refused(hostile.forge_zip(p, recs, count=len(recs) + 1), f"counts {len(recs) + 1} records", f"holds {len(recs)}")
    _refused(hostile.forge_zip(p, recs, cd_offset=10), "central directory is not where the end record says")
    _refused(hostile.forge_zip(p, recs, tail=b"junk"), "4 bytes after the zip archive's end record")
    moved = [hostile.ZipRecord("other/x", b"1")] + recs
    _refused(hostile.forge_zip(p, moved), "data.pkl is not in other/")
    assert _torch_error(p)  # torch looks in other/ too (other/version first): refused
    for version, ok in ((b"3\n", True), (b"10\n", True), (b"11\n", False), (b"0\n", False), (b"x\n", False), (None, False)):
        edited = [r if not r.name.endswith("/version") else hostile.ZipRecord(r.name, version) for r in recs
                  if version is not None or not r.name.endswith("/version")]
        hostile.forge_zip(p, edited)
        if ok:
            assert _read(p) == _torch(p)
        else:
            _refused(p, "version")
            assert _torch_error(p)  # refused by torch too


def _torch_error(path: str) -> str:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        return str(e)
    return ""


def test_load_arrays_uses_the_validated_records(ckpt, tmp_path):
    """load_arrays reads the records open_archive validated (never zipfile's own pick of
    two under one name): given none, it validates the archive itself."""
    path = _forge(ckpt, tmp_path, _dup("data/0", data=bytes(24)))
    with pytest.raises(ConvertError, match="appears twice"):
        load_arrays(path, mapped=True)
    with pytest.raises(ConvertError, match="appears twice"):
        check_zip(path)
    good = open_archive(ckpt)
    assert set(good.records) == {i.filename for i in zipfile.ZipFile(ckpt).infolist()}


# ------------------------------------------------------------------ deep and cyclic containers


def _body(ckpt):
    return hostile.state_dict_ops(ckpt)


NESTED = {
    "deep-wrappers": (lambda b: hostile.nested_wrappers(b, 20_000), "wrappers nest dicts 33 deep"),
    "deep-net": (lambda b: b"\x80\x02}" + hostile.op_str("net") + b"".join([b"}" + hostile.op_str("a")] * 20_000) + b
                 + b"s" * 20_001 + b".", "nests dicts 33 deep"),
    "self-reference": (lambda b: hostile.self_wrapper(), "holds a dict met above it"),
    "mutual-reference": (lambda b: hostile.mutual_wrappers(), "holds a dict met above it"),
    "shared-dict": (lambda b: b"\x80\x02}" + hostile.op_str("net") + b"}(" + hostile.op_str("x") + b
                    + b"q\x80" + hostile.op_str("y") + b"h\x80us.", "is a dict met before"),
    "deep-tuple-key": (lambda b: hostile.deep_tuple_key(1_000_000), "nests tuples over 32 deep"),
}


@pytest.mark.parametrize("case", list(NESTED))
def test_deep_and_cyclic_refused(ckpt, tmp_path, monkeypatch, case):
    """Refused with a one-line ConvertError by both paths (the torch-free reader, and
    torch.load's result walked the same way), in bounded time."""
    make, needle = NESTED[case]
    path = hostile.with_pickle(ckpt, str(tmp_path / f"{case}.pth"), make(_body(ckpt)))
    t = time.perf_counter()
    _refused(path, needle)
    assert time.perf_counter() - t < 20
    if case != "deep-tuple-key":  # torch.load would crash Python on hashing it: the scan refuses it first
        monkeypatch.setattr(sources, "FORCE_TORCH_READER", True)
        _refused(path, needle)


def test_legacy_checkpoint_pickles_are_scanned_first(ckpt, tmp_path):
    """A legacy (non-zip) file goes to torch.load, which would crash on hashing a deep
    tuple: its pickles are scanned first, and a good one still reads as torch reads it."""
    legacy = str(tmp_path / "legacy.pth")
    torch.save(torch.load(ckpt, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert _read(legacy) == _torch(ckpt)
    deep = hostile.legacy_with_object(legacy, str(tmp_path / "deep.pth"), hostile.deep_tuple_key(1_000_000))
    _refused(deep, "legacy checkpoint's pickle nests tuples over 32 deep")


def test_deep_list_beside_the_wrapper_is_read_as_torch_reads_it(ckpt, tmp_path):
    """Depth limits apply to what is walked: a list 100,000 deep beside the wrapper is
    dropped, never walked, and the tensors are torch's."""
    path = hostile.with_pickle(ckpt, str(tmp_path / "deep-list.pth"), hostile.deep_list_beside(_body(ckpt), 100_000))
    with open_source(path) as src:
        assert list(src.dropped) == ["junk"]
        assert {n: src.get(n).tobytes() for n in src.names()} == _torch(ckpt)


NESTED_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from click.testing import CliRunner
from converters.cli import commands as cli
out = []
for src, dst in {jobs!r}:
    t = time.perf_counter()
    r = CliRunner().invoke(cli.main, ["bigvgan", src, dst, "--force"], catch_exceptions=False)
    out.append([r.exit_code, r.stderr, time.perf_counter() - t])
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps([out, hwm]))
"""


@pytest.fixture(scope="module")
def bigvgan(tmp_path_factory) -> str:
    return hostile.base(str(tmp_path_factory.mktemp("good") / "bigvgan"))


def test_nested_refused_by_the_cli_in_bounded_memory(bigvgan, tmp_path):
    """Through the CLI: each case a one-line `error:` (never `internal error`), nothing
    written, and the converting process (a child, its own VmHWM) under 512 MiB."""
    body = hostile.state_dict_ops(bigvgan)
    jobs, cases = [], dict(NESTED)
    for case, (make, needle) in NESTED.items():
        src = hostile._sibling(str(tmp_path / case), "bigvgan_generator.pt", b"", bigvgan)
        hostile.with_pickle(bigvgan, src, make(body))
        jobs.append((src, str(tmp_path / f"{case}.safetensors")))
    legacy = hostile.legacy_pth(str(tmp_path / "legacy"), bigvgan)  # torch.load would crash on it
    hostile.legacy_with_object(legacy, legacy, hostile.deep_tuple_key(1_000_000))
    jobs.append((legacy, str(tmp_path / "legacy.safetensors")))
    cases["legacy-deep-tuple-key"] = (None, "nests tuples over 32 deep")
    p = subprocess.run([sys.executable, "-c", NESTED_CHILD.format(root=ROOT, jobs=jobs)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    results, peak = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for (case, (_, needle)), (code, stderr, seconds), (src, dst) in zip(cases.items(), results, jobs):
        assert_refused(subprocess.CompletedProcess([], code, "", stderr), src, needle)
        assert "internal error" not in stderr and stderr.count("\n") == 1, stderr
        assert not os.path.exists(dst) and seconds < 30, (case, seconds)
    assert peak < PEAK_LIMIT, f"peak resident memory {peak >> 20} MiB"


# ------------------------------------------------------------------ BUILD state on an OrderedDict


def _metadata_ops(attrs: dict) -> bytes:
    """BUILD ops setting ``attrs`` (names -> small ints) on the OrderedDict below."""
    return b"}(" + b"".join(hostile.op_str(k) + b"K" + bytes([v]) for k, v in attrs.items()) + b"ub"


HIDING = {"items": 1, "values": 2, "keys": 3, "__len__": 4, "__iter__": 5, "get": 6, "_metadata": 7}


@pytest.mark.parametrize("where", ["state-dict", "wrapper"])
def test_build_hiding_methods_changes_nothing(ckpt, tmp_path, monkeypatch, where):
    """A BUILD that sets `items`, `values`, `keys` (and dunders) as instance attributes
    of an OrderedDict, which torch's weights-only unpickler allows too: both readers give
    torch.load's tensors; nothing calls a method looked up on the object."""
    sd = collections.OrderedDict(a=torch.arange(6.0), b=torch.ones(3, dtype=torch.int64))
    obj = sd if where == "state-dict" else collections.OrderedDict(model=sd)
    good = str(tmp_path / "good.pth")
    torch.save(obj, good)
    with zipfile.ZipFile(good) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    head = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01"
    assert pkl.startswith(head)
    forged = head + _metadata_ops(HIDING) + pkl[len(head):]
    path = hostile.with_pickle(good, str(tmp_path / "build.pth"), forged)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert theirs.items == 1 and theirs.values == 2  # torch keeps them, as attributes
    inner = theirs if where == "state-dict" else dict.__getitem__(theirs, "model")
    want = {k: v.numpy().tobytes() for k, v in dict.items(inner)}
    assert _read(path) == want
    monkeypatch.setattr(sources, "FORCE_TORCH_READER", True)
    assert _read(path) == want


def test_ordered_dict_built_from_one_with_hidden_keys(ckpt, tmp_path):
    """OrderedDict(od) where od's BUILD set `keys = 3`: Python calls the attribute, in
    torch.load as here; both refuse, ours with a one-line ConvertError."""
    od = b"ccollections\nOrderedDict\nq\x00)Rq\x01" + _metadata_ops({"keys": 3})
    pkl = b"\x80\x02ccollections\nOrderedDict\n" + od + b"\x85R."
    path = hostile.with_pickle(ckpt, str(tmp_path / "keys.pth"), pkl)
    assert "not callable" in _torch_error(path)
    _refused(path, "damaged data.pkl (TypeError")


def test_parameter_with_python_state_goes_to_torch(tmp_path):
    """setattr of `data` on a Parameter replaces its tensor: a Parameter saved with
    Python state is read by torch.load, whose bytes the source then holds."""
    p = torch.nn.Parameter(torch.full((2,), 5.0))
    p.note = "x"
    path = str(tmp_path / "state.pth")
    torch.save({"p": p, "q": torch.arange(3.0)}, path)
    with open_source(path) as src:
        assert any("torch.load" in n and "Python state" in n for n in src.notes), src.notes
        assert {n: src.get(n).tobytes() for n in src.names()} == _torch(path)


# ------------------------------------------------------------------ special files


def _short_dir() -> str:
    """A folder with a short path (a Unix socket's path is at most 107 bytes)."""
    return tempfile.mkdtemp(prefix="rr-", dir="/tmp")


def _special(kind: str, path: str):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "null":
        os.symlink("/dev/null", path)
    elif kind == "zero":
        os.symlink("/dev/zero", path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        return s
    elif kind == "folder":
        os.mkdir(path)
    return None


SPECIAL = {"fifo": "a FIFO", "null": "a character device", "zero": "a character device", "socket": "a socket",
           "folder": "is a folder"}


@contextlib.contextmanager
def _no_hang(seconds: int = 20):
    """Fail instead of hanging should something open a FIFO (SIGALRM interrupts the open)."""
    def fail(*_):
        raise TimeoutError("blocked: a FIFO was opened")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_special_file_refused_never_opened(kind):
    """open_source, a per-model folder and an explicit path: refused as not a regular
    file, naming the path, without opening it (a FIFO with no writer would block)."""
    d = _short_dir()
    sock = None
    try:
        path = os.path.join(d, "gpt.pth")
        sock = _special(kind, path)
        shutil.copy(os.path.join(ROOT, "demo", "release", "config.yaml"), d)
        with _no_hang():
            with pytest.raises(ConvertError, match=SPECIAL[kind]) as e:
                open_source(path)
            assert path in str(e.value)
            for src in (d, path) if kind != "folder" else (d,):  # a folder SRC is looked into
                p = run_cli("gpt", src, os.path.join(d, "out.safetensors"), expect=None)
                assert_refused(p, path, SPECIAL[kind])
    finally:
        if sock is not None:
            sock.close()
        shutil.rmtree(d)


def _release_with(root, name: str = "gpt.pth") -> str:
    """The demo release, linked entry by entry, without ``name`` (for a special file)."""
    rel = os.path.join(str(root), "release")
    os.mkdir(rel)
    demo = os.path.join(ROOT, "demo", "release")
    for entry in os.listdir(demo):
        if entry != name:
            os.symlink(os.path.join(demo, entry), os.path.join(rel, entry))
    return rel


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_release_with_a_special_gpt_is_refused_quickly(kind):
    """`convert.py all` on a release whose gpt.pth is a FIFO (or a device, a socket, a
    folder): it returns at once with the error, naming the path (not "not found"), and
    writes nothing."""
    d = _short_dir()
    try:
        rel = _release_with(d)
        sock = _special(kind, os.path.join(rel, "gpt.pth"))
        out = os.path.join(d, "out")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "all", "--src", rel, "--out", out],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert_refused(p, os.path.join(rel, "gpt.pth"), SPECIAL[kind])
        assert "not found" not in p.stderr and "internal error" not in p.stderr
        assert time.perf_counter() - t < 60 and not os.path.exists(out)
        if sock is not None:
            sock.close()
    finally:
        shutil.rmtree(d)


def test_release_with_a_special_config_is_refused(tmp_path):
    """A FIFO config.yaml is refused as not a regular file, not read (it would hang)."""
    rel = _release_with(tmp_path, "config.yaml")
    os.mkfifo(os.path.join(rel, "config.yaml"))
    with _no_hang():
        p = run_cli("all", "--src", rel, "--out", tmp_path / "out", expect=None)
    assert_refused(p, os.path.join(rel, "config.yaml"), "a FIFO")


def test_special_file_in_a_bundled_folder_is_refused(tmp_path):
    """A FIFO inside the emotion classifier's folder would hang the copy and the hash."""
    rel = tmp_path / "release"
    shutil.copytree(os.path.join(ROOT, "demo", "release"), rel, symlinks=True)
    os.mkfifo(rel / "qwen0.6bemo4-merge" / "extra.bin")
    with _no_hang(60):
        p = run_cli("all", "--src", rel, "--out", tmp_path / "out", "--quiet", expect=None)
    assert_refused(p, str(rel / "qwen0.6bemo4-merge" / "extra.bin"), "a FIFO")


@pytest.mark.parametrize("kind", ["fifo", "null", "socket"])
def test_check_refuses_a_special_canonical_file_without_opening_it(kind, demo_bundle):
    """``check`` on a canonical path (given, or found in a folder) that is a FIFO, a
    device or a socket: one error naming it, exit 1, never opened."""
    from converters.cli.check import check_paths

    d = _short_dir()
    sock = None
    try:
        folder = os.path.join(d, "b")
        shutil.copytree(demo_bundle, folder)
        sock = _special(kind, os.path.join(folder, "x.safetensors"))
        alone = os.path.join(d, "y.safetensors")
        if kind == "fifo":
            os.mkfifo(alone)
        else:
            alone = os.path.join(folder, "x.safetensors")
        errs = []
        with _no_hang():
            rc = check_paths([folder, alone], echo=lambda m: None, echo_err=errs.append)
        assert rc == 1
        refused = {e.split(":")[1].strip() for e in errs if "not a regular file" in e and "refused without opening" in e}
        assert refused == {os.path.join(folder, "x.safetensors"), alone}, errs
    finally:
        if sock is not None:
            sock.close()
        shutil.rmtree(d)
