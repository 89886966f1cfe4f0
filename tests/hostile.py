"""Generator of the hostile and broken input corpus (issue: reliability).

Each function writes one case into a folder laid out like a BigVGAN source
(``config.json`` beside the checkpoint) and returns the checkpoint path.  The tests in
test_hostile.py run the CLI on each and assert the exact outcome.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
import zipfile

import torch
from safetensors.torch import save_file

from tests.upstream import bigvgan as up


def base(folder: str) -> str:
    """A good tiny BigVGAN release; returns the checkpoint path."""
    return up.save_release(up.build(seed=7), folder)


def _sibling(folder: str, name: str, data: bytes, good: str) -> str:
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(os.path.dirname(good), "config.json"), os.path.join(folder, "config.json"))
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def empty(folder, good):
    return _sibling(folder, "bigvgan_generator.pt", b"", good)


def truncated_pth(folder, good):
    data = open(good, "rb").read()
    return _sibling(folder, "bigvgan_generator.pt", data[: len(data) // 2], good)


def truncated_safetensors(folder, good):
    data = open(_safetensors_of(folder + "-st", good), "rb").read()
    return _sibling(folder, "model.safetensors", data[: len(data) - 100], good)


def _noise(n: int, seed: int) -> bytes:
    """Seeded random bytes: the same file on every run (os.urandom once drew, one run in
    256, a ninth byte of ``{`` and so a different, safetensors-shaped refusal)."""
    import random

    return random.Random(seed).randbytes(n)


def random_bytes(folder, good):
    data = _noise(4096, 24)
    assert data[8:9] != b"{" and not data.startswith((b"PK", b"\x80")), "seed gives a recognised magic"
    return _sibling(folder, "bigvgan_generator.pt", data, good)


def random_bytes_brace(folder, good):
    """Noise whose ninth byte is ``{``: it sniffs as safetensors, and the header length in
    its first eight bytes is what gets refused."""
    data = bytearray(_noise(4096, 24))
    data[8:9] = b"{"
    return _sibling(folder, "bigvgan_generator.pt", bytes(data), good)


def lfs_pointer(folder, good):
    text = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 451236412\n"
    return _sibling(folder, "bigvgan_generator.pt", text, good)


def html_page(folder, good):
    return _sibling(folder, "bigvgan_generator.pt", b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n", good)


class _Payload:
    """Pickles to a call of os.system that would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(folder, good, marker):
    """A zip checkpoint whose data.pkl calls os.system when unpickled unsafely."""
    os.makedirs(folder, exist_ok=True)
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    torch.save({"generator": {"conv_pre.bias": torch.zeros(2)}, "hook": _Payload(marker)}, path)
    return path


class _Importer:
    def __reduce__(self):
        return (__import__, ("this",))  # imports a module with a visible side effect


def pickle_import(folder, good):
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    torch.save({"generator": {"x": torch.zeros(1)}, "hook": _Importer()}, path)
    return path


def legacy_pth(folder, good):
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    sd = torch.load(good, weights_only=True)
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    return path


def _rewrite_zip(src: str, dst: str, edit) -> None:
    """Copy a zip archive record by record, letting ``edit(name, data, info)`` change
    a record's bytes or compression."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            data, compress = edit(info.filename, data, info)
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.compress_type = compress
            zout.writestr(zi, data)


def lying_storage(folder, good):
    """data.pkl declares one storage larger than its zip record: an mmap load would
    read the neighbouring record's bytes as weights."""
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    # Find a float storage's numel in the pickle and bump it by patching data.pkl.
    with zipfile.ZipFile(good) as z:
        pkl_name = next(n for n in z.namelist() if n.endswith("data.pkl"))

    def edit(name, data, info):
        if name == pkl_name:
            # The first storage id: ... 'cpu' [BINPUT k] BININT1 numel TUPLE.
            k = data.index(b"X\x03\x00\x00\x00cpu") + 8
            if data[k] == ord("q"):
                k += 2
            if data[k] != ord("K") or data[k + 2] != ord("t") or data[k + 1] > 250:
                raise RuntimeError("unexpected pickle layout")
            data = data[: k + 1] + bytes([data[k + 1] + 4]) + data[k + 2 :]
        return data, zipfile.ZIP_STORED

    _rewrite_zip(good, path, edit)
    return path


def compressed_records(folder, good):
    """A valid checkpoint whose storage records are deflate-compressed."""
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    _rewrite_zip(good, path, lambda name, data, info: (data, zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED))
    return path


def _safetensors_of(folder, good):
    os.makedirs(folder, exist_ok=True)
    sd = torch.load(good, weights_only=True)["generator"]
    path = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _raw_safetensors(folder, good, header: dict | bytes, data: bytes, length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return _sibling(folder, "model.safetensors", struct.pack("<Q", n) + raw + data, good)


def st_header_past_end(folder, good):
    return _raw_safetensors(folder, good, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, length=10_000)


def st_header_oversized(folder, good):
    return _raw_safetensors(folder, good, b"{}", b"", length=200_000_000)


def st_overlap(folder, good):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    return _raw_safetensors(folder, good, h, b"\0" * 12)


def st_gap(folder, good):
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    return _raw_safetensors(folder, good, h, b"\0" * 12)


def st_duplicate_key(folder, good):
    raw = (b'{"conv_pre.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
           b'"conv_pre.bias":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    return _raw_safetensors(folder, good, raw, b"\0" * 8)


def st_metadata_tensor(folder, good):
    h = {"__metadata__": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return _raw_safetensors(folder, good, h, b"\0" * 4)


def st_trailing(folder, good):
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return _raw_safetensors(folder, good, h, b"\0" * 4 + b"junk")


def st_bad_dtype(folder, good):
    h = {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}
    return _raw_safetensors(folder, good, h, b"\0" * 8)


def unsupported_dtype_pth(folder, good):
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    sd = torch.load(good, weights_only=True)
    sd["generator"]["conv_pre.bias"] = sd["generator"]["conv_pre.bias"].to(torch.complex64)
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------ zip bombs (issue 15)

GiB = 1 << 30


def _zeros_deflated(n: int):
    """A raw deflate stream of n zero bytes (n a multiple of 1 MiB), as chunks, built
    in milliseconds: after a full flush the compressor starts afresh, so every 1 MiB
    block compresses to the same ~1 KB, which is repeated (3 GiB -> 3 MB)."""
    import zlib

    mib = 1 << 20
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = co.compress(bytes(mib)) + co.flush(zlib.Z_FULL_FLUSH)
    end = co.flush(zlib.Z_FINISH)
    return [block] * (n // mib) + [end]


def _zeros_crc(n: int) -> int:
    import zlib

    crc, mib = 0, bytes(1 << 20)
    for _ in range(n >> 20):
        crc = zlib.crc32(mib, crc)
    return crc


def _raw_zip(path: str, records) -> None:
    """A zip written by hand, so a record's declared size and compressed bytes can be
    anything: records are (name, method, crc, chunks of compressed bytes, declared size)."""
    with open(path, "wb") as f:
        central = []
        for name, method, crc, chunks, size in records:
            off, n = f.tell(), name.encode()
            csize = sum(len(c) for c in chunks)
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, csize, size, len(n), 0) + n)
            for c in chunks:
                f.write(c)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, csize, size,
                                       len(n), 0, 0, 0, 0, 0, off) + n)
        cd = b"".join(central)
        at = f.tell()
        f.write(cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(cd), at, 0))


def _stored(name: str, data: bytes):
    import zlib

    return (name, zipfile.ZIP_STORED, zlib.crc32(data), [data], len(data))


_META = [_stored("archive/version", b"3\n"), _stored("archive/byteorder", b"little")]


def pickle_bomb(folder, good):
    """3 MB on disk: archive/data.pkl is deflated zeros declaring (truthfully) 3 GiB."""
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    n = 3 * GiB
    _raw_zip(path, [("archive/data.pkl", zipfile.ZIP_DEFLATED, _zeros_crc(n), _zeros_deflated(n), n)] + _META)
    return path


def pickle_bomb_lying(folder, good):
    """The same 3 GiB stream, but the zip headers declare 4 KiB: only a reader that
    stops at the declared size is safe."""
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    _raw_zip(path, [("archive/data.pkl", zipfile.ZIP_DEFLATED, _zeros_crc(4096), _zeros_deflated(3 * GiB), 4096)] + _META)
    return path


def torch_pickle(tensors: dict[str, int]) -> bytes:
    """data.pkl of ``{"generator": {name: float32 tensor of numel}}``, storages "0", "1",
    ..., written the way torch.save writes it (torch.load reads it)."""
    import collections
    import io

    class Storage:
        def __init__(self, key, numel):
            self.key, self.numel = key, numel

    class Tensor:
        def __init__(self, storage):
            self.storage = storage

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (self.storage, 0, (self.storage.numel,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"generator": {n: Tensor(Storage(str(i), k)) for i, (n, k) in enumerate(tensors.items())}})
    return buf.getvalue()


def storage_bomb(folder, good):
    """A 1 MB file whose pickle declares a 1 GiB float storage, deflated zeros: every
    size agrees, only the compression ratio (about 1000x) gives it away."""
    path = _sibling(folder, "bigvgan_generator.pt", b"", good)
    n = GiB
    pkl = torch_pickle({"conv_pre.weight": n // 4})
    _raw_zip(path, [_stored("archive/data.pkl", pkl),
                    ("archive/data/0", zipfile.ZIP_DEFLATED, _zeros_crc(n), _zeros_deflated(n), n)] + _META)
    return path


# ------------------------------------------------------------------ forged archives and pickles (issue 23)


@dataclasses.dataclass
class ZipRecord:
    """One record of :func:`forge_zip`: its name and bytes, and what its local header
    (``local``), central directory entry (``central``) and data descriptor may say
    instead of the truth.  Keys: ``name`` (bytes), ``flags``, ``method``, ``crc``,
    ``csize``, ``usize``, and in ``central`` also ``offset`` (a number, or the name of
    a record: where that record's bytes start)."""

    name: str
    data: bytes
    local: dict = dataclasses.field(default_factory=dict)
    central: dict = dataclasses.field(default_factory=dict)
    descriptor: bytes | None = None  # the bytes after the data when flag bit 3 is set
    extra: bytes = b""  # the local header's extra field


def torch_records(path: str) -> list[ZipRecord]:
    """The records of a torch.save file, in order."""
    with zipfile.ZipFile(path) as z:
        return [ZipRecord(i.filename, z.read(i)) for i in z.infolist()]


def forge_zip(path: str, records: list[ZipRecord], flags: int = 0x808, count: int | None = None,
              cd_offset: int | None = None, tail: bytes = b"") -> str:
    """A stored zip written field by field, by default as torch.save writes one (flag
    bit 3: zeros in the local header and the CRC and sizes in a data descriptor after
    the data; UTF-8 names; a zip64 end record before the end record), with what each
    record's headers say open to forgery; ``count`` and ``cd_offset`` are what the end
    records say, ``tail`` bytes after them."""
    import zlib

    out, offsets, data_at = bytearray(), [], {}
    for r in records:
        off, name, crc, n = len(out), r.name.encode(), zlib.crc32(r.data), len(r.data)
        offsets.append(off)
        fl = r.local.get("flags", flags)
        truth = (0, 0, 0) if fl & 8 else (crc, n, n)
        lname = r.local.get("name", name)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, fl, r.local.get("method", 0), 0, 0x21,
                           r.local.get("crc", truth[0]), r.local.get("csize", truth[1]), r.local.get("usize", truth[2]),
                           len(lname), len(r.extra)) + lname + r.extra
        data_at[r.name] = len(out)
        out += r.data
        if fl & 8:
            out += r.descriptor if r.descriptor is not None else struct.pack("<IIII", 0x08074B50, crc, n, n)
    central = []
    for r, off in zip(records, offsets):
        name, crc, n = r.name.encode(), zlib.crc32(r.data), len(r.data)
        cname, off = r.central.get("name", name), r.central.get("offset", off)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, r.central.get("flags", flags),
                                   r.central.get("method", 0), 0, 0x21, r.central.get("crc", crc),
                                   r.central.get("csize", n), r.central.get("usize", n), len(cname), 0, 0, 0, 0, 0,
                                   data_at[off] if isinstance(off, str) else off) + cname)
    cd, at = b"".join(central), len(out)
    k = len(records) if count is None else count
    where = at if cd_offset is None else cd_offset
    out += cd
    end64 = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 30, 45, 0, 0, k, k, len(cd), where)
    out += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, k, k, len(cd), where, 0) + tail
    with open(path, "wb") as f:
        f.write(out)
    return path


