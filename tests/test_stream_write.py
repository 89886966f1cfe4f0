"""The streaming writer's staging path and the fast non-finite check (issue 8); its
piece plan as a pure function, property-tested without I/O (issue 16)."""

from __future__ import annotations

import hashlib
import os
from math import prod

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from converters.io import safetensors_io as stio
from converters.io import staging
from converters.io import staging_plan as sp
from converters.format.arrays import all_finite, from_torch
from converters.errors import ConvertError


def _out(name, x):
    return stio.OutTensor(name, stio.st_dtype(x.dtype), tuple(x.shape), lambda x=x: x)


@pytest.mark.parametrize("fill_threads", [1, 2])
@pytest.mark.parametrize("direct", [True, False])
def test_staging_writes_every_layout_byte_exact(tmp_path, monkeypatch, direct, fill_threads):
    """Tiny buffers, so tensors straddle buffers, non-contiguous tensors take the
    whole-copy, row-block and row-by-row paths, and the tail is unaligned."""
    monkeypatch.setattr(staging, "STAGE_BYTES", 8192)
    monkeypatch.setattr(staging, "WHOLE_BYTES", 1024)
    monkeypatch.setattr(staging, "PIECE_BYTES", 512)
    monkeypatch.setattr(staging, "FILL_THREADS", fill_threads)
    if not direct:
        monkeypatch.setattr(staging, "set_direct", lambda fd, on: False)
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
    monkeypatch.setattr(staging, "STAGE_BYTES", 4096)
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
        assert all_finite(from_torch(c), stio.st_dtype(dtype)) == bool(torch.isfinite(c).all()), c


def _refuse_nonfinite(name):
    def check(staged):  # a staged piece: a numpy view of the staging buffer (every case here is float32)
        assert isinstance(staged, np.ndarray) and staged.dtype == np.float32
        if not all_finite(staged, "F32"):
            raise ConvertError(f"{name}: NaN or Inf")
    return check


def _small_stages(monkeypatch):
    monkeypatch.setattr(staging, "STAGE_BYTES", 8192)
    monkeypatch.setattr(staging, "WHOLE_BYTES", 2048)
    monkeypatch.setattr(staging, "PIECE_BYTES", 512)


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
    real = staging.Staging._hand_over
    # the bytes laid out in the buffer when it is handed over
    monkeypatch.setattr(staging.Staging, "_hand_over", lambda self, a: (flushes.append(a.cut + a.tail), real(self, a))[1])
    cases = _early_flush_case()
    path = tmp_path / "o.safetensors"
    digest = stio.write_stream(str(path), [_out(n, x) for n, x in cases.items()], {"k": "v"}, hash_output=True)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any(n % staging.ALIGN and n < 8192 for n in flushes), flushes  # an early hand-over with a tail happened
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


# ------------------------------------------------------------------ the piece plan, without I/O

PLAN = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def strided(draw, itemsize=None):
    """A tensor as a layout: a contiguous base, its dims permuted, then each dim sliced
    with a step (transposes, column slices, strided views, broadcasts of size-1 dims)."""
    size = itemsize or draw(st.sampled_from([1, 2, 4, 8]))
    ndim = draw(st.integers(0, 3))
    base = tuple(draw(st.integers(0, 12)) for _ in range(ndim))
    strides = list(sp.contiguous_strides(base))
    order = draw(st.permutations(range(ndim)))
    shape = [base[i] for i in order]
    strides = [strides[i] for i in order]
    for d in range(ndim):
        n = shape[d]
        a = draw(st.integers(0, n))
        b = draw(st.integers(a, n))
        step = draw(st.integers(1, 3))
        shape[d] = len(range(a, b, step))
        strides[d] *= step
    return sp.Spec(tuple(shape), tuple(strides), size)


@st.composite
def geometries(draw):
    align = draw(st.sampled_from([8, 16, 64, 256]))
    stage = align * draw(st.integers(2, 8))
    return sp.Geometry.of(stage, align, draw(st.integers(0, stage)), draw(st.integers(1, stage)))


