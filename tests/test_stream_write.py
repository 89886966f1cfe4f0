"""The streaming writer's staging path and the fast non-finite check (issue 8)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from converters import safetensors_io as stio
from converters.engine import all_finite
from converters.errors import ConvertError


def _out(name, x):
    return stio.OutTensor(name, stio.st_dtype(x.dtype), tuple(x.shape), lambda x=x: x)


@pytest.mark.parametrize("fill_threads", [1, 2])
@pytest.mark.parametrize("direct", [True, False])
def test_staging_writes_every_layout_byte_exact(tmp_path, monkeypatch, direct, fill_threads):
    """Tiny buffers, so tensors straddle buffers, non-contiguous tensors take the
    whole-copy, row-block and row-by-row paths, and the tail is unaligned."""
    monkeypatch.setattr(stio, "STAGE_BYTES", 8192)
    monkeypatch.setattr(stio, "WHOLE_BYTES", 1024)
    monkeypatch.setattr(stio, "PIECE_BYTES", 512)
    monkeypatch.setattr(stio, "FILL_THREADS", fill_threads)
    if not direct:
        monkeypatch.setattr(stio, "_set_direct", lambda fd, on: False)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 300, generator=g)
    cases = {
        "contig": torch.randn(3001, generator=g),
        "small_t": torch.randn(10, 20, generator=g).t(),          # whole copy
        "big_t": base.t(),                                         # row blocks
        "wide_rows_t": torch.randn(400, 3, generator=g).t(),       # rows > PIECE_BYTES: row by row
        "split_cols": base[:, 100:200],                            # strided slice
        "strided_1d": torch.randn(5000, generator=g)[::3],         # strided 1-D
        "f16": torch.randn(77, 5, generator=g).half().t(),
        "i64": torch.arange(13, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "o.safetensors"
    stio.write_stream(str(path), [_out(n, x) for n, x in cases.items()], {"k": "v"})
    got = load_file(str(path))
    assert got.keys() == cases.keys()
    for n, x in cases.items():
        assert got[n].dtype == x.dtype and torch.equal(got[n], x), n
    assert stio.read_header(str(path)).metadata == {"k": "v"}


def test_final_header_patch_survives_direct_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(stio, "STAGE_BYTES", 4096)
    x = torch.randn(5000)
    path = tmp_path / "o.safetensors"
    stio.write_stream(str(path), [_out("x", x)], {"h": "0" * 64}, finalize_metadata=lambda: {"h": "f" * 64})
    assert stio.read_header(str(path)).metadata == {"h": "f" * 64}
    assert torch.equal(load_file(str(path))["x"], x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    big = torch.finfo(dtype).max
    cases = [
        torch.randn(1000),
        torch.full((100,), big, dtype=dtype),    # finite, but the sum overflows: exact path says finite
        torch.tensor([1.0, float("nan"), 2.0]),
        torch.tensor([float("inf"), 1.0]),
        torch.tensor([float("inf"), float("-inf")]),
        torch.tensor([-big, big, float("nan")], dtype=dtype),
        torch.randn(30, 40).t(),
    ]
    for c in cases:
        c = c.to(dtype)
        assert all_finite(c) == bool(torch.isfinite(c).all()), c


def _refuse_nonfinite(name):
    def check(staged):
        if not all_finite(staged):
            raise ConvertError(f"{name}: NaN or Inf")
    return check


def _small_stages(monkeypatch):
    monkeypatch.setattr(stio, "STAGE_BYTES", 8192)
    monkeypatch.setattr(stio, "WHOLE_BYTES", 2048)
    monkeypatch.setattr(stio, "PIECE_BYTES", 512)


def _early_flush_case():
    """Laid out in this order (names sort so): about 7.4 KB of header and contiguous
    data, then a 1.6 KB transposed matrix that does not fit the rest of the 8 KB
    buffer: the buffer is handed over early and its unaligned tail carried over."""
    g = torch.Generator().manual_seed(1)
    return {"a_contig": torch.randn(1800, generator=g), "b_t": torch.randn(20, 20, generator=g).t(),
            "c_big_t": torch.randn(30, 100, generator=g).t(), "d_strided": torch.randn(3000, generator=g)[::2]}


def test_hash_output_is_the_files_sha256(tmp_path, monkeypatch):
    _small_stages(monkeypatch)
    flushes = []
    real = stio._Staging._flush
    monkeypatch.setattr(stio._Staging, "_flush", lambda self: (flushes.append(self.pos), real(self))[1])
    cases = _early_flush_case()
    path = tmp_path / "o.safetensors"
    digest = stio.write_stream(str(path), [_out(n, x) for n, x in cases.items()], {"k": "v"}, hash_output=True)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any(n % stio.ALIGN and n < 8192 for n in flushes), flushes  # an early hand-over with a tail happened
    got = load_file(str(path))
    for n, x in cases.items():
        assert torch.equal(got[n], x), n
    with pytest.raises(ValueError):
        stio.write_stream(str(tmp_path / "p.safetensors"), [], {}, finalize_metadata=lambda: {}, hash_output=True)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("name", ["a_contig", "b_t", "c_big_t", "d_strided"])
def test_check_sees_every_staged_element(tmp_path, monkeypatch, name, where):
    """A NaN anywhere in any layout (contiguous across buffers, transposed whole,
    transposed in row blocks, strided) is caught on the staged bytes, and nothing is
    left at the output path."""
    _small_stages(monkeypatch)
    cases = _early_flush_case()
    x = cases[name].contiguous().clone()
    flat = x.view(-1)
    flat[{"first": 0, "middle": flat.numel() // 2, "last": -1}[where]] = float("nan")
    orig = cases[name]
    cases[name] = x.t().contiguous().t() if orig.dim() == 2 and not orig.is_contiguous() else x
    if name == "d_strided":
        cases[name] = torch.stack([x, torch.zeros_like(x)], 1).view(-1)[::2]
    assert torch.isnan(cases[name]).sum() == 1 and cases[name].is_contiguous() == orig.is_contiguous()
    path = tmp_path / "o.safetensors"
    outs = [stio.OutTensor(n, stio.st_dtype(t.dtype), tuple(t.shape), lambda t=t: t, _refuse_nonfinite(n)) for n, t in cases.items()]
    with pytest.raises(ConvertError, match=name):
        stio.write_stream(str(path), outs, {"k": "v"})
    assert not path.exists() and os.listdir(tmp_path) == []
