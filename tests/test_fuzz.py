"""Property-based tests of the header and archive validation (hypothesis).

Whatever bytes arrive, the readers either accept a file whose layout is sound or
refuse it with a ConvertError: never another exception, never a silent partial read.
The torch-free ``.pth`` reader, on structured mutations of real torch.save pickles and
archives, either gives torch.load's tensors or refuses (issue 23).
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickletools
import struct
import tempfile
import warnings
import zipfile
import zlib
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from converters.io import safetensors_io as stio
from converters.io import sources
from converters.format.arrays import from_torch, to_torch
from converters.errors import ConvertError
from converters.io.sources import open_source
from tests import hostile

# make test runs the bounded form: a quarter of the examples; INDEXTTS_TEST_FULL=1 (make test-slow) all of them.
FULL = os.environ.get("INDEXTTS_TEST_FULL", "") not in ("", "0")
pytestmark = pytest.mark.fuzz


def _examples(n: int) -> int:
    return n if FULL else n // 4


FAST = settings(max_examples=_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=_examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

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
    from converters.io import pth_reader
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


# ------------------------------------------------------------------ the torch-free reader against torch (issue 23)
#
# Structured mutations of real torch.save pickles and archives.  Every outcome is one of
# two: open_source gives the tensors torch.load(weights_only=True) gives for the same
# bytes (after the same unwrapping; compared as bytes, for NaN), or it refuses with a
# one-line ConvertError.  torch.load runs only on files the reader accepted: those passed
# its tuple-depth check, so torch cannot crash on them.

AGREE = settings(max_examples=_examples(300), deadline=timedelta(seconds=10), suppress_health_check=list(HealthCheck))


@functools.lru_cache(maxsize=None)
def _bases() -> tuple[str, ...]:
    """torch.save files the mutations start from: a state dict (all the reader's dtypes,
    views, Parameters, _metadata), a training checkpoint, a net of state dicts, a bare
    tensor."""
    d = tempfile.mkdtemp(prefix="fuzz-bases-")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict(
        w=base, t=base.t(), s=base[1:3, 2:], e=torch.zeros(0, 3), h=torch.randn(5, generator=g).half(),
        b=torch.randn(3, generator=g).bfloat16(), i=torch.arange(5), u=torch.arange(4, dtype=torch.uint8),
        m=torch.tensor([True, False]), nan=torch.tensor([float("nan"), -0.0]), p=torch.nn.Parameter(torch.ones(2)),
        x=torch.arange(3.0).reshape(3, 1).expand(3, 2))
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    objs = {
        "sd": sd,
        "training": {"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3}]},
                     "epoch": 3},
        "net": {"net": {"cfm": collections.OrderedDict(a=base[0]), "lr": {"b": torch.arange(3.0)}}, "iters": 7},
        "bare": torch.arange(6.0).reshape(2, 3),
    }
    paths = []
    for name, obj in objs.items():
        paths.append(os.path.join(d, f"{name}.pth"))
        torch.save(obj, paths[-1])
    return tuple(paths)


def _tensors_of(src) -> list:
    return [(n, src.dtypes[n], tuple(src.shapes[n]), None if src.tensors[n] is None else src.tensors[n].tobytes())
            for n in src.names()]


def _same_or_refused(path: str) -> str:
    """Asserts the two outcomes; returns which it was."""
    try:
        src = sources.open_source(path)
    except ConvertError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return "refused"
    with src:
        ours = (_tensors_of(src), src.dropped)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The oracle, as the converter calls it (map_location: a checkpoint saved on a GPU reads on the
            # CPU); it must accept what the reader accepted.
            obj = torch.load(path, map_location="cpu", weights_only=True)
        ref = sources.MappingSource(path, "pth-zip", {}, {})
        ref.tensors = {}
        for name, t in sources.unwrap(sources._torch_leaves(obj), ref).items():
            ref.tensors[name], ref.shapes[name], ref.dtypes[name] = t.array, tuple(t.array.shape) if t.array is not None else t.shape, t.dtype
        assert ours == (_tensors_of(ref), ref.dropped)
    return "same"


# Opcodes inserted or replacing one: torch's (values, containers, calls, memo), and some
# torch does not run (POP, DUP, FRAME, a text INT).
_SNIPPETS = [b"N", b")", b"]", b"}", b"\x8f", b"K\x07", b"K\x00", b"J\xff\xff\xff\xff", b"M\x01\x00",
             b"G" + struct.pack(">d", 2.5), hostile.op_str("model"), hostile.op_str("storage"), b"U\x01a", b"\x8a\x01\x05",
             b"\x88", b"\x89", b"(", b"t", b"\x85", b"\x86", b"\x87", b"s", b"u", b"a", b"e", b"R", b"b", b"Q", b"\x81",
             b"ccollections\nOrderedDict\n", b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n",
             b"ctorch._utils\n_rebuild_parameter\n", b"ctorch\nSize\n", b"cbuiltins\nset\n", b"q\x00", b"r\x00\x00\x01\x00",
             b"0", b"2", b"\x95" + struct.pack("<Q", 1), b"I1\n", b"."]


_VALUES = {"BININT", "BININT1", "BININT2", "BINUNICODE", "SHORT_BINSTRING", "BINFLOAT", "LONG1", "NONE",
           "NEWTRUE", "NEWFALSE", "BINGET", "LONG_BINGET", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"}


def _ops(pkl: bytes) -> tuple[list[bytes], list[tuple[int, int]], list[int]]:
    """The pickle cut into its opcodes, (index, slot) of each BINPUT, and the indices of
    the opcodes that push a value."""
    cuts, puts, values = [], [], []
    for i, (op, arg, pos) in enumerate(pickletools.genops(pkl)):
        cuts.append(pos)
        if op.name in ("BINPUT", "LONG_BINPUT"):
            puts.append((i, arg))
        elif op.name in _VALUES:
            values.append(i)
    cuts.append(len(pkl))
    return [pkl[a:b] for a, b in zip(cuts, cuts[1:])], puts, values


def _get(slot: int) -> bytes:
    return b"h" + bytes([slot]) if slot < 256 else b"j" + struct.pack("<I", slot)


@st.composite
def mutated_pickles(draw):
    """(base file, its data.pkl with 1-3 structural mutations: an opcode deleted,
    inserted, replaced or moved, or a value replaced by (or an opcode preceded by) a
    BINGET of a memo slot filled earlier)."""
    base = draw(st.sampled_from(_bases()))
    ops, puts, values = _ops(_read_pkl(base))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "memo", "memo", "memo-insert", "swap"]))
        i = draw(st.integers(1, len(ops) - 1))  # never PROTO
        if kind == "memo":
            i = draw(st.sampled_from(values))
        earlier = [slot for at, slot in puts if at < i]
        if kind == "delete":
            del ops[i]
        elif kind in ("insert", "replace"):
            ops[i:i + (kind == "replace")] = [draw(st.sampled_from(_SNIPPETS))]
        elif kind.startswith("memo") and earlier:
            ops[i:i + (kind == "memo")] = [_get(draw(st.sampled_from(earlier)))]
        elif kind == "swap":
            j = draw(st.integers(1, len(ops) - 1))
            ops[i], ops[j] = ops[j], ops[i]
        if kind != "memo" and kind != "replace":
            break  # indices moved: one structural change per case, besides memo replacements
    return base, b"".join(ops)


def _read_pkl(path: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


@AGREE
@given(case=mutated_pickles())
def test_mutated_pickles_agree_with_torch(tmp_path, case):
    base, pkl = case
    _same_or_refused(hostile.with_pickle(base, str(tmp_path / "m.pth"), pkl))


@st.composite
def wrapped_pickles(draw):
    """A state dict under 1-40 levels of wrapper dicts, with siblings beside each
    wrapper (numbers, strings, a reference to any wrapper dict or to the state dict:
    cycles and shared dicts through the memo), or the wrapper chain itself closed on a
    dict above."""
    body = hostile.state_dict_ops(_bases()[0])  # its dict is memo slot 0; wrapper k's is 10^6 + k
    keys = draw(st.lists(st.sampled_from(["model", "model", "net", "state_dict", "generator"]), min_size=1, max_size=40))
    cycle = draw(st.one_of(st.none(), st.integers(0, len(keys) - 1)))  # the last wrapper holds this one
    slot = [b"j" + struct.pack("<I", 10**6 + k) for k in range(len(keys))]
    opens = [b"}r" + struct.pack("<I", 10**6 + k) + b"(" + hostile.op_str(key) for k, key in enumerate(keys)]
    closes = []
    for _ in keys:  # siblings come after the wrapped value: every slot is filled by then
        siblings = b""
        for _ in range(draw(st.integers(0, 2))):
            name = draw(st.sampled_from(["epoch", "optimizer", "x", "iters", "model", "net"]))
            body_ref = [b"h\x01"] if cycle is None else []  # memo slot 1: the state dict (0 is OrderedDict)
            siblings += hostile.op_str(name) + draw(st.sampled_from([b"K\x03", hostile.op_str("v"), *body_ref, *slot]))
        closes.append(siblings + b"u")
    value = body if cycle is None else slot[cycle]
    return b"\x80\x02" + b"".join(opens) + value + b"".join(reversed(closes)) + b"."


@AGREE
@given(pkl=wrapped_pickles())
def test_nested_wrappers_agree_with_torch(tmp_path, pkl):
    _same_or_refused(hostile.with_pickle(_bases()[0], str(tmp_path / "w.pth"), pkl))


_LIES = [("local", "name", b"x/data/0"), ("local", "crc", 1), ("local", "csize", 5), ("local", "usize", 5),
         ("local", "flags", 0x800), ("local", "method", 8), ("central", "crc", 1), ("central", "csize", 1),
         ("central", "usize", 1), ("central", "flags", 0x800), ("central", "offset", 0), ("central", "offset", 3),
         ("central", "name", b"zz"), ("descriptor", None, b"PK\x07\x08\0\0\0\0\0\0\0\0\0\0\0\0")]


@st.composite
def forged_archives(draw):
    """(base file, its records with one duplicated (same or other bytes, same name or
    another case) or one header field that lies, whether the archive must be refused)."""
    base = draw(st.sampled_from(_bases()))
    recs = hostile.torch_records(base)
    i = draw(st.integers(0, len(recs) - 1))
    if draw(st.booleans()):
        r = recs[i]
        name = r.name if draw(st.booleans()) else r.name.upper()
        data = r.data if draw(st.booleans()) else bytes(len(r.data))
        recs.insert(draw(st.integers(1, len(recs))), hostile.ZipRecord(name, data))
        return base, recs, True
    where, field, value = draw(st.sampled_from(_LIES))
    if where == "descriptor":
        recs[i].descriptor = value
    else:
        getattr(recs[i], where)[field] = value
    return base, recs, False


@AGREE
@given(case=forged_archives())
def test_forged_archives_agree_with_torch(tmp_path, case):
    base, recs, must_refuse = case
    outcome = _same_or_refused(hostile.forge_zip(str(tmp_path / "z.pth"), recs))
    assert outcome == "refused" or not must_refuse