def local_header(name: str, data: bytes) -> bytes:
    """A record's local header and bytes (flag bit 3 clear), to hide inside another."""
    import zlib

    n = name.encode()
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x800, 0, 0, 0x21, zlib.crc32(data), len(data), len(data),
                       len(n), 0) + n + data


def op_str(x: str) -> bytes:
    """BINUNICODE x."""
    return b"X" + struct.pack("<I", len(x.encode())) + x.encode()


def state_dict_ops(path: str) -> bytes:
    """The opcodes that build a torch.save file's top-level object, without PROTO and
    STOP: to embed it in a forged pickle."""
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert pkl[:2] == b"\x80\x02" and pkl[-1:] == b"."
    return pkl[2:-1]


def with_pickle(good: str, path: str, pkl: bytes) -> str:
    """``good`` (a torch.save file) with its data.pkl replaced, CRCs recomputed."""
    _rewrite_zip(good, path, lambda n, d, _: (pkl if n.endswith("/data.pkl") else d, zipfile.ZIP_STORED))
    return path


def nested_wrappers(body: bytes, depth: int, key: str = "model") -> bytes:
    """data.pkl of ``{key: {key: ... body}}``, ``depth`` dicts deep."""
    return b"\x80\x02" + (b"}" + op_str(key)) * depth + body + b"s" * depth + b"."


