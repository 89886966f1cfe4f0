"""The portable I/O path (issue 15), forced on Linux: what macOS and Windows run.

A child Python starts with the platform's extras taken away before the converter is
imported: no ``fcntl`` module, no ``os.pwrite``/``os.pread``, no ``os.O_DIRECT``,
``os.O_TMPFILE``, ``os.O_DIRECTORY`` or ``os.fchmod``, no ``ctypes`` for the converter's own calls (linkat, madvise),
and ``madvise`` population off (it is Linux-only).  It converts every demo model, and
each output must equal, byte for byte, the fast path's output in this process.

This runs the portable code paths; it does not run Windows or macOS themselves
(``.github/workflows/portable.yml`` runs this file there, in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, convert_in_process

DEMO = os.path.join(ROOT, "demo", "release")

# kind, source, config (None: beside the source), output name
JOBS = [
    ("gpt", DEMO, None, "gpt.safetensors"),
    ("s2mel", DEMO, None, "s2mel.safetensors"),
    ("w2v-bert", os.path.join(DEMO, "w2v-bert-2.0"), None, "w2v_bert.safetensors"),
    ("bigvgan", os.path.join(DEMO, "bigvgan"), None, "bigvgan.safetensors"),
    ("speaker-matrix", os.path.join(DEMO, "feat1.pt"), None, "speaker_matrix.safetensors"),
    ("emotion-matrix", os.path.join(DEMO, "feat2.pt"), None, "emotion_matrix.safetensors"),
    ("semantic-codec", os.path.join(DEMO, "MaskGCT", "semantic_codec"), os.path.join(DEMO, "config.yaml"), "semantic_codec.safetensors"),
    ("campplus", os.path.join(DEMO, "campplus"), None, "campplus.safetensors"),
]

HIDDEN = ("pwrite", "pread", "O_DIRECT", "O_TMPFILE", "O_DIRECTORY", "fchmod")

FORCED = r"""
import json, os, sys
sys.path.insert(0, {root!r})
sys.modules["fcntl"] = None  # ModuleNotFoundError on import, as on Windows
for name in {hidden!r}:
    if hasattr(os, name):
        delattr(os, name)
import torch  # noqa: F401
import reference.load  # noqa: F401
from converters.io import atomic, pth_reader, staging  # noqa: F401
from converters.release import engine
from converters.format import ops
from tests.helpers import convert_in_process
sys.modules["ctypes"] = None  # torch and the reference loader use it (portably); the converter's own calls may not
pth_reader.MADV_POPULATE_READ = None  # Linux-only advice
seen = {{"lseek": 0, "named": 0, "direct": []}}
real_lseek, real_named, real_direct = os.lseek, atomic._open_named, staging.set_direct
def lseek(*a):
    seen["lseek"] += 1
    return real_lseek(*a)
def named(*a):
    seen["named"] += 1
    return real_named(*a)
def direct(fd, on):
    got = real_direct(fd, on)
    seen["direct"].append(got)
    return got
os.lseek, atomic._open_named, staging.set_direct = lseek, named, direct
for kind, src, cfg, name in {jobs!r}:
    convert_in_process(kind, src, os.path.join({out!r}, name), config=cfg)
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    out = tmp_path_factory.mktemp("portable")
    code = FORCED.format(root=ROOT, hidden=HIDDEN, jobs=JOBS, out=str(out))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout.strip().splitlines()[-1])


def test_portable_path_was_taken(forced):
    _, seen = forced
    assert seen["named"] == len(JOBS)  # a hidden temporary name per output, no O_TMPFILE
    assert seen["lseek"] >= len(JOBS)  # seek-and-write, no pwrite
    assert seen["direct"] and not any(seen["direct"])  # never O_DIRECT


def test_portable_outputs_equal_the_fast_paths(forced, tmp_path):
    out, _ = forced
    for kind, src, cfg, name in JOBS:
        fast = convert_in_process(kind, src, tmp_path / name, config=cfg)
        assert (out / name).read_bytes() == fast.read_bytes(), kind
    assert sorted(os.listdir(out)) == sorted(name for *_, name in JOBS)  # no temporary left


def test_portable_write_stream_details(tmp_path):
    """The writer's own paths with the extras gone, in a child: a header patched at
    offset 0 after the data (seek back), hashing as it streams, and an abort that
    removes the hidden file."""
    code = r"""
import hashlib, os, sys
sys.path.insert(0, {root!r})
sys.modules["fcntl"] = None
for name in {hidden!r}:
    if hasattr(os, name):
        delattr(os, name)
import torch
from converters.io import safetensors_io as stio, staging
from safetensors.torch import load_file
staging.STAGE_BYTES, staging.WHOLE_BYTES, staging.PIECE_BYTES = 8192, 1024, 512
d = {out!r}
x = {{"a": torch.randn(3001), "b": torch.randn(40, 30).t(), "c": torch.arange(7)}}
outs = lambda: [stio.OutTensor(n, stio.st_dtype(t.dtype), tuple(t.shape), lambda t=t: t) for n, t in x.items()]
stio.write_stream(os.path.join(d, "p.safetensors"), outs(), {{"h": "0" * 64}}, finalize_metadata=lambda: {{"h": "f" * 64}})
got = load_file(os.path.join(d, "p.safetensors"))
assert all(torch.equal(got[n], t) for n, t in x.items())
assert stio.read_header(os.path.join(d, "p.safetensors")).metadata == {{"h": "f" * 64}}
digest = stio.write_stream(os.path.join(d, "q.safetensors"), outs(), {{"k": "v"}}, hash_output=True)
assert digest == hashlib.sha256(open(os.path.join(d, "q.safetensors"), "rb").read()).hexdigest()
bad = outs()
bad[1].produce = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
try:
    stio.write_stream(os.path.join(d, "r.safetensors"), bad, {{}})
except RuntimeError:
    pass
print(sorted(os.listdir(d)))
"""
    p = subprocess.run([sys.executable, "-c", code.format(root=ROOT, hidden=HIDDEN, out=str(tmp_path))],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "['p.safetensors', 'q.safetensors']"


UMASK = r"""
import os, stat, sys
sys.path.insert(0, {root!r})
os.umask(0o027)
from converters.io import atomic
if {named!r}:
    for name in ("O_TMPFILE",):
        if hasattr(os, name):
            delattr(os, name)
def no_umask(*a):
    raise AssertionError("os.umask called")
os.umask = no_umask
for i in range(2):
    with atomic.AtomicOutput(os.path.join({out!r}, f"f{{i}}")) as out:
        out.file.write(b"x")
        out.commit()
print(atomic.process_umask(), [oct(stat.S_IMODE(os.stat(os.path.join({out!r}, f"f{{i}}")).st_mode)) for i in range(2)])
"""


@pytest.mark.skipif(os.name == "nt", reason="Windows file modes have no umask bits")
@pytest.mark.parametrize("named", [False, True])
def test_output_mode_follows_the_umask_without_changing_it(tmp_path, named):
    """Files come out 0o666 less the umask on both paths, and os.umask (which can only
    read the mask by setting it, racing other threads) is never called."""
    p = subprocess.run([sys.executable, "-c", UMASK.format(root=ROOT, named=named, out=str(tmp_path))],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    umask, modes = p.stdout.split(" ", 1)
    assert umask in ("23", "None")  # 0o027, where /proc/self/status has it
    assert modes.strip() == "['0o640', '0o640']"
