"""Reading ``.pth``/``.pt`` checkpoints safely: archive validation with bounded
inflation, the scan of ``data.pkl``, the weights-only load (torch-free where the pickle
allows, see :func:`load_arrays`), and page population of memory-mapped tensors.

A zip checkpoint is validated before torch sees it (:func:`open_archive`,
:func:`check_zip`), so that this reader and ``torch.load`` never read different bytes:

- **One reading of the archive.**  The end record (zip64 included) is the last thing in
  the file, and the central directory lies exactly where it says, with the number of
  records it says.  Every record's local header agrees with its central directory entry:
  the same name (byte for byte), compression method, data-descriptor flag (bit 3) and,
  where the local header carries them (bit 3 clear; zip64 extra fields read), the same
  CRC, compressed and uncompressed sizes; where bit 3 is set (``torch.save`` sets it and
  writes zeros there), the data descriptor after the data agrees instead.  Records do
  not overlap each other or the central directory.  The error names the record.
- **Unique names.**  No two records share a name, even ignoring ASCII case: ``torch.load``
  looks records up case-insensitively, and of two records under one name it may read
  either, where Python's ``zipfile`` keeps the last.  This applies to every record,
  ``data.pkl`` included, and there is exactly one ``data.pkl``, in the folder of the
  first record (where torch looks for it), beside a ``version`` record torch accepts.
- **Bounded memory.**  ``data.pkl`` is refused when its declared size is over
  :data:`MAX_PICKLE_BYTES` (16 MiB), before anything is read, and it is inflated in a
  stream that stops one byte past the declared size, so a record whose deflate stream
  lies about its size is refused after at most that much output.  Any other compressed
  record the loader would inflate whole (``version``, ``byteorder``, ...) is held to
  the same limit.  Deflated storages may inflate to at most
  :data:`INFLATE_ALLOWANCE` (64 MiB) in total, or :data:`MAX_INFLATE_RATIO` (20) times
  their compressed size where that is more.
- **Declared storages.**  Every storage ``data.pkl`` refers to, found by running the
  pickle with stub globals (nothing is imported or called, see :class:`_Scan`), has its
  record in the archive with exactly the declared number of bytes:
  ``torch.load(mmap=True)`` does not check this, so a forged pickle would read
  neighbouring bytes.
- **Bounded nesting.**  No tuple in ``data.pkl`` nests more than :data:`MAX_DEPTH` (32)
  tuples deep.  Hashing a tuple recurses in C without a limit, so a dict key nested
  10^6 deep (a megabyte of ``TUPLE1`` opcodes) crashes the interpreter, ``torch.load``
  included; the scan refuses such a pickle before torch sees it.  The pickles of a
  legacy (non-zip) checkpoint, which only torch reads, are scanned so too
  (:func:`check_legacy`).

Both passes over ``data.pkl`` (the scan and :func:`load_arrays`) run the opcodes
``torch.load(weights_only=True)`` runs, and only those (:class:`unpickler.Machine`): a
pickle using any other opcode is refused, as torch refuses it.  Neither recurses over
data from the file.

Why these limits: the pickles of real checkpoints are small, because the weights live
in the storage records: 17-26 KB in the demo, 83 KB for a full-size ``gpt.pth``,
107 KB for ``s2mel.pth`` and 122 KB for CAMPPlus (its ~940 records); a training
checkpoint with optimizer state has about three entries per parameter, still well
under a megabyte.  16 MiB is over 100 times that.  It also bounds what unpickling can
build: a pickle can make objects about 37 times its size (two opcodes, an empty dict
appended to a list, are 2 bytes and 72 bytes of objects), so a 16 MiB pickle can cost
at most about 0.6 GiB when it is read, where 64 MiB could cost 2.3 GiB (the scan, whose
containers are stubs, costs far less; 16 MiB of dicts nested 1.4 million deep peaked at
409 MiB in the converting process, refused in 7 to 12 s).  Storages are the
weights themselves, so their size is not limited, only their compression ratio: float
weights deflate by well under 2x, and only a bomb inflates 20x over more than 64 MiB.
Real checkpoints nest tuples two deep (a tensor's arguments hold its shape) and dicts
three deep (``{"net": {"cfm": state_dict}}``); 32 is ten times that.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..format.arrays import NUMPY
from ..errors import ConvertError
# MAX_DEPTH and NeedsTorch are part of this module's interface too (sources, tests)
from .unpickler import MAX_DEPTH, Machine, NeedsTorch, describe, first_line  # noqa: F401

MAX_PICKLE_BYTES = 16 << 20  # data.pkl (and any other non-storage record torch inflates)
INFLATE_ALLOWANCE = 64 << 20  # deflated storages, in total, inflate to at most this ...
MAX_INFLATE_RATIO = 20  # ... or this many times their compressed size where that is more
CHUNK = 1 << 20  # bytes of compressed input read at a time
# The archive format versions torch 2.x's reader accepts (PyTorchStreamReader: 1 to 10);
# torch.save writes 3.
TORCH_FORMAT_VERSIONS = range(1, 11)

# Bytes per element of the storage classes torch.save writes in persistent ids.
STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "UntypedStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
    "Float8_e4m3fnStorage": 1, "Float8_e5m2Storage": 1,
}

_MiB = 1 << 20


def _mib(n: int) -> str:
    return f"{n / _MiB:.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.1f} GiB"


# ------------------------------------------------------------------ the archive

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, before the name and extra field
_END = struct.Struct("<IHHHHIIH")  # end of central directory record
_LOCATOR = struct.Struct("<IIQI")  # zip64 end of central directory locator
_END64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory record (no extensible data)
_U32 = 0xFFFFFFFF
_DATA_DESCRIPTOR = 8  # general purpose flag bit 3: CRC and sizes follow the data
_UTF8 = 0x800  # general purpose flag bit 11: the name is UTF-8


@dataclass(frozen=True)
class Archive:
    """A zip checkpoint's records as :func:`open_archive` validated them: ``records``
    by name (unique, even ignoring ASCII case), ``starts`` where each record's bytes
    begin, ``prefix`` the folder torch reads (``archive/``) and ``pkl`` its data.pkl."""

    path: str
    records: dict[str, zipfile.ZipInfo]
    starts: dict[str, int]
    prefix: str
    pkl: zipfile.ZipInfo


def open_archive(path: str) -> Archive:
    """The validated records of a zip checkpoint (see the module docstring), or a
    ConvertError naming the record and the disagreement."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos, start_dir = z.infolist(), z.start_dir
    except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on damaged input
        raise ConvertError(f"{path}: damaged zip checkpoint ({type(e).__name__}: {first_line(e)}); "
                           "the file is truncated or corrupt") from None
    if not infos:
        raise ConvertError(f"{path}: zip file with no records; not a torch checkpoint")
    with open(path, "rb") as f:
        _check_directory(path, f, size, len(infos), start_dir)
        raw = _check_names(path, infos)
        starts, spans = {}, []
        for info in infos:
            start, end = _check_local(path, f, info, raw[info.filename], size)
            starts[info.filename] = start
            spans.append((info.header_offset, end, info.filename))
        _check_spans(path, spans, start_dir)
        records = {i.filename: i for i in infos}  # names are unique (checked above)
        prefix, pkl = _pickle_record(path, infos)
        _check_version(path, f, records, prefix)
    return Archive(path, records, starts, prefix, pkl)


