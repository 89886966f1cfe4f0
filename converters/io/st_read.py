"""Reading one safetensors tensor's bytes into a numpy array (see :mod:`arrays`), and
naming torch dtypes the safetensors way.  Torch-free.

Header parsing lives in :mod:`st_header`.
"""

from __future__ import annotations

import numpy as np

from ..format.arrays import NUMPY, torch_dtype_name
from ..errors import ConvertError
from ..format.st_header import TensorInfo


def st_dtype(dtype, what: str = "tensor") -> str:
    """The safetensors name of a torch dtype, or a refusal naming ``what``."""
    name = torch_dtype_name(dtype)
    if name not in NUMPY:
        raise ConvertError(f"{what}: unsupported dtype {name}")
    return name


def read_array(path: str, info: TensorInfo, f=None) -> np.ndarray:
    """Read one tensor's bytes into a fresh, owned, writable numpy array (through ``f``
    if given, an open binary file of ``path``)."""
    a = np.empty(info.shape, dtype=NUMPY[info.dtype])
    nbytes = info.end - info.begin
    if nbytes:
        buf = memoryview(a.reshape(-1).view(np.uint8))
        own = f is None
        f = f or open(path, "rb")
        try:
            f.seek(info.begin)
            got = f.readinto(buf)
        finally:
            if own:
                f.close()
        if got != nbytes:
            raise ConvertError(f"{path}: tensor data ends early; truncated file")
    return a
