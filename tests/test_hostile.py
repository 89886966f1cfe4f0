"""Hostile and broken inputs: refused clearly, nothing written, no pickle ever runs.

The corpus comes from tests/hostile.py; one test per case asserts the exact outcome.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from tests import hostile
from tests.helpers import ROOT, assert_refused, back_to_upstream, run_cli


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return hostile.base(str(tmp_path_factory.mktemp("good") / "bigvgan"))


def _refused(tmp_path, src, *needles):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / "bigvgan.safetensors"
    existing.write_bytes(b"earlier output")
    p = run_cli("bigvgan", src, existing, "--force", expect=None)
    assert_refused(p, *needles)
    assert existing.read_bytes() == b"earlier output"
    assert os.listdir(out_dir) == ["bigvgan.safetensors"]  # nothing new left behind
    return p


CASES = [
    ("empty", ("empty",)),
    ("truncated_pth", ("damaged",)),
    ("truncated_safetensors", ("truncated",)),
    ("random_bytes", ("not a safetensors file or a torch checkpoint",)),
    ("lfs_pointer", ("git-lfs pointer", "git lfs pull")),
    ("html_page", ("HTML",)),
    ("pickle_import", ("refused", "not run")),
    ("lying_storage", ("declares", "zip record holds")),
    ("st_header_past_end", ("runs past the end",)),
    ("st_header_oversized", ("over the 100000000 limit",)),
    ("st_overlap", ("overlaps",)),
    ("st_gap", ("gap",)),
    ("st_duplicate_key", ("duplicate key 'conv_pre.bias'",)),
    ("st_metadata_tensor", ("__metadata__",)),
    ("st_trailing", ("trailing bytes",)),
    ("st_bad_dtype", ("unsupported dtype 'C64'",)),
    ("unsupported_dtype_pth", ("conv_pre.bias", "unsupported dtype")),
]


@pytest.mark.parametrize("case,needles", CASES, ids=[c for c, _ in CASES])
def test_refused(tmp_path, good, case, needles):
    src = getattr(hostile, case)(str(tmp_path / "src"), good)
    p = _refused(tmp_path, src, *needles)
    assert str(src) in p.stderr or os.path.basename(src) in p.stderr  # names the file


def test_pickle_payload_never_runs(tmp_path, good, monkeypatch):
    marker = tmp_path / "PWNED"
    src = hostile.pickle_payload(str(tmp_path / "src"), good, str(marker))
    # Even with the environment variable that turns torch's default off.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _refused(tmp_path, src, "refused", "not run")
    p = run_cli("inspect", src, expect=None)
    assert_refused(p, "refused")
    assert not marker.exists()


def _converted_equals_good(tmp_path, src, good):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_cli("bigvgan", src, a, "--quiet")
    run_cli("bigvgan", good, b, "--quiet")
    ta, tb = back_to_upstream(str(a)), back_to_upstream(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_legacy_pth_converts(tmp_path, good):
    _converted_equals_good(tmp_path, hostile.legacy_pth(str(tmp_path / "src"), good), good)


def test_compressed_records_convert_without_mmap(tmp_path, good):
    _converted_equals_good(tmp_path, hostile.compressed_records(str(tmp_path / "src"), good), good)


def _run_limited(args, limit_bytes: int, ignore_sigxfsz: bool):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN if ignore_sigxfsz else signal.SIG_DFL)

    return subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, preexec_fn=pre)


@pytest.fixture(scope="module")
def half_output(tmp_path_factory, good):
    """Half the size of the good output: a write limit that trips inside the data."""
    out = tmp_path_factory.mktemp("full") / "o.safetensors"
    run_cli("bigvgan", os.path.dirname(good), out, "--quiet")
    return os.path.getsize(out) // 2


def test_disk_full_mid_write(tmp_path, good, half_output):
    """Writes fail part-way (EFBIG stands in for ENOSPC): clean error, old output intact."""
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"earlier output")
    p = _run_limited(["bigvgan", os.path.dirname(good), out, "--force"], half_output, ignore_sigxfsz=True)
    assert_refused(p, "write failed")
    assert out.read_bytes() == b"earlier output"
    assert os.listdir(tmp_path) == ["o.safetensors"]


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import converters.safetensors_io as stio
where = {where!r}
if where == "data":  # die while producing the 10th tensor, half the data written
    orig_layout = stio.layout
    def layout(ts):
        ts = orig_layout(ts)
        victim = ts[min(10, len(ts) - 1)]
        victim.produce = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return ts
    stio.layout = layout
else:  # die at the fsync before the rename: every byte written, nothing committed
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
from converters.cli import main
main({args!r})
"""


@pytest.fixture(params=["tmp", "repo"])
def out_dir(request, tmp_path):
    """Two folders: pytest's tmp and one inside the checkout (filesystems differ in
    whether an O_TMPFILE can be linked in; see AtomicOutput)."""
    if request.param == "tmp":
        d = tmp_path / "out"
        d.mkdir()
        yield d
    else:
        import shutil
        import tempfile

        d = tempfile.mkdtemp(prefix=".killtest-", dir=ROOT)
        yield __import__("pathlib").Path(d)
        shutil.rmtree(d)


@pytest.mark.parametrize("where", ["data", "fsync"])
def test_killed_mid_write(good, where, out_dir):
    """SIGKILL part-way through writing: no partial file at the output path and an
    earlier output untouched.  Where the filesystem lets an O_TMPFILE be linked in,
    nothing at all is left behind; elsewhere at most a hidden .tmp file."""
    from converters import safetensors_io as stio

    out = out_dir / "o.safetensors"
    out.write_bytes(b"earlier output")
    code = KILLER.format(root=ROOT, where=where, args=["bigvgan", os.path.dirname(good), str(out), "--force", "--quiet"])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert out.read_bytes() == b"earlier output"
    left = sorted(os.listdir(out_dir))
    if stio._tmpfile_links(str(out_dir)):
        assert left == ["o.safetensors"]
    else:
        assert left[-1] == "o.safetensors" and all(n.startswith(".o.safetensors.") and n.endswith(".tmp") for n in left[:-1])
