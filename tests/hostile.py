"""Generator of the hostile and broken input corpus (issue: reliability).

Each function writes one case into a folder laid out like a BigVGAN source
(``config.json`` beside the checkpoint) and returns the checkpoint path.  The tests in
test_hostile.py run the CLI on each and assert the exact outcome.
"""

from __future__ import annotations

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


def random_bytes(folder, good):
    return _sibling(folder, "bigvgan_generator.pt", os.urandom(4096), good)


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
