"""Hostile and broken inputs: refused clearly, nothing written, no pickle ever runs.

The corpus comes from tests/hostile.py; one test per case asserts the exact outcome.
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from tests import hostile
from tests.helpers import ROOT, assert_refused, back_to_upstream, python_c, run_cli


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
    ("random_bytes_brace", ("safetensors header claims", "over the")),
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


# ``python convert.py ARGS`` run by python_c (a child forked with torch imported: tests/helpers.py)
CONVERT_PY = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_limited(args, limit_bytes: int, ignore_sigxfsz: bool):
    """convert.py in a child whose RLIMIT_FSIZE is ``limit_bytes``."""
    return python_c(CONVERT_PY, os.path.join(ROOT, "convert.py"), *args, fsize=limit_bytes, ignore_sigxfsz=ignore_sigxfsz)


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
import converters.io.st_write as st_write
where = {where!r}
if where == "data":  # die while producing the 10th tensor, half the data written
    orig_layout = st_write.layout
    def layout(ts):
        ts = orig_layout(ts)
        victim = ts[min(10, len(ts) - 1)]
        victim.produce = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return ts
    st_write.layout = layout
elif where == "fsync":  # die at the fsync before the rename: every byte written, nothing committed
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
else:  # die at the rename: the finished file already has its hidden name
    os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from converters.cli.commands import main
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


@pytest.mark.parametrize("where", ["data", "fsync", "replace"])
def test_killed_mid_write(good, where, out_dir):
    """SIGKILL part-way through writing: no partial file at the output path and an
    earlier output untouched.  Where the filesystem lets an O_TMPFILE be linked in,
    nothing at all is left behind; elsewhere at most a hidden .tmp file.  Killed at the
    rename itself, the finished file is left under its hidden name on both paths."""
    from converters.io import atomic

    out = out_dir / "o.safetensors"
    out.write_bytes(b"earlier output")
    code = KILLER.format(root=ROOT, where=where, args=["bigvgan", os.path.dirname(good), str(out), "--force", "--quiet"])
    p = python_c(code)  # a child process, forked with torch imported (tests/helpers.py)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert out.read_bytes() == b"earlier output"
    left = sorted(os.listdir(out_dir))
    if where == "replace":
        # The one window a kill leaves a file in, on either path (README): the hidden
        # name, holding the complete output.
        from converters.format.st_header import read_header

        assert len(left) == 2 and left[0].startswith(".o.safetensors.") and left[0].endswith(".tmp"), left
        assert read_header(str(out_dir / left[0])).metadata["model"] == "bigvgan"
    elif atomic.tmpfile_links(str(out_dir)) and atomic.process_umask() is not None:
        assert left == ["o.safetensors"]
    else:
        assert left[-1] == "o.safetensors" and all(n.startswith(".o.safetensors.") and n.endswith(".tmp") for n in left[:-1])


# ------------------------------------------------------------------ zip bombs (issue 15)

BOMBS = [
    ("pickle_bomb", ("archive/data.pkl", "declares 3.0 GiB", "over the 16.0 MiB limit", "zip bomb", "refused before reading it")),
    ("pickle_bomb_lying", ("archive/data.pkl", "inflates past its declared 4096 bytes", "zip bomb")),
    ("storage_bomb", ("compressed storages inflate to 1.0 GiB from 1.0 MiB", "zip bomb", "refused before inflating")),
]

BOMB_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from click.testing import CliRunner
from converters.cli import commands as cli
out = []
for src, dst in {jobs!r}:
    r = CliRunner().invoke(cli.main, ["bigvgan", src, dst, "--force"], catch_exceptions=False)
    out.append([r.exit_code, r.stderr])
# VmHWM: this process image's peak resident memory (reset by exec, unlike ru_maxrss, which
# keeps the forking parent's size from before the exec)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps([out, hwm]))
"""

PEAK_LIMIT = 512 << 20


