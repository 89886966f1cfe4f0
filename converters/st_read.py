"""safetensors tensors with torch: the dtype tables (shared with the writer) and
reading one tensor's bytes.

Header parsing lives in :mod:`st_header` (torch-free, so ``check`` starts fast).
"""

from __future__ import annotations

import torch

from reference.load import DTYPES as TORCH_DTYPES

from .errors import ConvertError
from .st_header import ITEMSIZE, TensorInfo

# safetensors dtype name -> (torch dtype, item size): the reference loader's table
DTYPES: dict[str, tuple[torch.dtype, int]] = {name: (dt, ITEMSIZE[name]) for name, dt in TORCH_DTYPES.items()}
TORCH_TO_ST = {dt: name for name, (dt, _) in DTYPES.items()}


def st_dtype(dtype: torch.dtype, what: str = "tensor") -> str:
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise ConvertError(f"{what}: unsupported dtype {dtype}") from None


def read_tensor(path: str, info: TensorInfo, f=None) -> torch.Tensor:
    """Read one tensor's bytes into a fresh, owned torch tensor (through ``f`` if given,
    an open binary file of ``path``)."""
    dt = DTYPES[info.dtype][0]
    t = torch.empty(info.shape, dtype=dt)
    nbytes = info.end - info.begin
    if nbytes:
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
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
    return t
