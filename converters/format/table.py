"""Declarative name-mapping tables and their resolution against a source.

A model module lists :class:`Row` objects: a canonical name template, an op (see
:mod:`ops`) and the source name templates it reads.  Templates use ``{x}``
placeholders whose ranges come from the model's config (``loops``), in the spirit of
llama.cpp's block templates.  Source tensors that are deliberately not converted are
listed as :class:`Drop` rules with a reason.

:func:`resolve` turns the table into a :class:`Plan` for one source file, with strict
accounting: every canonical tensor's sources exist, every source tensor is consumed or
dropped by a named rule, and every output shape is known before any data is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from . import arrays, opspec, templates
from ..errors import ConvertError
if TYPE_CHECKING:  # annotations only: a table resolves against any io.sources.Source
    from ..io.sources import Source


@dataclass(frozen=True)
class Row:
    canonical: str
    op: str
    sources: tuple[str, ...]
    # For buffers that are a pure function of the config: build the tensor (a torch
    # tensor) when the source does not carry it (``sources`` may then be empty).
    regenerate: Callable[[dict], object] | None = None
    regenerate_op: str = ""


def row(canonical: str, op: str, *sources: str) -> Row:
    return Row(canonical, op, tuple(sources))


def keep(*names: str, params: tuple[str, ...] = ()) -> list[Row]:
    """Rows that carry tensors over unchanged, under their upstream names.  With
    ``params``, each name is a module and its ``<name>.<param>`` tensors are kept:
    ``keep("ln_1", "ln_2", params=("weight", "bias"))``."""
    full = [f"{n}.{p}" for n in names for p in params] if params else list(names)
    return [Row(n, "copy", (n,)) for n in full]


WB = ("weight", "bias")


def wn(canonical: str, module: str, dim: int, then: str = "") -> Row:
    """A weight-normed weight, folded.  ``module`` is the upstream module path; the
    source may spell the pair ``weight_g``/``weight_v`` or
    ``parametrizations.weight.original0``/``original1``, or carry it already folded as
    ``weight``.  ``dim`` is the dim torch kept in ``g`` (0 for its default)."""
    op = f"fold_weight_norm(dim={dim})" + (f"|{then}" if then else "")
    return Row(canonical, op, (module,))


@dataclass(frozen=True)
class Drop:
    pattern: str  # regex, full match against the source name
    reason: str


@dataclass
class PlanEntry:
    name: str
    op: str
    sources: list[str]
    shape: tuple[int, ...]
    dtype: str  # the output's safetensors dtype name
    regenerate: Callable[[dict], object] | None = None


@dataclass
class Plan:
    entries: list[PlanEntry]
    dropped: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def provenance(self) -> dict[str, dict]:
        return {e.name: {"from": list(e.sources), "op": e.op} for e in sorted(self.entries, key=lambda e: e.name)}


Loops = Mapping[str, "int | Callable[[dict], int]"]


def expand(rows: list[Row], loops: Loops) -> list[tuple[Row, dict]]:
    """Every (row, placeholder values) pair.  A loop bound may be a function of the
    placeholders to its left in the canonical template."""
    out = []
    for r in rows:
        names = templates.fields(r.canonical)
        for s in r.sources:
            for n in templates.fields(s):
                if n not in names:
                    raise AssertionError(f"source template {s!r} uses {{{n}}} missing from {r.canonical!r}")

        def limit(n: str, bound: dict, r=r) -> int:
            if n not in loops:
                raise AssertionError(f"no loop range for {{{n}}} in {r.canonical!r}")
            lim = loops[n]
            return lim(bound) if callable(lim) else lim

        out += [(r, vals) for vals in templates.expand(names, limit)]
    return out


def _resolve_wn(src: Source, module: str) -> tuple[list[str], bool] | None:
    """Which weight-norm spelling the source uses: ([g, v], True), ([weight], False) or None."""
    spellings = [
        [f"{module}.weight_g", f"{module}.weight_v"],
        [f"{module}.parametrizations.weight.original0", f"{module}.parametrizations.weight.original1"],
    ]
    found = [s for s in spellings if all(n in src.shapes for n in s)]
    if len(found) > 1:
        raise ConvertError(f"{src.path}: {module!r} has weight norm stored twice ({found[0][0]!r} and {found[1][0]!r})")
    if found:
        return found[0], True
    if f"{module}.weight" in src.shapes:
        return [f"{module}.weight"], False
    return None


def out_dtype(src_dtype: str, target: str | None) -> str:
    if not arrays.is_float(src_dtype) or target is None:
        return src_dtype
    return target


def resolve(
    src: Source,
    rows: list[Row],
    loops: Loops,
    drops: list[Drop],
    config: dict,
    target_dtype: str | None,
) -> Plan:
    entries: list[PlanEntry] = []
    consumed: set[str] = set()
    missing: list[str] = []
    notes: list[str] = []
    prefolded = 0
    for r, vals in expand(rows, loops):
        name = r.canonical.format(**vals)
        op = r.op
        srcs = [s.format(**vals) for s in r.sources]
        first = opspec.parse(op)[0]
        if first.name == "fold_weight_norm":
            found = _resolve_wn(src, srcs[0])
            if found is None:
                missing.append(f"{srcs[0]}.weight_g/.weight_v (or parametrizations.weight.original0/1, or a folded .weight)")
                continue
            srcs, normed = found
            if not normed:
                prefolded += 1
                rest = op.split("|", 1)[1] if "|" in op else ""
                op = rest or "copy"
        if r.regenerate is not None and (not srcs or not all(s in src.shapes for s in srcs)):
            t = r.regenerate(config)
            entries.append(PlanEntry(name, r.regenerate_op, [], tuple(t.shape), out_dtype(arrays.torch_dtype_name(t.dtype), target_dtype),
                                     r.regenerate))
            notes.append(f"{name}: regenerated from the config")
            continue
        absent = [s for s in srcs if s not in src.shapes]
        if absent:
            missing.extend(absent)
            continue
        for s in srcs:
            if src.dtypes[s] not in arrays.NUMPY:
                raise ConvertError(f"{src.path}: tensor {s!r} has unsupported dtype {src.dtypes[s]}")
        try:
            shape = opspec.out_shape(op, [src.shapes[s] for s in srcs])
        except opspec.OpError as e:
            raise ConvertError(f"{src.path}: {', '.join(srcs)} -> {name}: {e}") from None
        entries.append(PlanEntry(name, op, srcs, shape, out_dtype(src.dtypes[srcs[-1]], target_dtype)))
        consumed.update(srcs)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ConvertError(f"{src.path}: missing tensors: {', '.join(missing[:8])}{more}")
    if prefolded:
        notes.append(f"{prefolded} weight-norm weights were already folded in the source")
    dropped: dict[str, str] = dict(src.dropped)
    unexpected = []
    compiled = [(re.compile(d.pattern), d.reason) for d in drops]
    for n in src.names():
        if n in consumed:
            continue
        reason = next((why for rx, why in compiled if rx.fullmatch(n)), None)
        if reason is None:
            unexpected.append(n)
        else:
            dropped[n] = reason
    if unexpected:
        more = f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        raise ConvertError(f"{src.path}: unexpected tensors that no rule consumes or drops: {', '.join(unexpected[:8])}{more}")
    return Plan(entries, dict(sorted(dropped.items())), notes)