def _check_directory(path: str, f, size: int, count: int, start_dir: int) -> None:
    """The end record is the end of the file, and the central directory is where it
    says (Python's zipfile assumes it ends at the end record, torch's miniz reads it at
    the offset given: bytes added before or inside an archive make them differ), with
    as many records as it says (zipfile reads records by size, miniz by count)."""
    tail_len = min(size, _END.size + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = len(tail) - _END.size
    if not (at >= 0 and tail[at:at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")  # an archive comment: the last end record, as zipfile takes it
    if at < 0 or at + _END.size > len(tail):
        raise ConvertError(f"{path}: damaged zip checkpoint: no end of central directory record")
    _, disk, cd_disk, here, total, cd_size, cd_offset, comment = _END.unpack_from(tail, at)
    end = size - tail_len + at
    if end + _END.size + comment != size:
        raise ConvertError(f"{path}: {size - end - _END.size - comment} bytes after the zip archive's end record "
                           "(or a comment of the wrong length); torch.save writes none, and zip readers disagree on "
                           "such a file")
    cd_end = end
    if end >= _LOCATOR.size:
        f.seek(end - _LOCATOR.size)
        sig, loc_disk, at64, disks = _LOCATOR.unpack(f.read(_LOCATOR.size))
        if sig == 0x07064B50:
            cd_end = end - _LOCATOR.size - _END64.size
            if at64 != cd_end or cd_end < 0:
                raise ConvertError(f"{path}: the zip64 end record is not where its locator says ({at64}, not "
                                   f"{cd_end}); zip readers disagree on such a file")
            f.seek(cd_end)
            rec = _END64.unpack(f.read(_END64.size))
            if rec[0] != 0x06064B50 or rec[1] != _END64.size - 12:
                raise ConvertError(f"{path}: damaged zip64 end of central directory record")
            disk, cd_disk, here, total, cd_size, cd_offset = rec[4:]
            disk |= loc_disk | (disks - 1 if disks else 0)
    if disk or cd_disk or here != total:
        raise ConvertError(f"{path}: a multi-disk zip archive; not a torch checkpoint")
    if total != count:
        raise ConvertError(f"{path}: the zip end record counts {total} records but the central directory holds "
                           f"{count}; zip readers would disagree on which records exist")
    if cd_offset != start_dir or cd_offset + cd_size != cd_end:
        raise ConvertError(f"{path}: the zip central directory is not where the end record says (offset {cd_offset}, "
                           f"{cd_size} bytes, but found at {start_dir}): bytes were added before or inside the archive")


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """A record's name as the bytes in the central directory (zipfile decodes them)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & _UTF8 else "cp437")


def _check_names(path: str, infos) -> dict[str, bytes]:
    """Every name once, even ignoring ASCII case (torch looks records up so); returns
    each name's raw bytes."""
    raw, folded = {}, {}
    for info in infos:
        if info.filename != info.orig_filename or "\0" in info.orig_filename:
            raise ConvertError(f"{path}: zip record {describe(info.orig_filename)} has a NUL byte in its name; "
                               "zip readers cut such a name at different places")
        name = _raw_name(info)
        other = folded.get(name.lower())
        if other is not None:
            if other.filename == info.filename:
                raise ConvertError(f"{path}: zip record {info.filename} appears twice; Python's zipfile reads the last "
                                   "of two records with one name and torch may read either, so the file is refused")
            raise ConvertError(f"{path}: zip records {other.filename} and {info.filename} differ only in case; torch "
                               "looks records up ignoring case, so it may read either")
        folded[name.lower()] = info
        raw[info.filename] = name
    return raw


def _zip64_sizes(extra: bytes, csize: int, usize: int) -> tuple[int, int]:
    """A local header's (compressed, uncompressed) sizes, with those it gives as
    0xFFFFFFFF taken from its zip64 extra field (uncompressed first), as zip readers do."""
    i = 0
    while i + 4 <= len(extra):
        kind, n = struct.unpack_from("<HH", extra, i)
        if kind == 1:
            body = extra[i + 4:i + 4 + n]
            if usize == _U32 and len(body) >= 8:
                usize, body = struct.unpack_from("<Q", body)[0], body[8:]
            if csize == _U32 and len(body) >= 8:
                csize = struct.unpack_from("<Q", body)[0]
            break
        i += 4 + n
    return csize, usize


def _check_local(path: str, f, info: zipfile.ZipInfo, raw: bytes, size: int) -> tuple[int, int]:
    """(where the bytes start, where the record ends) after checking the local header
    (and the data descriptor, with flag bit 3) against the central directory entry."""
    what = f"{path}: zip record {info.filename}"
    if info.flag_bits & 1:
        raise ConvertError(f"{what} is encrypted; torch checkpoints are not")
    f.seek(info.header_offset)
    head = f.read(_LOCAL.size)
    if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
        raise ConvertError(f"{what}: no local header at its offset; the file is damaged")
    _, _, flags, method, _, _, crc, csize, usize, n_name, n_extra = _LOCAL.unpack(head)
    name, extra = f.read(n_name), f.read(n_extra)
    if len(extra) != n_extra:
        raise ConvertError(f"{what} lies past the end of the file; truncated")
    if name != raw:
        raise ConvertError(f"{what}: its local header names it {describe(name.decode('utf-8', 'replace'))}; the "
                           "central directory and the local header disagree (a forged archive)")
    if method != info.compress_type:
        raise ConvertError(f"{what}: its local header says compression method {method}, the central directory "
                           f"{info.compress_type}; the file is forged or damaged")
    if (flags ^ info.flag_bits) & _DATA_DESCRIPTOR:
        raise ConvertError(f"{what}: the local header and the central directory disagree on whether a data "
                           "descriptor follows the data (flag bit 3); the file is forged or damaged")
    start = info.header_offset + _LOCAL.size + n_name + n_extra
    end = start + info.compress_size
    if end > size:
        raise ConvertError(f"{what} lies past the end of the file; truncated")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise ConvertError(f"{what}: stored with {info.compress_size} bytes but declares {info.file_size}; "
                           "the file is forged or damaged")
    csize, usize = _zip64_sizes(extra, csize, usize)
    local, central = (crc, csize, usize), (info.CRC, info.compress_size, info.file_size)
    if flags & _DATA_DESCRIPTOR:  # torch.save: zeros here, the values after the data
        if any(a not in (0, b) for a, b in zip(local, central)):
            raise ConvertError(f"{what}: its local header gives CRC {crc:08x}, {csize} bytes compressed, {usize} "
                               f"bytes, the central directory {info.CRC:08x}, {info.compress_size}, {info.file_size}; "
                               "the file is forged or damaged")
        return start, end + _descriptor(what, f, end, central)
    if local != central:
        raise ConvertError(f"{what}: its local header gives CRC {crc:08x}, {csize} bytes compressed, {usize} bytes, "
                           f"the central directory {info.CRC:08x}, {info.compress_size}, {info.file_size}; the file "
                           "is forged or damaged")
    return start, end


def _descriptor(what: str, f, at: int, central: tuple[int, int, int]) -> int:
    """The length of the data descriptor at ``at``, which must repeat the central
    directory's CRC and sizes (signature optional; 4- or 8-byte sizes, zip64)."""
    f.seek(at)
    d = f.read(24)
    for skip in ((4, 0) if d[:4] == b"PK\x07\x08" else (0,)):
        for fmt in ("<III", "<IQQ"):
            n = struct.calcsize(fmt)
            if len(d) >= skip + n and struct.unpack_from(fmt, d, skip) == central:
                return skip + n
    raise ConvertError(f"{what}: its data descriptor (flag bit 3) is missing or disagrees with the central "
                       "directory; the file is forged or damaged")


def _check_spans(path: str, spans: list[tuple[int, int, str]], start_dir: int) -> None:
    """Records do not overlap each other or the central directory."""
    spans = sorted(spans)
    for (_, end, name), (start, _, nxt) in zip(spans, spans[1:]):
        if end > start:
            raise ConvertError(f"{path}: zip records {name} and {nxt} overlap; torch.save never writes overlapping "
                               "records (a forged archive or a zip bomb)")
    if spans[-1][1] > start_dir:
        raise ConvertError(f"{path}: zip record {spans[-1][2]} runs into the central directory; the file is forged "
                           "or damaged")


def _pickle_record(path: str, infos) -> tuple[str, zipfile.ZipInfo]:
    """(the folder torch reads, its data.pkl): torch reads every record from the folder
    of the first one."""
    pkls = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise ConvertError(f"{path}: zip file with {len(pkls)} data.pkl records; not a torch checkpoint")
    first = infos[0].filename
    if "/" not in first:
        raise ConvertError(f"{path}: zip record {first} is not in a folder; torch reads a checkpoint's records "
                           "from the folder of its first record")
    prefix = first[: first.index("/") + 1]
    if pkls[0].filename != prefix + "data.pkl":
        raise ConvertError(f"{path}: zip record {pkls[0].filename} is not in {prefix}, the folder of the first "
                           "record, where torch looks for data.pkl")
    return prefix, pkls[0]


def _check_version(path: str, f, records: dict, prefix: str) -> None:
    """The archive's format version record, which torch reads first and checks."""
    info = records.get(prefix + ".data/version") or records.get(prefix + "version")
    if info is None:
        raise ConvertError(f"{path}: no {prefix}version record; torch refuses an archive without one")
    text = read_record(path, f, info, MAX_PICKLE_BYTES)
    if not re.fullmatch(rb"\s*\d{1,9}\s*", text) or int(text) not in TORCH_FORMAT_VERSIONS:
        raise ConvertError(f"{path}: zip record {info.filename} gives format version {describe(text)}; torch reads "
                           f"versions {TORCH_FORMAT_VERSIONS[0]} to {TORCH_FORMAT_VERSIONS[-1]}")


def read_record(path: str, f, info: zipfile.ZipInfo, limit: int) -> bytes:
    """One zip record's bytes, never more than ``limit``: refused from its declared
    size before anything is read, and inflated in a stream that is refused as soon as
    it goes past the declared size (a deflate stream can expand over 1000 times)."""
    what = f"{path}: zip record {info.filename}"
    if info.file_size > limit:
        raise ConvertError(f"{what} declares {_mib(info.file_size)}, over the {_mib(limit)} limit for records "
                           "inflated into memory; a checkpoint's pickle is kilobytes, so this is a zip bomb or "
                           "not a torch checkpoint; refused before reading it")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ConvertError(f"{what} uses compression method {info.compress_type}; torch checkpoints are stored or deflated")
    try:
        data = _read_bounded(what, f, info)
    except (zlib.error, OSError, ValueError) as e:
        raise ConvertError(f"{what} cannot be read ({type(e).__name__}: {e}); the file is damaged") from None
    if zlib.crc32(data) != info.CRC:
        raise ConvertError(f"{what} fails its CRC check; the file is damaged")
    return data


def _data_offset(what: str, f, info: zipfile.ZipInfo) -> int:
    """Where a record's bytes start in the file: after its local header, whose name and
    extra lengths may differ from the central directory's."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ConvertError(f"{what}: no local header at its offset; the file is damaged")
    n_name, n_extra = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + n_name + n_extra


def _read_bounded(what: str, f, info: zipfile.ZipInfo) -> bytes:
    f.seek(_data_offset(what, f, info))
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise ConvertError(f"{what}: stored with {info.compress_size} bytes but declares {info.file_size}; the file is damaged")
        data = f.read(info.file_size)
        if len(data) != info.file_size:
            raise ConvertError(f"{what} ends early; the file is truncated")
    else:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        out = bytearray()
        left, pending = info.compress_size, b""
        while not d.eof:
            if not pending:
                pending = f.read(min(CHUNK, left)) if left else b""
                left -= len(pending)
                if not pending:
                    break
            out += d.decompress(pending, info.file_size + 1 - len(out))
            pending = d.unconsumed_tail
            if len(out) > info.file_size:
                raise ConvertError(f"{what} inflates past its declared {info.file_size} bytes; the file is forged "
                                   "(a zip bomb) or damaged; refused after inflating only that much")
        if not d.eof or len(out) != info.file_size:
            raise ConvertError(f"{what} inflates to {len(out)} bytes, not its declared {info.file_size}; the file is damaged")
        data = bytes(out)
    return data


def check_zip(path: str, archive: Archive | None = None) -> bool:
    """Validate a torch zip archive before loading it (see the module docstring);
    ``archive`` is its :func:`open_archive`, if the caller has it.  Returns True when
    every storage record is stored uncompressed (safe to memory-map), False when one is
    compressed (the caller then loads without mmap)."""
    archive = archive or open_archive(path)
    infos = archive.records
    with open(path, "rb") as f:
        pkl = read_record(path, f, archive.pkl, MAX_PICKLE_BYTES)
    mmap_ok = True
    storages: set[str] = set()
    inflated = compressed = 0
    for key, cls, numel in declared_storages(path, pkl):
        name = f"{archive.prefix}data/{key}"
        rec = infos.get(name)
        if rec is None:
            raise ConvertError(f"{path}: data.pkl refers to storage {describe(key)}, which the archive does not contain")
        if cls not in STORAGE_ITEMSIZE:
            raise ConvertError(f"{path}: storage {key!r} has unsupported type {describe(cls)}")
        want = numel * STORAGE_ITEMSIZE[cls]
        if rec.file_size != want:
            raise ConvertError(f"{path}: storage {key!r} declares {want} bytes but its zip record holds {rec.file_size}; the file is forged or damaged")
        if rec.compress_type != zipfile.ZIP_STORED:
            mmap_ok = False
            if name not in storages:
                inflated += rec.file_size
                compressed += rec.compress_size
        storages.add(name)
    if inflated > max(INFLATE_ALLOWANCE, MAX_INFLATE_RATIO * compressed):
        raise ConvertError(f"{path}: its compressed storages inflate to {_mib(inflated)} from {_mib(compressed)}, over "
                           f"{MAX_INFLATE_RATIO}x beyond the {_mib(INFLATE_ALLOWANCE)} allowance; weights barely compress, "
                           "so this is a zip bomb; refused before inflating anything")
    for i in infos.values():
        if i.filename not in storages and i is not archive.pkl and i.compress_type != zipfile.ZIP_STORED \
                and i.file_size > MAX_PICKLE_BYTES:
            raise ConvertError(f"{path}: zip record {i.filename} declares {_mib(i.file_size)} compressed, over the "
                               f"{_mib(MAX_PICKLE_BYTES)} limit for records inflated into memory; refused before reading it")
    return mmap_ok


# ------------------------------------------------------------------ the scan


class _Stub:
    """Every object the scan makes from a global (a call, a new object): nothing real
    is imported or called, and whatever is done to it is ignored."""

    __slots__ = ()


class _Named(_Stub):
    """A global, by name, in the scan."""

    __slots__ = ("qualname", "name")

    def __init__(self, qualname: str, name: str):
        self.qualname, self.name = qualname, name


_STUB = _Stub()


class _Scan(Machine):
    """The storages a pickle refers to, whatever else it holds: globals are names
    (:class:`_Named`); calls, new objects, lists, dicts and sets are one stub, and what
    is done to them (``BUILD``, items, appends) is ignored, so the scan holds little
    more than the pickle.  It runs the whole pickle (or refuses it), so the tuple depth
    limit holds before torch runs it."""

    def __init__(self, path: str, pkl: bytes, start: int = 0):
        super().__init__(path, pkl, start)
        self.found: list[tuple[str, str, int]] = []
        self.names: dict[tuple[str, str], _Named] = {}

    def global_(self, module, name):
        key = (module, name)
        if key not in self.names:
            self.names[key] = _Named(f"{module}.{name}", name)
        return self.names[key]

    def persistent(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise ConvertError(f"{self.path}: unexpected persistent id in data.pkl: {describe(pid)}")
        _, cls, key, location, numel = pid
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise ConvertError(f"{self.path}: malformed storage reference in data.pkl: key {describe(key)}, "
                               f"location {describe(location)}, size {describe(numel)}")
        self.found.append((key, cls.name if type(cls) is _Named else describe(cls), numel))
        return _STUB

    def call(self, func, args):
        return _STUB

    def new(self, cls, args):
        return _STUB

    def empty(self, kind):
        return _STUB

    def build(self, inst, state):
        pass

    def set_items(self, target, items):
        pass

    def extend(self, target, items):
        pass


def declared_storages(path: str, pkl: bytes) -> list[tuple[str, str, int]]:
    """(key, storage class, numel) of every storage a torch pickle refers to, found by
    running the pickle with stub globals (no real import, no real call)."""
    scan = _Scan(path, pkl)
    scan.load()
    return scan.found


class _LegacyScan(_Scan):
    """The scan of one pickle of a legacy checkpoint: any persistent id (torch's
    legacy ids have six fields; its loader checks them)."""

    what = "legacy checkpoint's pickle"

    def persistent(self, pid):
        return _STUB


LEGACY_PICKLES = ("magic number", "protocol version", "system info", "object", "storage keys")


def check_legacy(path: str) -> None:
    """Run the pickles a legacy (non-zip) checkpoint starts with through the scan
    before torch.load runs them with its weights-only unpickler: the same opcodes, and
    the tuple depth limit (a deep tuple would crash torch.load, see the module
    docstring).  They must lie in the first :data:`MAX_PICKLE_BYTES`; the storages
    follow them."""
    with open(path, "rb") as f:
        data = f.read(MAX_PICKLE_BYTES + 1)
    pos = 0
    for what in LEGACY_PICKLES:
        scan = _LegacyScan(path, data, pos)
        try:
            scan.load()
        except ConvertError:
            if len(data) > MAX_PICKLE_BYTES and scan.pos >= MAX_PICKLE_BYTES - 16:
                raise ConvertError(f"{path}: a legacy checkpoint whose pickles are over the {_mib(MAX_PICKLE_BYTES)} "
                                   "limit; a checkpoint's pickles are kilobytes; refused") from None
            raise
        pos = scan.pos


def load_pickle(path: str, mmap: bool):
    """torch.load with weights_only, whatever the environment says."""
    import torch

    try:
        # weights_only is passed explicitly so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        if "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise ConvertError(
                f"{path}: refused: the pickle asks for code or objects a weights-only load does not allow "
                f"({_unsupported_global(str(e)) or first}); this is not a plain checkpoint and was not run"
            ) from None
        raise ConvertError(f"{path}: cannot unpickle checkpoint: {first}") from None
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the file is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{path}: damaged checkpoint: {first}") from None


def _unsupported_global(msg: str) -> str | None:
    for line in msg.splitlines():
        if "Unsupported global" in line:
            return line.strip().rstrip(".")
    return None


# ------------------------------------------------------------------ the torch-free reader

# Storage classes the torch-free reader builds, with the safetensors dtype they hold.
STORAGE_DTYPE = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
_FLOATS = ("F64", "F32", "F16", "BF16")  # the dtypes a tensor that requires grad may have


@dataclass(frozen=True)
class Stored:
    """One tensor of a checkpoint: its bytes as a numpy array (see :mod:`arrays`) and
    its safetensors dtype name.  ``array`` is None for a dtype the converter does not
    support (the table refuses such a tensor if a row uses it)."""

    array: np.ndarray | None
    dtype: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


class _Global:
    """A global the reader knows; calling it builds the plain value."""

    def __init__(self, name: str, build):
        self.name, self.build = name, build

    def __call__(self, *args):
        if self.build is None:
            raise NeedsTorch(f"a call of torch.{self.name}")
        return self.build(*args)


def _empty_state(state) -> bool:
    """A ``_rebuild_parameter_with_state`` state that sets nothing: torch sets every
    attribute it names with setattr, and ``data``, ``real`` or ``requires_grad`` change
    the tensor, so anything else goes to torch."""
    if type(state) is tuple and len(state) == 2:
        return all(s is None or (type(s) is dict and not s) for s in state)
    return state is None or (type(state) is dict and not state)


def load_arrays(path: str, mapped: bool, archive: Archive | None = None) -> object:
    """Unpickle a zip checkpoint (already validated by :func:`check_zip`) without torch.

    The pickle may use only the globals ``torch.save`` writes for state dicts and
    training checkpoints (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
    ``_rebuild_parameter``, ``_rebuild_parameter_with_state`` and the typed storage
    classes of :data:`STORAGE_DTYPE`), called with the arguments ``torch.save`` writes,
    and run the opcodes torch runs (:class:`unpickler.Machine`), with torch's rules on
    what they may act on (``BUILD`` only on an ``OrderedDict``, which keeps the state as
    attributes as torch does; items only into dicts; appends only to lists).  Each tensor
    becomes a :class:`Stored` over its storage record (from ``archive``,
    :func:`open_archive`'s validated records; validated here when not given), a view of
    one private (copy-on-write) memory map of the file when ``mapped`` (every storage
    record stored uncompressed), else of the record inflated into memory.  A tensor
    whose offset, shape and strides reach outside its storage is refused.  Anything
    else raises :class:`NeedsTorch` (torch decides), or a ConvertError where torch
    refuses it too: whatever this returns is what ``torch.load(weights_only=True)``
    returns for the same bytes (tests/test_fuzz.py)."""
    import mmap as mmap_mod

    archive = archive or open_archive(path)
    prefix = archive.prefix
    with open(path, "rb") as f:
        order = archive.records.get(prefix + "byteorder")
        if order is not None and read_record(path, f, order, MAX_PICKLE_BYTES) != b"little":
            raise NeedsTorch("big-endian data")
        pkl = read_record(path, f, archive.pkl, MAX_PICKLE_BYTES)
        mm = mmap_mod.mmap(f.fileno(), 0, access=mmap_mod.ACCESS_COPY) if mapped else None
        reader = _Reader(path, pkl, archive, f, mm)
        return reader.load()


class _Reader(Machine):
    """The machine of :func:`load_arrays`: real objects for the known globals."""

    def __init__(self, path: str, pkl: bytes, archive: Archive, f, mm):
        super().__init__(path, pkl)
        self.archive, self.f, self.mm = archive, f, mm
        self.bases: dict[str, np.ndarray] = {}
        self.seen: dict[str, _Storage] = {}
        self.known = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _Global("_rebuild_tensor_v2", self.rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): _Global("_rebuild_parameter", self.parameter),
            ("torch._utils", "_rebuild_parameter_with_state"): _Global("_rebuild_parameter_with_state",
                                                                       self.parameter_with_state),
        }

    def global_(self, module, name):
        if module == "torch" and name in STORAGE_DTYPE:
            return _Global(name, None)
        if (module, name) in self.known:
            return self.known[(module, name)]
        raise NeedsTorch(f"{module}.{name}")

    def persistent(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"):
            raise ConvertError(f"{self.path}: unexpected persistent id in data.pkl: {describe(pid)}")
        _, cls, key, location, numel = pid
        if type(cls) is not _Global or cls.name not in STORAGE_DTYPE:
            raise NeedsTorch(f"storage type {describe(cls) if type(cls) is not _Global else cls.name}")
        if type(key) is not str or type(location) is not str or type(numel) is not int or numel < 0:
            raise ConvertError(f"{self.path}: malformed storage reference in data.pkl: key {describe(key)}, "
                               f"location {describe(location)}, size {describe(numel)}")
        st = _Storage(key, STORAGE_DTYPE[cls.name], numel)
        if self.seen.setdefault(key, st) != st:
            # torch reinterprets such a storage; we do not guess
            raise NeedsTorch(f"storage {key!r} under two types or sizes")
        rec = self.archive.records.get(f"{self.archive.prefix}data/{key}")
        if rec is None or rec.file_size != numel * NUMPY[st.dtype].itemsize:
            raise ConvertError(f"{self.path}: storage {key!r} ({numel} elements) has no zip record of that size; "
                               "the file is forged or damaged")
        return st

    def call(self, func, args):
        if type(func) is _Global:
            return func(*args)
        if func is collections.OrderedDict:
            return collections.OrderedDict(*args)
        raise NeedsTorch(f"a call of {describe(func)}")

    def new(self, cls, args):
        if cls is collections.OrderedDict:
            return collections.OrderedDict.__new__(collections.OrderedDict, *args)
        raise NeedsTorch(f"a new object of {describe(cls)}")

    def build(self, inst, state):
        # As torch's weights-only unpickler: an OrderedDict keeps the state as instance
        # attributes (torch.save writes a state dict's _metadata so).  Nothing here reads
        # attributes of what the file built, so `items = 1` hides nothing from the reader.
        if type(inst) is collections.OrderedDict and type(state) is dict:
            inst.__dict__.update(state)
            return
        raise NeedsTorch(f"a BUILD of {describe(inst)}")

    def set_items(self, target, items):
        if type(target) is not dict and type(target) is not collections.OrderedDict:
            raise NeedsTorch(f"items set on {describe(target)}")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def extend(self, target, items):
        if type(target) is not list:
            raise NeedsTorch(f"items appended to {describe(target)}")
        target.extend(items)

    def base(self, st: _Storage) -> np.ndarray:
        if st.key not in self.bases:
            info = self.archive.records[f"{self.archive.prefix}data/{st.key}"]
            dt = NUMPY[st.dtype]
            if self.mm is not None:
                self.bases[st.key] = np.ndarray((st.numel,), dt, buffer=self.mm, offset=self.archive.starts[info.filename])
            else:
                raw = bytearray(read_record(self.path, self.f, info, max(info.file_size, 1)))
                self.bases[st.key] = np.frombuffer(raw, dtype=dt, count=st.numel)
        return self.bases[st.key]

    def rebuild_tensor(self, *args):
        """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``."""
        if len(args) not in (6, 7):
            raise NeedsTorch(f"_rebuild_tensor_v2 with {len(args)} arguments")
        storage, offset, size, stride, requires_grad = args[:5]
        metadata = args[6] if len(args) == 7 else None
        if type(storage) is not _Storage:
            raise ConvertError(f"{self.path}: a tensor in data.pkl is built from {describe(storage)}, not a storage")
        if type(size) is not tuple or type(stride) is not tuple:
            raise NeedsTorch(f"a tensor shape given as {describe(size)}")
        if not (type(offset) is int and offset >= 0 and len(size) == len(stride)
                and all(type(v) is int and v >= 0 for v in size + stride)):
            raise ConvertError(f"{self.path}: malformed tensor in data.pkl (storage {storage.key!r}, offset "
                               f"{describe(offset)}, shape [{', '.join(map(describe, size))}], strides "
                               f"[{', '.join(map(describe, stride))}])")
        self._grad(requires_grad, storage.dtype)
        if metadata is not None and not (type(metadata) in (dict, collections.OrderedDict) and not len(metadata)):
            raise NeedsTorch("tensor metadata")
        numel = 1
        for d in size:
            numel *= d
        if numel and offset + sum((d - 1) * s for d, s in zip(size, stride)) >= storage.numel:
            raise ConvertError(f"{self.path}: a tensor of shape {list(size)} (strides {list(stride)}, offset {offset}) "
                               f"reaches past the end of its storage {storage.key!r} ({storage.numel} elements); "
                               "the file is forged or damaged")
        b = self.base(storage)
        if numel == 0:
            return Stored(np.zeros(size, b.dtype), storage.dtype)
        item = b.itemsize
        arr = np.ndarray(size, b.dtype, buffer=b, offset=offset * item, strides=tuple(s * item for s in stride))
        return Stored(arr, storage.dtype)

    def parameter(self, *args):
        """``_rebuild_parameter(data, requires_grad, hooks)``: the tensor."""
        if len(args) != 3 or type(args[0]) is not Stored:
            raise NeedsTorch(f"_rebuild_parameter of {describe(args[0]) if args else 'nothing'} with {len(args)} arguments")
        self._grad(args[1], args[0].dtype)
        return args[0]

    def parameter_with_state(self, *args):
        """``_rebuild_parameter_with_state(data, requires_grad, hooks, state)``: the
        tensor, when the state sets no attribute."""
        if len(args) != 4 or not _empty_state(args[3]):
            raise NeedsTorch("a Parameter with Python state (torch sets it with setattr)")
        return self.parameter(*args[:3])

    @staticmethod
    def _grad(requires_grad, dtype: str) -> None:
        if type(requires_grad) is not bool or (requires_grad and dtype not in _FLOATS):
            raise NeedsTorch(f"requires_grad {describe(requires_grad)} on a {dtype} tensor")


# ------------------------------------------------------------------ page population

# madvise advice that maps a range's pages in one call: Linux 5.14+ only.  None turns
# population off (every other platform; the portable-path tests set it so on Linux).
MADV_POPULATE_READ: int | None = 22 if sys.platform.startswith("linux") else None
_madvise = None  # libc's madvise once looked up; False where unusable


def populate(x: np.ndarray) -> None:
    """Map a memory-mapped array's pages in one call (MADV_POPULATE_READ) instead of
    one page fault per 4 KiB on first touch; page faults are costly in VMs and made
    transposed reads of mmap-backed tensors several times slower.  The pages stay
    file-backed (page cache), so no anonymous memory is used.  A no-op where the
    platform or kernel does not support it."""
    global _madvise
    if _madvise is False or MADV_POPULATE_READ is None or x.size == 0:
        return
    if _madvise is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise = libc.madvise
        except Exception:  # noqa: BLE001 - no ctypes, no libc, no madvise: just skip
            _madvise = False
            return
    ptr = x.__array_interface__["data"][0]
    n = x.itemsize + sum((d - 1) * st for d, st in zip(x.shape, x.strides))  # strides are never negative here
    base = ptr & ~4095
    if _madvise(base, ptr + n - base, MADV_POPULATE_READ) != 0:
        import ctypes

        if ctypes.get_errno() == 22:  # EINVAL: kernel without MADV_POPULATE_READ
            _madvise = False
