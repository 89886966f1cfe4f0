"""The op grammar and shape rules, without torch (so ``check`` starts fast).

See :mod:`converters.format.ops` for what each step computes and how it is inverted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

Shape = tuple[int, ...]


class OpError(ValueError):
    """The op cannot apply to these inputs; the caller adds file and tensor names."""


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[tuple[str, int | float], ...] = ()

    def arg(self, key: str) -> int | float:
        for k, v in self.args:
            if k == key:
                return v
        raise OpError(f"op {self.name} needs argument {key}")

    def __str__(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.args) + ")"


_STEP_RE = re.compile(r"^([a-z_]+)(?:\(([^()]*)\))?$")
# step name -> (number of inputs, required args)
STEPS: dict[str, tuple[int, tuple[str, ...]]] = {
    "copy": (1, ()),
    "transpose": (1, ()),
    "squeeze": (1, ("dim",)),
    "exp": (1, ()),
    "sqrt": (1, ()),
    "split": (1, ("dim", "index", "parts")),
    "fold_weight_norm": (2, ("dim",)),
    "fold_bn_weight": (3, ("eps",)),
    "fold_bn_bias": (4, ("eps",)),
    "fold_bn_weight_noaffine": (2, ("eps",)),
    "fold_bn_bias_noaffine": (2, ("eps",)),
    "normalize_scale": (2, ()),
    "normalize_shift": (3, ()),
}
BN_FOLDS = {"fold_bn_weight", "fold_bn_bias", "fold_bn_weight_noaffine", "fold_bn_bias_noaffine"}
NORMALIZE = {"normalize_scale", "normalize_shift"}
FIRST_ONLY = {"split", "fold_weight_norm"} | BN_FOLDS | NORMALIZE
FLOAT_ARGS = {"eps"}


def parse(op: str) -> list[Step]:
    """The steps of ``op`` (a new list; the steps are immutable and shared)."""
    return list(_parse(op))


@lru_cache(maxsize=4096)  # a bundle's tables repeat a few dozen ops over every tensor
def _parse(op: str) -> tuple[Step, ...]:
    steps: list[Step] = []
    for i, part in enumerate(op.split("|")):
        m = _STEP_RE.match(part.strip())
        if not m or m.group(1) not in STEPS:
            raise OpError(f"unknown op step {part.strip()!r} in {op!r}")
        name = m.group(1)
        args: list[tuple[str, int | float]] = []
        if m.group(2):
            for kv in m.group(2).split(","):
                k, _, v = kv.partition("=")
                try:
                    args.append((k.strip(), float(v) if k.strip() in FLOAT_ARGS else int(v)))
                except ValueError:
                    raise OpError(f"bad argument {kv!r} in {op!r}") from None
        step = Step(name, tuple(args))
        if sorted(k for k, _ in step.args) != sorted(STEPS[name][1]):
            raise OpError(f"op step {name} takes arguments {STEPS[name][1]}, got {step}")
        fold_then_split = i == 1 and name == "split" and steps[0].name == "fold_weight_norm"
        if i > 0 and name in FIRST_ONLY and not fold_then_split:
            raise OpError(f"{name} may only be the first step of a chain: {op!r}")
        steps.append(step)
    return tuple(steps)


def n_inputs(op: str) -> int:
    return STEPS[parse(op)[0].name][0]


# ------------------------------------------------------------------ shapes


def _shape_step(step: Step, shapes: list[Shape]) -> Shape:
    n = STEPS[step.name][0]
    if len(shapes) != n:
        raise OpError(f"{step} takes {n} input(s), got {len(shapes)}")
    s = shapes[0]
    if step.name in ("copy", "exp", "sqrt"):
        return s
    if step.name == "transpose":
        if len(s) != 2:
            raise OpError(f"transpose needs a 2-D tensor, got shape {list(s)}")
        return (s[1], s[0])
    if step.name == "squeeze":
        d = step.arg("dim")
        if not -len(s) <= d < len(s) or s[d] != 1:
            raise OpError(f"squeeze(dim={d}) needs size 1 there, got shape {list(s)}")
        d %= len(s)
        return s[:d] + s[d + 1:]
    if step.name == "split":
        d, idx, parts = step.arg("dim"), step.arg("index"), step.arg("parts")
        if not -len(s) <= d < len(s) or parts < 1 or not 0 <= idx < parts or s[d] % parts:
            raise OpError(f"{step} does not fit shape {list(s)}")
        d %= len(s)
        return s[:d] + (s[d] // parts,) + s[d + 1:]
    if step.name == "fold_weight_norm":
        g, v = shapes
        d = step.arg("dim")
        want = tuple(v[i] if i == d else 1 for i in range(len(v)))
        if len(g) != len(v) or tuple(g) != want:
            raise OpError(f"weight-norm g has shape {list(g)}, expected {list(want)} for v of shape {list(v)} with dim={d}")
        return v
    if step.name in BN_FOLDS:
        conv = step.name.startswith("fold_bn_weight")
        stats = shapes[1:] if conv else shapes
        c = stats[0]
        if len(c) != 1 or any(tuple(x) != c for x in stats):
            raise OpError(f"{step}: batch-norm tensors must be 1-D and alike, got {[list(x) for x in stats]}")
        if conv and (len(s) < 2 or s[0] != c[0]):
            raise OpError(f"{step}: conv weight {list(s)} does not have {c[0]} output channels")
        return s if conv else c
    if step.name in NORMALIZE:
        if len(s) != 1 or any(tuple(x) != tuple(s) for x in shapes):
            raise OpError(f"{step}: the affine and the statistics must be 1-D and alike, got {[list(x) for x in shapes]}")
        return s
    raise AssertionError(step.name)


def out_shape(op: str, shapes: list[Shape]) -> Shape:
    steps = parse(op)
    s = _shape_step(steps[0], [tuple(x) for x in shapes])
    for step in steps[1:]:
        s = _shape_step(step, [s])
    return s
