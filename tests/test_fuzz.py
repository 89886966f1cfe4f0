"""Property-based tests of the header and archive validation (hypothesis).

Whatever bytes arrive, the readers either accept a file whose layout is sound or
refuse it with a ConvertError: never another exception, never a silent partial read.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from converters import safetensors_io as stio
from converters.arrays import from_torch, to_torch
from converters.errors import ConvertError
from converters.sources import open_source

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

tensors = st.dictionaries(
    st.text("abcdefgh._", min_size=1, max_size=8),
    st.tuples(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8]),
              st.lists(st.integers(0, 4), min_size=0, max_size=3)),
    min_size=1, max_size=5,
).map(lambda d: {k: torch.arange(int(torch.Size(s).numel())).reshape(s).to(dt) for k, (dt, s) in d.items()})


def _valid_bytes(ts: dict) -> bytes:
    return st_save(ts, metadata={"k": "v"})


@st.composite
def mutated(draw):
    data = bytearray(_valid_bytes(draw(tensors)))
    kind = draw(st.sampled_from(["flip", "truncate", "append", "header-len"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=16))
    else:
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


def _check_or_refuse(path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        h = stio.read_header(str(path))
    except ConvertError:
        return
    # Accepted: offsets tile the data section exactly and the library agrees.
    spans = sorted((i.begin, i.end) for i in h.tensors.values())
    pos = h.data_start
    for b, e in spans:
        assert b == pos
        pos = e
    assert pos == len(data)
    loaded = st_load(data)
    assert set(loaded) == set(h.tensors)
    for name, info in h.tensors.items():
        got = stio.read_array(str(path), info)  # the same bytes (NaN payloads included), shape and dtype
        assert got.tobytes() == from_torch(loaded[name]).tobytes() and to_torch(got, info.dtype).dtype == loaded[name].dtype
        assert got.shape == tuple(loaded[name].shape)


@FAST
@given(data=st.binary(max_size=256))
def test_random_bytes_never_crash(tmp_path, data):
    _check_or_refuse(tmp_path / "r.safetensors", data)


@FAST
@given(data=mutated())
def test_mutated_safetensors(tmp_path, data):
    _check_or_refuse(tmp_path / "m.safetensors", data)


@FAST
@given(ts=tensors)
def test_valid_files_accepted(tmp_path, ts):
    p = tmp_path / "v.safetensors"
    p.write_bytes(_valid_bytes(ts))
    h = stio.read_header(str(p))
    for name, t in ts.items():
        assert torch.equal(to_torch(stio.read_array(str(p), h.tensors[name]), h.tensors[name].dtype), t)


def _pth_bytes(ts: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": ts}, buf)
    return buf.getvalue()


@SLOW
@given(ts=tensors, data=st.data())
def test_mutated_pth(tmp_path, ts, data):
    raw = bytearray(_pth_bytes(ts))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    p = tmp_path / "m.pth"
    p.write_bytes(bytes(raw))
    try:
        src = open_source(str(p))
    except ConvertError:
        return
    # Accepted: every tensor is readable with its declared shape.
    for name in src.names():
        assert tuple(src.get(name).shape) == src.shapes[name]


@st.composite
def zip_records(draw):
    """One zip record whose declared size, CRC and compressed bytes may each lie."""
    payload = draw(st.binary(max_size=2048)) * draw(st.integers(1, 40))  # repeats compress well
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    body = payload if method == zipfile.ZIP_STORED else zlib.compress(payload, 6)[2:-4]  # raw deflate
    declared = max(0, len(payload) + draw(st.sampled_from([0, 0, 0, -1, 1, -len(payload), 1000])))
    crc = zlib.crc32(payload) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1))
    cut = draw(st.sampled_from([len(body), len(body), max(0, len(body) - draw(st.integers(1, 16)))]))
    limit = draw(st.sampled_from([1 << 20, max(0, len(payload) - 1)]))
    return payload, method, body[:cut], cut == len(body), declared, crc, limit


@SLOW
@given(rec=zip_records())
def test_bounded_record_reader(tmp_path, rec):
    """read_record returns a record's bytes exactly when its size, stream and CRC all
    agree and it is within the limit; otherwise a ConvertError, never another error."""
    from converters import pth_reader
    from tests import hostile

    payload, method, body, whole, declared, crc, limit = rec
    p = tmp_path / "r.zip"
    hostile._raw_zip(str(p), [("archive/data.pkl", method, crc, [body], declared)])
    info = zipfile.ZipFile(p).infolist()[0]
    good = whole and declared == len(payload) and crc == zlib.crc32(payload) and declared <= limit
    with open(p, "rb") as f:
        try:
            got = pth_reader.read_record(str(p), f, info, limit)
        except ConvertError:
            assert not good
            return
    assert got == payload and declared <= limit and crc == zlib.crc32(payload)
