"""The reference loader (``reference/load.py``): every tensor equals the safetensors
library's own reading, byte for byte, on both read paths (memory map; threaded staging
through bounce buffers, run here on the CPU), for every demo file and a full-size file;
headers that break the format's rules are refused before anything is read."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reference.header import layout_problems, read_header
from reference.load import CanonicalFile, LoadError, load
from tests.helpers import ROOT, convert_in_process, python_c

DEMO = os.path.join(ROOT, "demo", "release")


@pytest.fixture
def demo_out(demo_bundle):
    return demo_bundle  # read only (conftest)


def _library(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _assert_identical(loaded: CanonicalFile, path: str) -> None:
    want = _library(path)
    assert sorted(loaded.tensors) == sorted(want)
    for name, t in want.items():
        assert _same_bytes(loaded[name], t), name
        # a view into the one buffer, not a copy
        assert loaded[name].untyped_storage().data_ptr() == loaded.buffer.untyped_storage().data_ptr(), name


READS = [
    dict(staged=False),
    dict(staged=True, threads=1, piece_bytes=1 << 20),
    dict(staged=True, threads=3, piece_bytes=4096 + 13),  # pieces that cut through tensors at odd offsets
]


@pytest.mark.parametrize("how", READS, ids=["mmap", "staged-1", "staged-3-odd"])
def test_every_demo_file_matches_the_library(demo_out, how):
    files = load(str(demo_out), device="cpu", **how)
    paths = sorted(p for p in os.listdir(demo_out) if p.endswith(".safetensors"))
    assert len(paths) == 8 and len(files) == 8
    for name in paths:
        path = os.path.join(demo_out, name)
        f = files[read_header(path).metadata["model"]]
        assert f.path == path and f.config == json.loads(f.metadata["config"])
        _assert_identical(f, path)


def test_mixed_dtype_classes_and_empty_tensors(tmp_path):
    """Every dtype the format allows, in one file, written by the library (which pads
    the header and orders by alignment too); 0-d and empty tensors included."""
    g = torch.Generator().manual_seed(0)
    ts = {
        "a.f64": torch.randn(3, generator=g, dtype=torch.float64),
        "b.f32": torch.randn(2, 5, generator=g),
        "c.f16": torch.randn(7, generator=g).half(),
        "d.bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "e.i64": torch.arange(5),
        "f.i32": torch.arange(3, dtype=torch.int32),
        "g.i16": torch.arange(3, dtype=torch.int16),
        "h.i8": torch.arange(-3, 3, dtype=torch.int8),
        "i.u8": torch.arange(9, dtype=torch.uint8),
        "j.bool": torch.tensor([True, False, True]),
        "k.scalar": torch.tensor(2.5),
        "l.empty": torch.zeros(0, 4),
    }
    path = str(tmp_path / "mixed.safetensors")
    save_file(ts, path, metadata={"config": json.dumps({"x": 1})})
    for how in READS:
        f = load(path, device="cpu", **how)
        _assert_identical(f, path)
        assert f.config["x"] == 1
        with pytest.raises(KeyError, match="mixed.safetensors: metadata config has no 'y'"):
            f.config["y"]
        with pytest.raises(KeyError, match="mixed.safetensors: no tensor 'nope'"):
            f["nope"]


def test_cpu_views_are_copy_on_write(demo_out):
    path = str(demo_out / "bigvgan.safetensors")
    before = open(path, "rb").read()
    f = load(path, device="cpu")
    for t in f.tensors.values():
        if t.is_floating_point():
            t.fill_(0)
    assert open(path, "rb").read() == before


def test_float_cast(demo_out):
    f = load(str(demo_out / "gpt.safetensors"), device="cpu")
    assert f.metadata["dtype"] == "F16"  # the demo gpt.pth is float16
    g = f.float()
    assert all(t.dtype == torch.float32 for t in g.tensors.values() if t.is_floating_point())
    assert all(torch.equal(g[n], f[n].float()) for n in f.tensors)


# ------------------------------------------------------------------ refusals


def _write_raw(path, header: dict, data: bytes, pad_to: int = 8) -> str:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % pad_to)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_refuses_a_misaligned_tensor(tmp_path):
    hdr = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}
    p = _write_raw(tmp_path / "x.safetensors", hdr, bytes(6))
    with pytest.raises(LoadError, match=r"tensor 'b' \(F32\) starts at data offset 2, not a multiple of its item size 4"):
        load(p, device="cpu")


def test_refuses_an_unpadded_header(tmp_path):
    hdr = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(hdr).encode()
    raw += b" " * ((-(8 + len(raw)) % 8) + 3)  # data starts at 8k + 3
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(LoadError, match="not a multiple of 8"):
        load(str(p), device="cpu")


@pytest.mark.parametrize("case,msg", [
    ("gap", "leaves a gap"), ("overlap", "overlaps"), ("trailing", "trailing bytes"), ("truncated", "truncated"),
    ("dup", "duplicate key"), ("dtype", "unsupported dtype"),
])
def test_refuses_broken_headers(tmp_path, case, msg):
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    data = bytes(16)
    if case == "gap":
        hdr["b"]["data_offsets"] = [12, 20]
        data = bytes(20)
    elif case == "overlap":
        hdr["b"]["data_offsets"] = [4, 12]
    elif case == "trailing":
        data = bytes(24)
    elif case == "truncated":
        data = bytes(12)
    elif case == "dtype":
        hdr["b"]["dtype"] = "F8"
        hdr["b"]["data_offsets"] = [8, 10]
    p = tmp_path / "x.safetensors"
    if case == "dup":
        raw = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
        raw += b" " * (-(8 + len(raw)) % 8)
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    else:
        _write_raw(p, hdr, data)
    with pytest.raises(LoadError, match=msg):
        load(str(p), device="cpu")


def test_a_bad_file_in_a_folder_refuses_the_whole_load(demo_out, tmp_path):
    """Every header is validated before any data is read."""
    d = tmp_path / "bundle"
    shutil.copytree(demo_out, d)
    with open(d / "w2v_bert.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(d / "w2v_bert.safetensors") - 1)
    with pytest.raises(LoadError, match="w2v_bert.safetensors"):
        load(str(d), device="cpu", staged=True)


def test_a_file_that_shrinks_during_the_read_fails_the_load(demo_out, tmp_path, monkeypatch):
    import reference.load as rl

    p = tmp_path / "gpt.safetensors"
    shutil.copyfile(demo_out / "gpt.safetensors", p)
    validate = rl.validate

    def validate_then_shrink(path):
        h = validate(path)
        with open(path, "r+b") as f:
            f.truncate(h.file_size - 100)
        return h

    monkeypatch.setattr(rl, "validate", validate_then_shrink)
    with pytest.raises(LoadError, match="ended 100 bytes early"):
        load(str(p), device="cpu", staged=True, piece_bytes=1 << 16)


def test_our_outputs_keep_the_layout_promise(demo_out):
    for name in os.listdir(demo_out):
        if name.endswith(".safetensors"):
            assert layout_problems(read_header(str(demo_out / name))) == []


def test_loader_imports_nothing_but_torch():
    """reference.load (and its header reader) stand alone: no converters, safetensors
    library, YAML or upstream code."""
    code = ("import sys, reference.load; bad = [m for m in ('converters', 'safetensors', 'yaml', 'transformers', "
            "'indextts', 'tests') if m in sys.modules]; print(bad)")
    p = python_c(code)  # forked with torch imported, nothing else (tests/helpers.py)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# ------------------------------------------------------------------ full size


@pytest.fixture(scope="module")
def full_bigvgan(tmp_path_factory):
    """BigVGAN at the released config (112M parameters, 0.45 GB): random values with
    the upstream class's names and shapes, converted like the release."""
    from bench import inputs
    from tests.upstream import indextts

    d = tmp_path_factory.mktemp("full")
    cfg = inputs.configs("full")
    # the BigVGAN of inputs.modules(cfg)["bigvgan"], built alone (not the full-size GPT, s2mel and w2v-bert too)
    AttrDict = indextts("s2mel.modules.bigvgan.env").AttrDict
    bv = inputs._meta(lambda: indextts("s2mel.modules.bigvgan.bigvgan").BigVGAN(AttrDict(dict(cfg["bigvgan"]))))
    sd = inputs.materialise(bv.state_dict(), torch.Generator().manual_seed(0))
    os.makedirs(d / "bigvgan")
    torch.save({"generator": sd}, d / "bigvgan" / "bigvgan_generator.pt")
    del sd
    (d / "bigvgan" / "config.json").write_text(json.dumps(cfg["bigvgan"]))
    out = d / "bigvgan.safetensors"
    convert_in_process("bigvgan", d / "bigvgan", out)
    shutil.rmtree(d / "bigvgan")
    yield str(out)
    os.unlink(out)  # 0.45 GB, while it is still in the page cache (pytest keeps the folders of the last runs)