@st.composite
def files(draw):
    """A header (a multiple of 8 bytes) and tensors widest item first: the layout the
    writer is given, so every tensor starts at a multiple of its item size."""
    header = sp.Spec.contiguous((8 * draw(st.integers(1, 40)),), 1)
    tensors = draw(st.lists(strided(), max_size=6))
    return [header] + sorted(tensors, key=lambda s: -s.itemsize)


def _piece(spec: sp.Spec, steps: tuple) -> np.ndarray:
    """The tensor's logical (row-major) element indices that a piece covers, with the
    check that a flat step only ever applies to contiguous data (no hidden copy)."""
    a = np.arange(prod(spec.shape)).reshape(spec.shape)
    strides = list(spec.strides)
    for s in steps:
        if s[0] == "select":
            a, strides = a[s[1]], strides[1:]
        elif s[0] == "slice":
            a = a[s[1]:s[2]]
        elif s[0] == "contiguous":
            strides = list(sp.contiguous_strides(a.shape))
        else:
            assert s[0] == "flat" and sp.is_contiguous(a.shape, strides), steps
            a, strides = a.reshape(-1)[s[1]:s[2]], [1]
    return a


def _run(specs: list[sp.Spec], g: sp.Geometry) -> np.ndarray:
    """Carry a plan out on labels instead of bytes: each byte of the file is labelled
    with its intended file offset, and the plan must put every label in its place."""
    bufs = [np.full(g.stage, -1, dtype=np.int64), np.full(g.stage, -1, dtype=np.int64)]
    out = np.full(sum(prod(s.shape) * s.itemsize for s in specs), -2, dtype=np.int64)
    cur, cursor, base, written = 0, sp.Cursor(), 0, 0
    for spec in specs:
        actions, after = sp.plan_tensor(cursor, spec, g)
        pos, covered = cursor.pos, []
        for a in actions:
            if isinstance(a, sp.HandOver):
                assert a.cut % g.align == 0 and a.offset % g.align == 0 and 0 <= a.tail < g.align
                assert a.offset == written and a.cut + a.tail == pos
                out[a.offset:a.offset + a.cut] = bufs[cur][:a.cut]
                written += a.cut
                bufs[1 - cur][:a.tail] = bufs[cur][a.cut:a.cut + a.tail]
                cur, pos = 1 - cur, a.tail
                continue
            assert a.start == pos and a.start + a.nbytes <= g.stage, a
            idx = _piece(spec, a.view)
            assert idx.shape == a.shape and a.nbytes == idx.size * spec.itemsize
            covered.append(idx.reshape(-1))
            labels = base + (idx.reshape(-1, 1) * spec.itemsize + np.arange(spec.itemsize)).reshape(-1)
            bufs[cur][a.start:a.start + a.nbytes] = labels
            pos += a.nbytes
        n = prod(spec.shape)
        got = np.concatenate(covered) if covered else np.zeros(0, dtype=np.int64)
        assert np.array_equal(got, np.arange(n)), "each element once, in row-major order"
        assert (after.pos, after.offset) == (pos, written)
        cursor, base = after, base + n * spec.itemsize
    out[written:written + cursor.pos] = bufs[cur][:cursor.pos]  # finish
    assert written + cursor.pos == len(out)
    return out


@PLAN
@given(specs=files(), g=geometries())
def test_plan_puts_every_byte_in_its_place(specs, g):
    """Pure: no torch, no file.  Pieces cover each tensor in row-major order, fit their
    buffer, hand-overs are aligned, and the file is the tensors' bytes in order."""
    out = _run(specs, g)
    assert np.array_equal(out, np.arange(len(out)))


@PLAN
@given(specs=files(), g=geometries())
def test_plan_file_is_the_tensor_plans_in_sequence(specs, g):
    actions, end = sp.plan_file(specs, g)
    cur, seq = sp.Cursor(), []
    for s in specs:
        more, cur = sp.plan_tensor(cur, s, g)
        seq += more
    assert actions == seq and end == cur


