"""What an entry point of the reference runtime declares, so that golden files can be
written (and read by ports) the same way for every model.

Each model module lists its entry points as :class:`Entry` objects in ``ENTRIES``
(``reference/matrices.py`` has one list per matrix file).  An entry point:

- ``run(w, acts, **inputs) -> {output name: tensor}``: the forward, reading only the
  canonical file ``w`` (a :class:`reference.load.CanonicalFile`).  When ``acts`` is a
  dict, the forward stores the output of every block or layer in it as
  ``"<stack>.<i>"`` (for example ``"gpt.3"``, the hidden state after GPT-2 block 3).
- ``inputs(config, generator) -> {argument name: tensor}``: seeded, deterministic,
  short inputs valid for the file's config (so a golden file stays small at full size).
- ``args``: the argument names in call order; ``outputs``: the output names in order.
- ``upstream``: the upstream function it reproduces, in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Entry:
    name: str
    upstream: str
    args: tuple[str, ...]
    outputs: tuple[str, ...]
    inputs: Callable[[dict, torch.Generator], dict[str, torch.Tensor]]
    run: Callable[..., dict[str, torch.Tensor]]


def record(acts: dict | None, key: str, t: torch.Tensor) -> None:
    """Store an activation when the caller asked for them."""
    if acts is not None:
        acts[key] = t.detach()