@pytest.mark.slow
def test_full_size_file_matches_the_library(full_bigvgan):
    assert os.path.getsize(full_bigvgan) > 400e6
    for how in READS[:2] + [dict(staged=True, threads=2)]:
        _assert_identical(load(full_bigvgan, device="cpu", **how), full_bigvgan)


# ------------------------------------------------------------------ the CUDA runtime path, on the CPU


class _FakeRuntime:
    """Stands in for the CUDA runtime library so that the ctypes copy loop runs on the
    CPU: ``cudaMemcpyAsync`` copies at once (``memmove``) and every call is recorded."""

    def __init__(self):
        import ctypes

        import threading

        self.calls: dict[str, int] = {}
        self.copies_per_stream: dict[int, int] = {}
        lock = threading.Lock()
        outer = self

        class Lib:
            def __getattr__(self, name):
                def call(*args):
                    with lock:  # the workers call at once
                        outer.calls[name] = outer.calls.get(name, 0) + 1
                        if name == "cudaMemcpyAsync":
                            dst, src, n, kind, stream = args
                            assert kind == 1 and stream.value
                            ctypes.memmove(dst, src, n.value)
                            outer.copies_per_stream[stream.value] = outer.copies_per_stream.get(stream.value, 0) + 1
                        elif name in ("cudaStreamCreateWithFlags", "cudaEventCreateWithFlags"):
                            args[0]._obj.value = 1 + outer.calls[name]
                    return 0
                return call

        self.lib = Lib()

    def check(self, err, what):
        assert err == 0, what