@PLAN
@given(spec=strided())
def test_is_contiguous_is_torchs_rule(spec):
    n = prod(spec.shape)
    if n:
        need = 1 + sum((d - 1) * s for d, s in zip(spec.shape, spec.strides))
        x = torch.empty(need).as_strided(spec.shape, spec.strides)
    else:
        x = torch.empty(spec.shape)
    assert sp.is_contiguous(spec.shape, spec.strides) == x.is_contiguous()


def test_plan_examples():
    """The choices the writer relies on, on one small geometry (stage 64, align 16)."""
    g = sp.Geometry.of(64, 16, whole=40, piece=16)
    # Contiguous, across a hand-over: flat slices as far as the buffer goes.
    acts, cur = sp.plan_tensor(sp.Cursor(pos=56), sp.Spec.contiguous((6,), 4), g)
    assert acts == [sp.Place((("flat", 0, 2),), (2,), 56, 8), sp.HandOver(64, 0, 0),
                    sp.Place((("flat", 2, 6),), (4,), 0, 16)] and cur == sp.Cursor(16, 64)
    # A transposed 3x3 float (36 bytes <= whole) that does not fit: early hand-over with
    # a 4-byte tail, then one whole copy.
    acts, cur = sp.plan_tensor(sp.Cursor(pos=36), sp.Spec((3, 3), (1, 3), 4), g)
    assert acts == [sp.HandOver(32, 4, 0), sp.Place((), (3, 3), 4, 36)] and cur == sp.Cursor(40, 32)
    # A strided 1-D vector over whole: chunks of piece bytes, each made contiguous.
    acts, _ = sp.plan_tensor(sp.Cursor(), sp.Spec((12,), (2,), 4), g)
    assert [a.view for a in acts] == [(("slice", i, i + 4), ("contiguous",), ("flat", 0, 4)) for i in (0, 4, 8)]
    # Empty tensors need nothing; a misaligned position is refused, not looped on.
    assert sp.plan_tensor(sp.Cursor(pos=8), sp.Spec((0, 5), (1, 0), 4), g) == ([], sp.Cursor(pos=8))
    with pytest.raises(ValueError, match="not aligned"):
        sp.plan_tensor(sp.Cursor(pos=62), sp.Spec.contiguous((3,), 4), g)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(specs=st.lists(strided(itemsize=4), min_size=1, max_size=4), direct=st.booleans(), data=st.data())
def test_writer_follows_any_layout_byte_exact(tmp_path, monkeypatch, specs, direct, data):
    """The writer carrying plans out on real tensors of those layouts, tiny buffers."""
    align = 4096 if direct else data.draw(st.sampled_from([8, 64]))
    monkeypatch.setattr(staging, "ALIGN", align)
    monkeypatch.setattr(staging, "STAGE_BYTES", align * data.draw(st.integers(2, 4)))
    monkeypatch.setattr(staging, "WHOLE_BYTES", data.draw(st.integers(0, 8192)))
    monkeypatch.setattr(staging, "PIECE_BYTES", data.draw(st.integers(4, 4096)))
    if not direct:
        monkeypatch.setattr(staging, "set_direct", lambda fd, on: False)
    cases = {}
    for i, s in enumerate(specs):
        need = 1 + sum((d - 1) * st_ for d, st_ in zip(s.shape, s.strides)) if prod(s.shape) else 0
        cases[f"t{i}"] = torch.randn(max(need, 1)).as_strided(s.shape, s.strides) if need else torch.zeros(s.shape)
    path = tmp_path / "o.safetensors"
    stio.write_stream(str(path), [_out(n, x) for n, x in cases.items()], {"k": "v"})
    got = load_file(str(path))
    for n, x in cases.items():
        assert torch.equal(got[n], x), n
