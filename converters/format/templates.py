"""Name templates with ``{x}`` placeholders, and their expansion over loop ranges.

The mapping tables (:mod:`table`) and the schema (:mod:`schema`) both name tensors by
templates such as ``gpt.h.{i}.attn.q.weight``; this is the one expander they share.
Torch-free.
"""

from __future__ import annotations

import string
from typing import Callable, Iterator


def fields(template: str) -> list[str]:
    """The placeholder names of a template, in order of first appearance."""
    out: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name and name not in out:
            out.append(name)
    return out


def expand(names: list[str], limit: Callable[[str, dict], int]) -> Iterator[dict]:
    """Every assignment of values ``0 .. limit(name, bound) - 1`` to ``names``, in
    nested order; a bound may depend on the names to its left (``bound``)."""
    def rec(i: int, bound: dict):
        if i == len(names):
            yield dict(bound)
            return
        for v in range(limit(names[i], bound)):
            yield from rec(i + 1, {**bound, names[i]: v})

    yield from rec(0, {})
