"""What a path is, from ``os.stat`` and never an open: a FIFO, a device or a socket
where a checkpoint, config or canonical file should be is refused as not a regular file,
never opened (a FIFO would hang the tool)."""

from __future__ import annotations

import os
import stat

from ..errors import ConvertError

_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"))


def file_kind(path: str) -> str | None:
    """"file", "folder", None where nothing is (a broken link included), else what the
    path is ("a FIFO", "a character device", ...), from ``os.stat`` (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return next((what for test, what in _SPECIAL if test(mode)), "a special file")


def not_regular(path: str, mode: int | None = None, expected: str = "a file") -> ConvertError:
    """The refusal of a path that is not a regular file (it is never opened)."""
    if mode is None:
        what = file_kind(path)
    else:
        what = "folder" if stat.S_ISDIR(mode) else next((w for test, w in _SPECIAL if test(mode)), "a special file")
    if what == "folder":
        return ConvertError(f"{path}: is a folder, expected {expected}")
    return ConvertError(f"{path}: not a regular file ({what}), expected {expected}; refused without opening it")


def regular_file(path: str) -> bool:
    """True for a regular file, False where nothing is; a ConvertError for anything
    else (a FIFO, a device, a socket, a folder), which is never opened."""
    kind = file_kind(path)
    if kind is None:
        return False
    if kind != "file":
        raise not_regular(path)
    return True
