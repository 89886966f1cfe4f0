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
| sqrt | 1 | sqrt(x), correctly rounded | y**2 |
| split(dim,index,parts) | 1 | the index-th of ``parts`` equal chunks along dim | concatenate all chunks |
| fold_weight_norm(dim) | 2: g, v | g * v / ||v|| (norm over every dim but ``dim``) | the folded weight itself |
| fold_bn_weight(eps) | 3: conv w, bn weight, running_var | w * (weight / sqrt(var + eps)) per output channel (dim 0) | w, with an identity batch norm |
| fold_bn_bias(eps) | 4: bn weight, bias, running_mean, running_var | bias - mean * weight / sqrt(var + eps) | the bias, as the batch norm's beta |
| fold_bn_weight_noaffine(eps) | 2: conv w, running_var | w / sqrt(var + eps) (``affine=False`` batch norm) | w, with an identity batch norm |
| fold_bn_bias_noaffine(eps) | 2: running_mean, running_var | -mean / sqrt(var + eps) | the bias, as ``-running_mean`` |
| normalize_scale | 2: affine weight, var | w / sqrt(var) | the normalised weight itself |
| normalize_shift | 3: affine bias, mean, var | (b - mean) / sqrt(var) | the normalised bias itself |

The ``fold_bn_*`` steps fold an eval-mode batch norm into the bias-free convolution
before it (``bn(conv(x)) = conv'(x) + b'``, exact).  Their inverse is not the original
tensors (those are not recoverable) but an equivalent upstream state: the folded conv
weight, and a batch norm with weight 1, running_mean 0 and running_var ``1 - eps``
whose beta (or, without affine, ``-running_mean``) carries the folded bias.  ``eps`` is
the only float argument.

``normalize_*`` fold a feature normalisation ``(y - mean) / sqrt(var)`` into the affine
of the layer norm that produces ``y`` (exact: ``LN(x) * w + b`` normalised is
``LN(x) * w / sqrt(var) + (b - mean) / sqrt(var)``).  Their inverse is again an
equivalent upstream state: the same layer norm carrying the normalised affine, so the
upstream module directly outputs the normalised features.

Only ``split``, ``fold_weight_norm``, ``fold_bn_*`` and ``normalize_*`` are many-to-one in reverse, and they may only
appear as the first step of a chain, with one exception: ``split`` may directly follow
``fold_weight_norm`` (a fused weight-normed projection, folded as a whole, then split
into its parts: ``fold_weight_norm(dim=0)|split(dim=0,index=1,parts=2)``).
Arithmetic is done in float32 (or float64 for float64 inputs) and cast to the output
dtype by the caller.

This module computes in torch; the converter runs the data-movement steps and ``sqrt``
with numpy where that gives the same bytes (:mod:`arrays`), so this module, and torch,
are only imported for what computes.
"""

from __future__ import annotations

import torch

from .arrays import from_torch, move
from .arrays import sqrt as exact_sqrt
from .opspec import BN_FOLDS, FIRST_ONLY, NORMALIZE, STEPS, OpError, Shape, Step, n_inputs, out_shape, parse  # noqa: F401


# ------------------------------------------------------------------ forward


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _apply_step(step: Step, xs: list[torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    if step.name in ("copy", "transpose", "squeeze", "split"):
        return move(step, x)  # the one implementation, shared with the numpy path
    if step.name == "exp":
        return torch.exp(x.to(_work_dtype(x)))
    if step.name == "sqrt":  # correctly rounded, as the numpy path (torch's CPU sqrt is not)
        return torch.from_numpy(exact_sqrt(from_torch(x.to(_work_dtype(x)).contiguous())))
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
    if step.name in NORMALIZE:
        wd = _work_dtype(xs[0])
        xs = [t.to(wd) for t in xs]
        std = torch.sqrt(xs[-1])  # as IndexTTS-2 computes it: no epsilon
        return xs[0] / std if step.name == "normalize_scale" else (xs[0] - xs[1]) / std
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
        elif first.name in NORMALIZE:
            out[srcs[0]] = y  # the layer norm carries the normalised affine
        else:
            out[srcs[0]] = _invert_simple(first, y)
    for src, g in chunks.items():
        if sorted(g["got"]) != list(range(g["parts"])):
            raise OpError(f"cannot rebuild {src!r}: have parts {sorted(g['got'])} of {g['parts']}")
        out[src] = torch.cat([g["got"][i] for i in range(g["parts"])], dim=g["dim"])
    return out
