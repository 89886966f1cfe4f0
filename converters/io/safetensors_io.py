"""Compatibility names for the safetensors I/O modules, so ``from . import
safetensors_io as stio`` keeps working.  Nothing is defined here; patch (in tests) the
module that defines a name, not this one:

- :mod:`st_header`: the strict header reader (torch-free)
- :mod:`st_read`: reading one tensor, and torch dtypes' safetensors names
- :mod:`st_write`: data order, header encoding and :func:`write_stream`
- :mod:`staging`, :mod:`staging_plan`: the staging writer and its pure piece plan
- :mod:`atomic`: :class:`AtomicOutput`, the portable temp-and-rename output
"""

from .atomic import AtomicOutput
from ..format.st_header import ITEMSIZE, MAX_HEADER_BYTES, Header, TensorInfo, read_header
from .st_read import read_array, st_dtype
from .st_write import OutTensor, encode_header, layout, write_stream

__all__ = ["AtomicOutput", "ITEMSIZE", "MAX_HEADER_BYTES", "Header", "TensorInfo", "read_header",
           "read_array", "st_dtype", "OutTensor", "encode_header", "layout", "write_stream"]
