"""safetensors headers for the converter: the strict, torch-free reader of
:mod:`reference.header`, with its refusals raised as :class:`ConvertError` (``check``
reads nothing else)."""

from __future__ import annotations

from reference.header import (  # noqa: F401 (re-exported)
    ITEMSIZE, MAX_HEADER_BYTES, Header, HeaderError, TensorInfo, alignment_problems, layout_problems,
)
from reference.header import read_header as _read_header

from ..errors import ConvertError


def read_header(path: str) -> Header:
    """Parse and fully validate a safetensors header without reading tensor data."""
    try:
        return _read_header(path)
    except HeaderError as e:
        raise ConvertError(str(e)) from None
