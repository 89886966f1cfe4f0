"""The converter's tensor currency: numpy arrays plus a safetensors dtype name.

Every source hands out tensors as numpy arrays holding the stored bytes
(:data:`NUMPY`: ``BF16`` is carried as ``uint16``, numpy having no bfloat16), and every
plan names dtypes by their safetensors names (``"F32"``, ``"BF16"``).  Most of the
weights only move (copy, transpose, split, squeeze): that needs numpy alone, so a
conversion made only of such steps never imports torch (``import torch`` is over a
second of CPU here, several with a CUDA build).  What computes (folds, ``exp``,
narrowing casts, tensors regenerated from the config) runs in torch, on zero-copy
views made by :func:`to_torch`; :func:`from_torch` turns the results back.

What numpy may compute here is exactly what gives torch's bytes:

- the data-movement steps (:func:`move`, also used by the torch path),
- ``sqrt``: the IEEE 754 square root, correctly rounded (:func:`sqrt`; torch's own CPU
  ``sqrt`` is not: with MKL it was 1 ulp off in 168 of 1024 float32 test values here,
  so the torch path uses this function too),
- widening casts that are exact: ``F16``/``BF16`` -> ``F32``, ``F16``/``BF16``/``F32`` -> ``F64``
  (:func:`widen`).  A float16 signalling NaN keeps its payload here; torch quiets it in
  its vectorised loop and returns 0x7fffffff in its scalar tail.  NaNs only convert with
  ``--allow-nonfinite``.

The byte-identity of the numpy path and the torch path is tested on every model.
"""

from __future__ import annotations

import numpy as np

from .opspec import Step

# safetensors dtype name -> the numpy dtype that holds its bytes
NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),  # raw bits: numpy has no bfloat16
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FLOATS = ("F64", "F32", "F16", "BF16")
# The names torch gives these dtypes (what ``inspect`` prints, and how errors name them).
NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Steps numpy carries out with the same bytes as torch (see the module docstring).
NUMPY_STEPS = frozenset({"copy", "transpose", "squeeze", "split", "sqrt"})
# Exact widening casts numpy does: (from, to).
WIDEN = frozenset({("F16", "F32"), ("BF16", "F32"), ("F16", "F64"), ("BF16", "F64"), ("F32", "F64")})


def name(dtype: str) -> str:
    """A dtype name for people: torch's spelling where there is one."""
    return NAMES.get(dtype, dtype)


def is_float(dtype: str) -> bool:
    return dtype in FLOATS


# ------------------------------------------------------------------ steps


def move(step: Step, x):
    """A data-movement step on a numpy array or a torch tensor (both index alike): a
    view, never a copy."""
    if step.name == "copy":
        return x
    if step.name == "transpose":
        return x.T
    if step.name == "squeeze":
        return x.squeeze(step.arg("dim") % x.ndim)  # numpy's axis, torch's dim: a view either way, 0-d included
    if step.name == "split":
        d, i, parts = step.arg("dim") % x.ndim, step.arg("index"), step.arg("parts")
        n = x.shape[d] // parts
        return x[(slice(None),) * d + (slice(i * n, (i + 1) * n),)]
    raise AssertionError(f"{step.name} is not a data-movement step")


def numpy_capable(steps: list[Step], src_dtypes: list[str], out: str) -> bool:
    """Whether numpy computes this chain (and the cast to ``out``) with torch's bytes."""
    if any(s.name not in NUMPY_STEPS for s in steps):
        return False
    src = src_dtypes[-1]
    if any(s.name == "sqrt" for s in steps):
        # torch computes sqrt in float32 (float64 for float64) and then casts.
        work = "F64" if src == "F64" else "F32"
        return src in FLOATS and (src == work or (src, work) in WIDEN) and (out == work or (work, out) in WIDEN)
    return out == src or (src, out) in WIDEN


def apply_numpy(steps: list[Step], x: np.ndarray, src: str, out: str) -> np.ndarray:
    """The chain on numpy arrays (only when :func:`numpy_capable`), cast to ``out``."""
    for s in steps:
        if s.name == "sqrt":
            work = "F64" if src == "F64" else "F32"
            x = sqrt(widen(x, src, work))
            src = work
        else:
            x = move(s, x)
    return np.asarray(widen(x, src, out))  # numpy makes 0-d results scalars; the writer wants arrays


def sqrt(x: np.ndarray) -> np.ndarray:
    """The correctly rounded square root (numpy's, which is IEEE 754's on every
    platform), in x's float dtype.  A negative input gives NaN, which the NaN check then
    names."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(x)


def widen(x: np.ndarray, src: str, out: str) -> np.ndarray:
    """An exact widening cast (:data:`WIDEN`), or ``x`` itself when the dtypes agree."""
    if src == out:
        return x
    if (src, out) not in WIDEN:
        raise AssertionError(f"{src} -> {out} is not an exact widening cast")
    if src == "BF16":  # bfloat16 is the high half of a float32
        x = (x.astype(np.uint32) << 16).view(np.float32)
        return x if out == "F32" else x.astype(np.float64)
    return x.astype(NUMPY[out])


# ------------------------------------------------------------------ checks


def all_finite(x: np.ndarray, dtype: str) -> bool:
    """Whether every element of a float array is finite.  F32/F64: the max and the min
    are both finite (numpy's max and min propagate NaN; an Inf is an extreme), two
    vectorised reads with no temporary, exact and faster here than a sum.  F16 and
    BF16, on their bits: with the sign cleared, an Inf or a NaN is at least the
    all-ones exponent."""
    if x.size == 0:
        return True
    if dtype in ("F32", "F64"):
        return bool(np.isfinite(x.max()) and np.isfinite(x.min()))
    if dtype == "BF16":
        ones = 0x7F80
    elif dtype == "F16":
        ones = 0x7C00
    else:
        raise AssertionError(f"{dtype} is not a float dtype")
    return int((x.view(np.uint16) & 0x7FFF).max()) < ones


# ------------------------------------------------------------------ torch, when needed


def to_torch(x: np.ndarray, dtype: str):
    """A torch tensor over the same memory (no copy), with ``dtype``'s torch dtype."""
    import torch

    from reference.load import DTYPES

    if not x.flags.writeable:  # sources hand out writable (private, copy-on-write) memory; this is a safety net
        x = x.copy()
    t = torch.from_numpy(x)
    want = DTYPES[dtype]
    return t if t.dtype == want else t.view(want)


def from_torch(t) -> np.ndarray:
    """A numpy array over a CPU torch tensor's memory (no copy); bfloat16 as uint16."""
    import torch

    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.detach().numpy()


def torch_dtype_name(dt) -> str:
    """The safetensors name of a torch dtype, or torch's own name for one safetensors
    (and so the converter) does not support."""
    from reference.load import DTYPES

    for k, v in DTYPES.items():
        if v == dt:
            return k
    return str(dt).replace("torch.", "")
