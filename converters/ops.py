"""The small set of reversible tensor operations a mapping table may use.

An op is written as a chain of steps, ``"split(dim=0,index=1,parts=3)|transpose"``:
the first step receives the source tensors listed in ``from`` (in order), each later
step receives the previous result.  The same string is stored in each canonical
file's ``provenance``, so a reader (or ``verify``) can recompute or invert it.

| step | inputs | forward | inverse |
|---|---|---|---|
| copy | 1 | x | y |
| transpose | 1 (2-D) | x.T | y.T |
| squeeze(dim) | 1 | drop a size-1 dim | unsqueeze |
| exp | 1 | exp(x) | log(y) |
| sqrt | 1 | sqrt(x) | y**2 |
| split(dim,index,parts) | 1 | the index-th of ``parts`` equal chunks along dim | concatenate all chunks |
| fold_weight_norm(dim) | 2: g, v | g * v / ||v|| (norm over every dim but ``dim``) | the folded weight itself |
| fold_bn_weight(eps) | 3: conv w, bn weight, running_var | w * (weight / sqrt(var + eps)) per output channel (dim 0) | w, with an identity batch norm |
| fold_bn_bias(eps) | 4: bn weight, bias, running_mean, running_var | bias - mean * weight / sqrt(var + eps) | the bias, as the batch norm's beta |
| fold_bn_weight_noaffine(eps) | 2: conv w, running_var | w / sqrt(var + eps) (``affine=False`` batch norm) | w, with an identity batch norm |
| fold_bn_bias_noaffine(eps) | 2: running_mean, running_var | -mean / sqrt(var + eps) | the bias, as ``-running_mean`` |

The ``fold_bn_*`` steps fold an eval-mode batch norm into the bias-free convolution
before it (``bn(conv(x)) = conv'(x) + b'``, exact).  Their inverse is not the original
tensors (those are not recoverable) but an equivalent upstream state: the folded conv
weight, and a batch norm with weight 1, running_mean 0 and running_var ``1 - eps``
whose beta (or, without affine, ``-running_mean``) carries the folded bias.  ``eps`` is
the only float argument.

Only ``split``, ``fold_weight_norm`` and ``fold_bn_*`` are many-to-one in reverse, and they may only
appear as the first step of a chain, with one exception: ``split`` may directly follow
``fold_weight_norm`` (a fused weight-normed projection, folded as a whole, then split
into its parts: ``fold_weight_norm(dim=0)|split(dim=0,index=1,parts=2)``).
Arithmetic is done in float32 (or float64 for float64 inputs) and cast to the output
dtype by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

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
}
BN_FOLDS = {"fold_bn_weight", "fold_bn_bias", "fold_bn_weight_noaffine", "fold_bn_bias_noaffine"}
FIRST_ONLY = {"split", "fold_weight_norm"} | BN_FOLDS
FLOAT_ARGS = {"eps"}


def parse(op: str) -> list[Step]:
    steps = []
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
    return steps


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
    raise AssertionError(step.name)


def out_shape(op: str, shapes: list[Shape]) -> Shape:
    steps = parse(op)
    s = _shape_step(steps[0], [tuple(x) for x in shapes])
    for step in steps[1:]:
        s = _shape_step(step, [s])
    return s


# ------------------------------------------------------------------ forward


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _apply_step(step: Step, xs: list[torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    if step.name == "copy":
        return x
    if step.name == "transpose":
        return x.t()
    if step.name == "squeeze":
        return x.squeeze(step.arg("dim"))
    if step.name == "exp":
        return torch.exp(x.to(_work_dtype(x)))
    if step.name == "sqrt":
        return torch.sqrt(x.to(_work_dtype(x)))
    if step.name == "split":
        return torch.chunk(x, step.arg("parts"), dim=step.arg("dim"))[step.arg("index")]
    if step.name == "fold_weight_norm":
        g, v = xs
        wd = torch.promote_types(_work_dtype(g), _work_dtype(v))
        g, v = g.to(wd), v.to(wd)
        # torch's own kernel, so the result is bit-identical to what upstream's
        # remove_weight_norm() computes: v * (g / ||v||), norm over all dims but `dim`.
        return torch._weight_norm(v, g, step.arg("dim"))
    if step.name in BN_FOLDS:
        wd = _work_dtype(xs[0])
        xs = [t.to(wd) for t in xs]
        inv = torch.rsqrt(xs[-1] + step.arg("eps"))  # 1 / sqrt(running_var + eps)
        if step.name == "fold_bn_weight":
            w, gamma, _ = xs
            return w * (gamma * inv).reshape(-1, *[1] * (w.dim() - 1))
        if step.name == "fold_bn_weight_noaffine":
            return xs[0] * inv.reshape(-1, *[1] * (xs[0].dim() - 1))
        if step.name == "fold_bn_bias":
            gamma, beta, mean, _ = xs
            return beta - mean * gamma * inv
        return -xs[0] * inv  # fold_bn_bias_noaffine
    raise AssertionError(step.name)


def apply(op: str, xs: list[torch.Tensor]) -> torch.Tensor:
    steps = parse(op)
    y = _apply_step(steps[0], xs)
    for step in steps[1:]:
        y = _apply_step(step, [y])
    return y


# ------------------------------------------------------------------ inverse


def _invert_simple(step: Step, y: torch.Tensor) -> torch.Tensor:
    if step.name == "copy":
        return y
    if step.name == "transpose":
        return y.t()
    if step.name == "squeeze":
        return y.unsqueeze(step.arg("dim"))
    if step.name == "exp":
        return torch.log(y.to(_work_dtype(y)))
    if step.name == "sqrt":
        return y.to(_work_dtype(y)) ** 2
    raise AssertionError(step.name)


WN_SUFFIXES = (".weight_v", ".parametrizations.weight.original1")


def folded_name(v_name: str) -> str:
    """The ``.weight`` name a weight-norm pair has once weight norm is removed."""
    for suf in WN_SUFFIXES:
        if v_name.endswith(suf):
            return v_name[: -len(suf)] + ".weight"
    raise OpError(f"{v_name!r} is not a weight-norm 'v' tensor name")


def _invert_bn_fold(step: Step, srcs: list[str], y: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """An equivalent upstream state for a folded batch norm (see the module docstring)."""
    c = y.shape[0]
    identity_var = torch.full((c,), 1.0 - step.arg("eps"), dtype=y.dtype)
    if step.name == "fold_bn_weight":
        out[srcs[0]], out[srcs[1]], out[srcs[2]] = y, torch.ones(c, dtype=y.dtype), identity_var
    elif step.name == "fold_bn_weight_noaffine":
        out[srcs[0]], out[srcs[1]] = y, identity_var
    elif step.name == "fold_bn_bias":
        out[srcs[0]], out[srcs[1]], out[srcs[2]], out[srcs[3]] = torch.ones(c, dtype=y.dtype), y, torch.zeros(c, dtype=y.dtype), identity_var
    else:  # fold_bn_bias_noaffine: (x - mean) / sqrt(var + eps) with var + eps = 1
        out[srcs[0]], out[srcs[1]] = -y, identity_var


def invert(provenance: dict[str, dict], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map canonical tensors back to upstream names.

    Weight-norm pairs come back as the folded ``<module>.weight`` (load them into a model
    whose weight norm was removed).  Tensors regenerated from the config (empty
    ``from``) have no upstream source and are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    chunks: dict[str, dict] = {}
    for name, prov in provenance.items():
        srcs = prov["from"]
        if not srcs:
            continue
        steps = parse(prov["op"])
        y = tensors[name]
        # fold_weight_norm|split: the split's chunks rebuild the folded weight.
        folded_split = len(steps) > 1 and steps[0].name == "fold_weight_norm" and steps[1].name == "split"
        for step in reversed(steps[2 if folded_split else 1:]):
            y = _invert_simple(step, y)
        first = steps[1] if folded_split else steps[0]
        if first.name == "split":
            key = folded_name(srcs[1]) if folded_split else srcs[0]
            g = chunks.setdefault(key, {"dim": first.arg("dim"), "parts": first.arg("parts"), "got": {}})
            g["got"][first.arg("index")] = y
        elif first.name == "fold_weight_norm":
            out[folded_name(srcs[1])] = y
        elif first.name in BN_FOLDS:
            _invert_bn_fold(first, srcs, y, out)
        else:
            out[srcs[0]] = _invert_simple(first, y)
    for src, g in chunks.items():
        if sorted(g["got"]) != list(range(g["parts"])):
            raise OpError(f"cannot rebuild {src!r}: have parts {sorted(g['got'])} of {g['parts']}")
        out[src] = torch.cat([g["got"][i] for i in range(g["parts"])], dim=g["dim"])
    return out