def test_runtime_copy_loop_moves_every_byte(demo_out, monkeypatch):
    """The ctypes path (pointer arithmetic into each file's buffer, two staging slots per
    worker, one stream and two events each) with a fake runtime that copies at once."""
    import reference.load as rl

    fake = _FakeRuntime()
    monkeypatch.setattr(rl, "_runtime", lambda device: fake)
    timings: dict = {}
    files = load(str(demo_out), device="cpu", staged=True, threads=3, piece_bytes=4096 + 13, copier="cudart",
                 timings=timings)
    assert timings["copier"] == "cudart"
    for f in files.values():
        _assert_identical(f, f.path)
    c = fake.calls
    assert c["cudaMemcpyAsync"] == c["cudaEventRecord"] > 100
    # a worker waits for a buffer's copy before each reuse of it: every copy but the last
    # one of each of its two buffers (the stream's synchronise covers those)
    assert sum(fake.copies_per_stream.values()) == c["cudaMemcpyAsync"]
    assert c["cudaEventSynchronize"] == sum(max(0, n - 2) for n in fake.copies_per_stream.values())
    assert c["cudaStreamCreateWithFlags"] == c["cudaStreamSynchronize"] == c["cudaStreamDestroy"] == 3
    assert c["cudaEventCreateWithFlags"] == c["cudaEventDestroy"] == 6


def test_copier_torch_and_auto_without_a_runtime(demo_out, monkeypatch):
    import reference.load as rl

    monkeypatch.setattr(rl, "_runtime", lambda device: None)
    t: dict = {}
    load(str(demo_out / "gpt.safetensors"), device="cpu", staged=True, timings=t)
    assert t["copier"] == "torch"
    with pytest.raises(LoadError, match="CUDA runtime library is not loaded"):
        load(str(demo_out / "gpt.safetensors"), device="cpu", staged=True, copier="cudart")
    with pytest.raises(ValueError, match="copier must be one of"):
        load(str(demo_out / "gpt.safetensors"), device="cpu", staged=True, copier="fast")


def test_runtime_copy_errors_fail_the_load(demo_out, monkeypatch):
    import reference.load as rl

    fake = _FakeRuntime()
    fake.check = lambda err, what: (_ for _ in ()).throw(LoadError(f"{what} failed")) if what == "cudaMemcpyAsync" else None
    monkeypatch.setattr(rl, "_runtime", lambda device: fake)
    with pytest.raises(LoadError, match="cudaMemcpyAsync failed"):
        load(str(demo_out), device="cpu", staged=True, threads=2, copier="cudart")
