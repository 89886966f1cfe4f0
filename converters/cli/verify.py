"""``convert.py verify SRC OUT_FILE``: recompute every canonical tensor from the source.

Independent of the conversion that wrote OUT_FILE: it reads only the canonical file's
recorded provenance (source names and op chain) and the source file, applies the op
with :func:`ops.apply`, casts to the file's dtype and compares.  Tensors regenerated
from the config (empty ``from``) are rebuilt from the model's table with the config in
the file's metadata.  One line per tensor with the max abs difference; exit non-zero
on any mismatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..format import arrays, ops, schema
from ..release import engine
from ..io import safetensors_io as stio
from ..errors import ConvertError
from ..io.sources import open_source
from ..format.table import expand


@dataclass
class Row:
    name: str
    max_abs_diff: float
    tolerance: float
    ok: bool
    note: str = ""


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Recomputation is deterministic up to the last bit of float arithmetic: allow one
    unit in the last place of the output dtype at the tensor's largest magnitude."""
    if not dtype.is_floating_point or ref.numel() == 0:
        return 0.0
    return float(torch.finfo(dtype).eps) * max(1.0, float(ref.abs().max()))


def canonical_kind(out_path: str):
    """(model kind, header) of a canonical file that passes the schema check; refuses others."""
    header = stio.read_header(out_path)
    kind = header.metadata.get("model")
    if header.metadata.get("schema") != schema.SCHEMA_NAME or kind not in engine.MODELS:
        raise ConvertError(f"{out_path}: not a canonical file")
    errs = schema.check(kind, {n: (i.dtype, i.shape) for n, i in header.tensors.items()}, header.metadata, out_path)
    if errs:
        raise ConvertError(f"{out_path}: fails the schema check:\n  " + "\n  ".join(errs[:20]))
    return kind, header


def verify(src_path: str, out_path: str, extra: dict[str, str] | None = None, on_row=lambda r: None) -> list[Row]:
    kind, header = canonical_kind(out_path)
    from ..format.family import file_version

    mod = engine.model_module(kind, file_version(header.metadata))
    prov = json.loads(header.metadata["provenance"])
    config = json.loads(header.metadata["config"])
    src_file, _ = engine.locate(kind, src_path, None, need_config=False)
    src = engine.combine(open_source(src_file), engine.input_files(mod, src_file, extra))
    regen = _regenerators(mod, config)
    rows: list[Row] = []
    try:
        with open(out_path, "rb") as f:
            for name in sorted(header.tensors):
                info = header.tensors[name]
                got = arrays.to_torch(stio.read_array(out_path, info, f), info.dtype)
                p = prov[name]
                if p["from"]:
                    missing = [s for s in p["from"] if s not in src.shapes]
                    if missing:
                        row = Row(name, float("inf"), 0.0, False, f"source lacks {', '.join(missing)}")
                        rows.append(row)
                        on_row(row)
                        continue
                    want = ops.apply(p["op"], [arrays.to_torch(src.get(s), src.dtypes[s]) for s in p["from"]])
                    note = p["op"]
                else:
                    if name not in regen:
                        raise ConvertError(f"{out_path}: {name!r} has no source and the {kind} table does not regenerate it")
                    want = regen[name](config)
                    note = "regenerated from config"
                want = want.to(got.dtype)
                if tuple(want.shape) != tuple(got.shape):
                    row = Row(name, float("inf"), 0.0, False, f"shape {list(want.shape)} recomputed, {list(got.shape)} stored")
                else:
                    if got.dtype.is_floating_point:
                        diff = float((want.double() - got.double()).abs().max()) if got.numel() else 0.0
                    else:
                        diff = 0.0 if torch.equal(want, got) else float("inf")
                    tol = _tolerance(got.dtype, want)
                    row = Row(name, diff, tol, diff <= tol, note)
                rows.append(row)
                on_row(row)
    finally:
        src.close()
    return rows


def _regenerators(mod, config: dict) -> dict:
    rows, loops = mod.table(config)
    out = {}
    for r, vals in expand(rows, loops):
        if r.regenerate is not None:
            out[r.canonical.format(**vals)] = r.regenerate
    return out