def self_wrapper() -> bytes:
    """data.pkl of ``d = {}; d["model"] = d``: a wrapper that contains itself (memo)."""
    return b"\x80\x02}r\x00\x01\x00\x00" + op_str("model") + b"j\x00\x01\x00\x00s."


def mutual_wrappers() -> bytes:
    """data.pkl of ``a = {"model": b}; b = {"model": a}``."""
    return b"\x80\x02}q\x01" + op_str("model") + b"}" + op_str("model") + b"h\x01ss."


def deep_tuple_key(depth: int) -> bytes:
    """data.pkl of ``{((((),),),): 1}``, the key ``depth`` tuples deep: hashing it
    recurses in C (at 10^6 it crashes Python)."""
    return b"\x80\x02})" + b"\x85" * (depth - 1) + b"K\x01s."


def deep_list_beside(body: bytes, depth: int) -> bytes:
    """data.pkl of ``{"model": state_dict, "junk": [[[...]]]}``, the list ``depth`` deep."""
    return b"\x80\x02}(" + op_str("model") + body + op_str("junk") + b"]" * depth + b"a" * (depth - 1) + b"u."


def legacy_with_object(legacy: str, path: str, pkl: bytes) -> str:
    """A legacy (non-zip) torch.save file with its object pickle (the fourth, after the
    magic number, protocol and system info) replaced by ``pkl``."""
    import io
    import pickletools

    data = open(legacy, "rb").read()
    f = io.BytesIO(data)
    bounds = []
    for _ in range(4):
        start = f.tell()
        for _ in pickletools.genops(f):
            pass
        bounds.append((start, f.tell()))
    start, end = bounds[3]
    with open(path, "wb") as out:
        out.write(data[:start] + pkl + data[end:])
    return path