def test_zip_bombs_refused_in_bounded_memory(tmp_path, good):
    """A 3 MB checkpoint whose data.pkl inflates to 3 GiB (declared truthfully, or as
    4 KiB), and a 1 MB one with a 1 GiB deflated storage: each refused with its reason,
    nothing written, and the converting process (a child, its own VmHWM) never above
    512 MiB resident, torch included."""
    import json

    jobs, outs = [], []
    for case, _ in BOMBS:
        src = getattr(hostile, case)(str(tmp_path / case), good)
        out_dir = tmp_path / f"{case}-out"
        out_dir.mkdir()
        (out_dir / "bigvgan.safetensors").write_bytes(b"earlier output")
        jobs.append((src, str(out_dir / "bigvgan.safetensors")))
        outs.append(out_dir)
    with open(tmp_path / "stdout", "wb") as so, open(tmp_path / "stderr", "wb") as se:
        child = subprocess.run([sys.executable, "-c", BOMB_CHILD.format(root=ROOT, jobs=jobs)], stdout=so, stderr=se, cwd=ROOT)
    assert child.returncode == 0, (tmp_path / "stderr").read_text()
    results, peak = json.loads((tmp_path / "stdout").read_text().strip().splitlines()[-1])
    for (case, needles), (code, stderr), (src, _), out_dir in zip(BOMBS, results, jobs, outs):
        assert_refused(subprocess.CompletedProcess([], code, "", stderr), src, *needles)
        assert os.listdir(out_dir) == ["bigvgan.safetensors"]
        assert (out_dir / "bigvgan.safetensors").read_bytes() == b"earlier output"
    assert peak < PEAK_LIMIT, f"peak resident memory {peak >> 20} MiB"


def test_inflation_limits_leave_real_checkpoints_alone(tmp_path, good, monkeypatch):
    """The ratio rule refuses storages that compress like zeros only beyond the
    allowance: the deflated bigvgan (random weights) passes with the allowance at zero,
    a deflated checkpoint of zeros does not."""
    from converters.io import pth_reader
    from converters.errors import ConvertError
    from converters.io.sources import open_source

    monkeypatch.setattr(pth_reader, "INFLATE_ALLOWANCE", 0)
    with open_source(hostile.compressed_records(str(tmp_path / "real"), good)) as src:
        assert src.names()
    zeros = tmp_path / "zeros" / "bigvgan_generator.pt"
    zeros.parent.mkdir()
    sd = torch.load(good, weights_only=True)
    torch.save({"generator": {k: torch.zeros_like(v) for k, v in sd["generator"].items()}}, zeros)
    hostile._rewrite_zip(str(zeros), str(zeros) + ".z", lambda name, data, info: (data, zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED))
    with pytest.raises(ConvertError, match="compressed storages inflate to"):
        open_source(str(zeros) + ".z")


def test_sources_close_idempotently_and_as_context_managers(tmp_path, good):
    """Every reader closes any number of times, as a context manager too, and refuses
    reads once closed (engine.prepare and inspect can release a source on any error)."""
    from converters.errors import ConvertError
    from converters.io.sources import CombinedSource, MappingSource, SafetensorsSource, open_source

    st = hostile._safetensors_of(str(tmp_path / "st"), good)
    for path, kind in ((good, MappingSource), (st, SafetensorsSource)):
        with open_source(path) as src:
            assert isinstance(src, kind)
            name = src.names()[0]
            assert src.get(name).shape == src.shapes[name]
        src.close()
        with pytest.raises(ConvertError, match="after the source was closed"):
            src.get(name)
    both = CombinedSource(open_source(good), {"st/": open_source(st)})
    with both:
        assert both.get("st/" + name).shape == both.shapes["st/" + name]
    both.close()
    with pytest.raises(ConvertError, match="after the source was closed"):
        both.get("st/" + name)


@pytest.mark.parametrize("hash_output", [False, True], ids=["per-model", "all"])
def test_source_changed_during_the_run_discards_the_output(tmp_path, monkeypatch, hash_output):
    """A source whose size, mtime or inode moves while it is converted (a download
    finishing, an rsync) gives no output: its recorded hash could be of other bytes."""
    from converters.release import engine
    from converters.format import ops
    from converters.errors import ConvertError

    src = tmp_path / "bigvgan"
    shutil.copytree(os.path.join(ROOT, "demo", "release", "bigvgan"), src)
    out = tmp_path / "bigvgan.safetensors"
    out.write_bytes(b"earlier output")
    real, calls = ops.apply, []

    def apply(op, xs):
        if not calls:
            os.utime(src / "bigvgan_generator.pt", ns=(1, 1))  # the file changes mid-run
        calls.append(op)
        return real(op, xs)

    monkeypatch.setattr(ops, "apply", apply)  # bigvgan folds weight norm: computed in torch
    with pytest.raises(ConvertError, match="changed while it was being converted.*the output was discarded"):
        engine.convert("bigvgan", str(src), str(out), quiet=True, force=True, hash_output=hash_output)
    assert out.read_bytes() == b"earlier output" and calls
    assert sorted(os.listdir(tmp_path)) == ["bigvgan", "bigvgan.safetensors"]
