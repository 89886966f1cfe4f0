"""Which config keys size which checkpoint tensors, checked before the table is planned.

A model module declares ``CONFIG_DIMS``: each :class:`Dim` says that the config key
``key`` (dotted under the model's section: ``condition_module.output_size``) gives the
checkpoint tensor ``tensor`` (its upstream name) the size ``size`` along ``axis``.  The
engine compares them with the checkpoint's shapes after the config is read and before
the schema check, so a config that does not fit (the other release's, the base model's
beside a fine-tune) is refused by the key that disagrees, with both values, and with
the checkpoint's release and the tensors that tell it; the schema check would only name
a canonical tensor's shape.

A module also declares ``RELEASE_VALUES``: the values its release's published
config.yaml has for the keys in which the two releases' configs differ (the GPT's
``number_text_tokens``: 12000 in IndexTTS-2.0, 60509 in IndexTTS-2.5), so a message can
say whose a value is.  The config's own ``version`` key is no evidence (IndexTTS-2.5's
says 2.0).

Standard library only; a declaration never changes what a conversion writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import family
from .schema import evaluate


@dataclass(frozen=True)
class Dim:
    """``tensor.shape[axis] == size``.  ``size`` is a schema expression over the runtime
    config, in which the key's last name is bound to the key's value (so
    ``number_text_tokens * types + 1``); None: the key's value itself."""

    key: str
    tensor: str
    axis: int
    size: str | None = None

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


@dataclass(frozen=True)
class Mismatch:
    dim: Dim
    value: object  # the config's
    want: int  # the size the config gives the tensor
    got: int  # the checkpoint's
    implied: int | None  # the key's value that would give the checkpoint's size, if one does


_MISSING = object()


def config_value(config: dict, key: str):
    """The value at a dotted ``key`` of a runtime config (its nested mappings are
    upstream's own, verbatim), or ``_MISSING``."""
    v = config
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return _MISSING
        v = v[part]
    return v


def size_of(dim: Dim, config: dict, value) -> int:
    if dim.size is None:
        return value
    return evaluate(dim.size, {**config, dim.name: value})


def _implied(dim: Dim, config: dict, got: int) -> int | None:
    """The key's value that gives ``got``: solved for sizes affine in the key (every
    declared one), checked by evaluating it; None if no int does."""
    try:
        a, b = size_of(dim, config, 0), size_of(dim, config, 1) - size_of(dim, config, 0)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)) or b == 0 or (got - a) % b:
            return None
        v = (got - a) // b
        return v if v > 0 and size_of(dim, config, v) == got else None
    except Exception:  # noqa: BLE001 - an expression that does not invert says nothing
        return None


def mismatches(dims, config: dict, shapes: dict[str, tuple[int, ...]]) -> list[Mismatch]:
    """The declared sizes the checkpoint's tensors disagree with.  A tensor the
    checkpoint lacks, or a key the config lacks, is left to the table and the schema
    check (which say what is missing)."""
    out = []
    for d in dims:
        shape = shapes.get(d.tensor)
        value = config_value(config, d.key)
        if shape is None or d.axis >= len(shape) or value is _MISSING:
            continue
        try:
            want = size_of(d, config, value)
        except Exception:  # noqa: BLE001 - a config the expression cannot read: the schema check reports it
            continue
        if want != shape[d.axis]:
            out.append(Mismatch(d, value, want, shape[d.axis], _implied(d, config, shape[d.axis])))
    return out


def _whose(key: str, value, released: dict[str, dict]) -> str | None:
    """The one release whose published config has ``value`` for ``key``, if one."""
    owners = [v for v, vals in released.items() if key in vals and vals[key] == value]
    return owners[0] if len(owners) == 1 else None


def _extent(axis: int, n: int) -> str:
    return {0: f"{n} rows", 1: f"{n} columns"}.get(axis, f"size {n} along dim {axis}")


def message(kind: str, version: str, told: str, src_file: str, cfg_file: str, section: str,
            found: list[Mismatch], released: dict[str, dict]) -> str:
    """The refusal: the checkpoint's release and what tells it, then one line per key
    that disagrees (the config's value and whose it is, the size it gives, the
    checkpoint's size and the value that gives it), then what to do."""
    what = family.KIND_LABELS.get(kind, kind)
    cfg_name = os.path.basename(cfg_file)
    lines = [f"{src_file}: is an {family.label(version)} {what} ({told}), and {cfg_file} does not fit it:"]
    config_owner = set()
    by_key: dict[tuple, list[Mismatch]] = {}
    for m in found:
        by_key.setdefault((m.dim.key, m.dim.axis, m.want, m.got), []).append(m)
    for (key, axis, want, got), ms in by_key.items():
        m = ms[0]
        owner = _whose(key, m.value, released)
        if owner is not None:
            config_owner.add(owner)
        tensors = " and ".join(x.dim.tensor for x in ms)
        line = (f"  {cfg_name}: {section}.{key} = {m.value!r}" + (f" ({family.label(owner)}'s)" if owner else "")
                + f" gives {tensors} {_extent(axis, want)}" + (f" ({m.dim.size})" if m.dim.size else "")
                + f"; the checkpoint's {'has' if len(ms) == 1 else 'have'} {got}")
        if m.implied is not None and m.dim.size is not None:
            other = _whose(key, m.implied, released)
            line += f", which is {m.dim.name} = {m.implied}" + (f" ({family.label(other)}'s)" if other else "")
        lines.append(line)
    if config_owner - {version}:
        other = sorted(config_owner - {version})[0]
        lines.append(f"  {cfg_name} has {family.label(other)}'s values: convert with the {family.label(version)} "
                     f"release's config.yaml (--config)")
    else:
        lines.append("  convert with the config.yaml this checkpoint was made with (--config)")
    return "\n".join(lines)
