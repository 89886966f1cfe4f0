"""The torch-free ``.pth`` reader (:func:`pth_reader.load_arrays`) against
``torch.load(weights_only=True)`` as the oracle: same bytes, shapes, dtypes and layouts,
the same refusals, torch only as a fallback, and torch never imported by the reader."""

from __future__ import annotations

import collections
import io
import mmap
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from converters.format import arrays
from converters.io import pth_reader, sources
from converters.errors import ConvertError
from converters.io.pth_reader import NeedsTorch, Stored, check_zip, load_arrays
from tests import hostile
from tests.helpers import ROOT

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


def _save(tmp_path, obj, name="ckpt.pth") -> str:
    torch.save(obj, tmp_path / name)
    return str(tmp_path / name)


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _match(ours, theirs, where="") -> None:
    """ours (load_arrays) equals theirs (torch.load) leaf by leaf, containers included."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, Stored) and ours.dtype == arrays.torch_dtype_name(theirs.dtype), where
        assert ours.array.shape == tuple(theirs.shape), where
        got = arrays.to_torch(ours.array, ours.dtype)
        assert got.dtype == theirs.dtype and torch.equal(got, theirs.detach()), where
        assert ours.array.tobytes() == _raw(theirs), where  # -0.0, bf16 bits
    elif isinstance(theirs, (dict, list, tuple)):
        assert type(ours) is type(theirs), where
        keys = list(theirs) if isinstance(theirs, dict) else range(len(theirs))
        assert (list(ours) if isinstance(ours, dict) else range(len(ours))) == keys, where
        for k in keys:
            _match(ours[k], theirs[k], f"{where}/{k}")
    else:
        assert ours == theirs and type(ours) is type(theirs), where


def _sample(dt: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if dt == torch.bool:
        return torch.rand(4, 5, generator=g) > 0.5
    if dt.is_floating_point:
        fi = torch.finfo(dt)
        special = torch.tensor([fi.max, fi.min, fi.tiny, fi.tiny / 4, -0.0, 0.0, float("inf"), -float("inf")], dtype=dt)
        return torch.cat([torch.randn(12, generator=g, dtype=torch.float64).to(dt), special]).reshape(4, 5)
    bits = np.random.default_rng(1).integers(0, 256, 20 * dt.itemsize, dtype=np.uint8)  # every bit pattern
    return torch.from_numpy(bits).view(dt).reshape(4, 5)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_every_dtype_matches_torch(tmp_path, mapped):
    sd = {str(dt).replace("torch.", ""): _sample(dt) for dt in DTYPES}
    path = _save(tmp_path, sd)
    assert check_zip(path) is True  # torch.save stores records uncompressed
    ours = load_arrays(path, mapped=mapped)
    _match(ours, torch.load(path, weights_only=True))
    assert [v.dtype for v in ours.values()] == ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
    bf16 = ours["bfloat16"].array
    assert bf16.dtype == np.uint16 and bf16.tobytes() == sd["bfloat16"].view(torch.uint16).numpy().tobytes()


def test_layouts_match_torch(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    p, q = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    sd = collections.OrderedDict(base=base, t=base.t(), slice=base[1:3, 2:], empty=torch.zeros(0, 3),
                                 empty_view=base[:, 6:], scalar=torch.tensor(2.5, dtype=torch.float64),
                                 expanded=torch.arange(3.0).reshape(3, 1).expand(3, 4), p=p, q=q,
                                 nested={"inner": collections.OrderedDict(a=base[3]), "n": 3, "l": [1.5, "x", None]})
    path = _save(tmp_path, sd)
    pkl = (tmp_path / "ckpt.pth").read_bytes()  # data.pkl is stored uncompressed
    assert b"\n_rebuild_parameter\n" in pkl
    theirs = torch.load(path, weights_only=True)
    assert theirs["t"].stride() == (1, 6) and theirs["expanded"].stride() == (1, 0) and theirs["p"].requires_grad
    assert theirs["slice"].storage_offset() == 8 and theirs["t"].data_ptr() == theirs["base"].data_ptr()  # kept
    ours = load_arrays(path, mapped=check_zip(path))
    _match(ours, theirs)
    a = {k: ours[k].array for k in ("base", "t", "slice", "expanded")}
    assert a["t"].strides == (4, 24) and a["expanded"].strides == (4, 0) and np.shares_memory(a["t"], a["base"])
    at = ours["nested"]["inner"]["a"].array.ctypes.data  # base[3]: 18 floats in
    assert a["slice"].ctypes.data == a["base"].ctypes.data + 8 * 4 == at - 10 * 4
    assert ours["scalar"].array.shape == () and ours["scalar"].array[()] == 2.5


def _sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return collections.OrderedDict(
        [("conv.weight", torch.randn(4, 3, 2, generator=g)), ("conv.bias", torch.randn(4, generator=g).bfloat16()),
         ("norm.weight", torch.randn(3, 4, generator=g).t()), ("steps", torch.tensor(7))])


WRAPPED = {
    "training": lambda: {"model": _sd(), "epoch": 3, "optimizer": {"param_groups": [{"lr": 1e-3, "params": [0]}],
                                                                   "state": {0: {"exp_avg": torch.ones(3)}}}},
    "ddp_ordered": lambda: collections.OrderedDict((f"module.{k}", v) for k, v in _sd().items()),
    "net": lambda: {"net": {"cfm": _sd(1), "length_regulator": _sd(2)}, "iters": 10},
    "generator": lambda: {"generator": _sd(3)},
    "bare": lambda: torch.randn(2, 3).t(),
}


@pytest.mark.parametrize("case", list(WRAPPED))
def test_open_source_same_as_torch_reader(tmp_path, monkeypatch, case):
    path = _save(tmp_path, WRAPPED[case]())
    with monkeypatch.context() as m:
        m.setattr(pth_reader, "load_pickle", None)  # the default path must not need torch.load
        ours = sources.open_source(path)
    monkeypatch.setattr(sources, "FORCE_TORCH_READER", True)
    theirs = sources.open_source(path)
    assert ours.names() == theirs.names() and ours.names() and ours.shapes == theirs.shapes
    assert ours.dtypes == theirs.dtypes and ours.dropped == theirs.dropped and ours.notes == theirs.notes
    for n in ours.names():
        a, b = ours.get(n), theirs.get(n)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), n


def _owner(a: np.ndarray):
    while isinstance(a, np.ndarray):
        a = a.base
    return a


def test_compressed_records_and_copy_on_write(tmp_path):
    path = _save(tmp_path, _sd())
    packed = str(tmp_path / "deflated.pth")
    hostile._rewrite_zip(path, packed, lambda n, d, _: (d, zipfile.ZIP_DEFLATED if "/data/" in n else zipfile.ZIP_STORED))
    assert check_zip(packed) is False and check_zip(path) is True  # False: a storage record is deflated
    read = load_arrays(packed, mapped=False)
    _match(read, torch.load(packed, weights_only=True))
    assert all(not isinstance(_owner(v.array), mmap.mmap) for v in read.values())
    before = (tmp_path / "ckpt.pth").read_bytes()
    mapped = load_arrays(path, mapped=True)
    _match(mapped, torch.load(path, weights_only=True))
    assert all(not v.array.flags.owndata and isinstance(_owner(v.array), mmap.mmap) for v in mapped.values())
    mapped["conv.weight"].array[...] = 123.0  # writable (private memory), as sources hand out
    assert (tmp_path / "ckpt.pth").read_bytes() == before  # copy-on-write: the file never changes
    _match(load_arrays(path, mapped=True), torch.load(path, weights_only=True))


@pytest.mark.parametrize("extra", [torch.Size([2, 3]), torch.float32, torch.device("cpu"), collections.Counter(a=1)],
                         ids=["Size", "dtype", "device", "Counter"])
def test_other_globals_fall_back_to_torch(tmp_path, extra):
    sd = _sd()
    path = _save(tmp_path, {"model": sd, "extra": extra})
    with pytest.raises(NeedsTorch):
        load_arrays(path, mapped=check_zip(path))
    src = sources.open_source(path)
    assert any("torch.load" in n for n in src.notes), src.notes
    assert [(k, src.get(k).tobytes(), src.dtypes[k]) for k in src.names()] == [
        (k, _raw(t), arrays.torch_dtype_name(t.dtype)) for k, t in sd.items()]


def test_malicious_pickle_refused_as_by_torch(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    path = _save(tmp_path, {"model": _sd(), "hook": hostile._Payload(str(marker))})
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(NeedsTorch, match="system"):
        load_arrays(path, mapped=True)
    with pytest.raises(ConvertError) as ours:
        sources.open_source(path)
    monkeypatch.setattr(sources, "FORCE_TORCH_READER", True)
    with pytest.raises(ConvertError) as theirs:
        sources.open_source(path)
    assert str(ours.value) == str(theirs.value) and "refused" in str(ours.value) and path in str(ours.value)
    assert not marker.exists()


_STORAGE = object()  # stands for the one storage, "0": 6 floats


class _Tensor(tuple):  # pickles as torch.save pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_STORAGE, *self, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 6) if obj is _STORAGE else None


def _forged(tmp_path, offset, size, stride) -> str:
    """torch.save's checkpoint of arange(6.), its data.pkl rewritten (CRCs recomputed)
    so the tensor has this offset, shape and strides over the same 6-float storage."""
    good, path, buf = _save(tmp_path, {"w": torch.arange(6.0)}, "good.pth"), str(tmp_path / "forged.pth"), io.BytesIO()
    _Pickler(buf, protocol=2).dump({"w": _Tensor((offset, size, stride))})
    pkl = buf.getvalue()
    hostile._rewrite_zip(good, path, lambda n, d, _: (pkl if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
    assert check_zip(path) is True  # the archive checks pass: only load_arrays can see the layout
    return path


PAST, BAD = "reaches past the end of its storage", "malformed tensor"
FORGED = [((0, (6,), (1,)), None), ((5, (1,), (1,)), None), ((1, (2, 2), (1, 3)), None), ((0, (3, 2), (1, 3)), None),
          ((2, (4, 0), (1, 1)), None), ((1, (6,), (1,)), PAST), ((6, (1,), (1,)), PAST), ((0, (3,), (3,)), PAST),
          ((0, (2, 3), (3, 2)), PAST), ((4, (2, 2), (1, 1)), PAST), ((5, (6,), (-1,)), BAD), ((0, (6,), (1, 1)), BAD),
          ((0, (2.0, 3), (3, 1)), BAD), ((0, ("6",), (1,)), BAD), ((-1, (1,), (1,)), BAD)]


@pytest.mark.parametrize("layout,refusal", FORGED, ids=[f"{ {None: 'fits', PAST: 'past', BAD: 'bad'}[r]}-{i}" for i, (_, r) in enumerate(FORGED)])
def test_forged_layouts(tmp_path, layout, refusal):
    path = _forged(tmp_path, *layout)
    if refusal is None:  # the forging itself is sound: layouts that fit read as torch reads them
        _match(load_arrays(path, mapped=True), torch.load(path, weights_only=True))
        return
    for mapped in (True, False):
        with pytest.raises(ConvertError, match=refusal) as e:
            load_arrays(path, mapped=mapped)
        assert path in str(e.value)
    with pytest.raises((RuntimeError, TypeError)):  # torch refuses it too
        torch.load(path, weights_only=True)


def test_reader_never_imports_torch(tmp_path):
    path = _save(tmp_path, {"model": _sd(), "epoch": 1})
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from converters.io import pth_reader; "
            "o = pth_reader.load_arrays(sys.argv[2], mapped=pth_reader.check_zip(sys.argv[2])); "
            "print(o['model']['steps'].array.item(), o['model']['conv.bias'].dtype, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, ROOT, path], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["7", "BF16", "False"]


def _op_str(x: str) -> bytes:  # BINUNICODE
    return b"X" + struct.pack("<I", len(x)) + x.encode()


def _op_int(n: int) -> bytes:  # BININT
    return b"J" + struct.pack("<i", n)


def _op_storage(cls: str, numel: int) -> bytes:  # persistent id ("storage", torch.<cls>, "0", "cpu", numel)
    return b"(" + _op_str("storage") + b"ctorch\n" + cls.encode() + b"\n" + _op_str("0") + _op_str("cpu") + _op_int(numel) + b"tQ"


def _op_tensor(storage: bytes, n: int) -> bytes:  # _rebuild_tensor_v2(storage, 0, (n,), (1,), False, OrderedDict())
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _op_int(0) + b"(" + _op_int(n) + b"t(" + _op_int(1)
            + b"t\x89ccollections\nOrderedDict\n)RtR")


# A BUILD on the storage reference that raises its size after check_zip validated it;
# one storage key under two storage classes.
HAND_FORGED = {
    "build": b"\x80\x02}" + _op_str("w") + _op_tensor(_op_storage("FloatStorage", 6) + b"}" + _op_str("numel") + _op_int(40) + b"sb", 40) + b"s.",
    "two_types": b"\x80\x02}" + _op_str("x") + _op_tensor(_op_storage("FloatStorage", 6), 6) + b"s" + _op_str("y")
                 + _op_tensor(_op_storage("DoubleStorage", 3), 3) + b"s.",
}


@pytest.mark.parametrize("case", list(HAND_FORGED))
def test_hand_forged_pickles_go_to_torch(tmp_path, monkeypatch, case):
    """What the reader cannot build exactly as torch does (BUILD on anything but an
    OrderedDict, a storage under two types) is handed to torch.load: never a read past
    a checked record, never a mislabelled dtype."""
    good, path = _save(tmp_path, {"w": torch.arange(6.0), "b": torch.full((64,), 7.0)}, "good.pth"), str(tmp_path / f"{case}.pth")
    hostile._rewrite_zip(good, path, lambda n, d, _: (HAND_FORGED[case] if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
    assert check_zip(path) is True
    for mapped in (True, False):
        with pytest.raises(NeedsTorch):
            load_arrays(path, mapped=mapped)
    results = []
    for force in (False, True):
        monkeypatch.setattr(sources, "FORCE_TORCH_READER", force)
        try:
            with sources.open_source(path) as src:
                results.append(("ok", dict(src.dtypes), {n: src.get(n).tobytes() for n in src.names()}))
        except ConvertError as e:
            results.append(("refused", str(e)))
    assert results[0] == results[1]
    if case == "build":
        assert results[0][0] == "refused"  # torch refuses the resized storage
