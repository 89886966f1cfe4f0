"""The streaming writer's staging path and the fast non-finite check (issue 8)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from converters import safetensors_io as stio
from converters.engine import all_finite


def _out(name, x):
    return stio.OutTensor(name, stio.st_dtype(x.dtype), tuple(x.shape), lambda x=x: x)


@pytest.mark.parametrize("direct", [True, False])
def test_staging_writes_every_layout_byte_exact(tmp_path, monkeypatch, direct):
    """Tiny buffers, so tensors straddle buffers, non-contiguous tensors take the
    whole-copy, row-block and row-by-row paths, and the tail is unaligned."""
    monkeypatch.setattr(stio, "STAGE_BYTES", 8192)
    monkeypatch.setattr(stio, "WHOLE_BYTES", 1024)
    monkeypatch.setattr(stio, "PIECE_BYTES", 512)
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
