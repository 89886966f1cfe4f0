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


# The reference module of each canonical model kind, and the name of its entry list.
MODULES: dict[str, tuple[str, str]] = {
    "gpt": ("reference.gpt", "ENTRIES"),
    "s2mel": ("reference.s2mel", "ENTRIES"),
    "w2v-bert": ("reference.w2v_bert", "ENTRIES"),
    "bigvgan": ("reference.bigvgan", "ENTRIES"),
    "semantic-codec": ("reference.semantic_codec", "ENTRIES"),
    "campplus": ("reference.campplus", "ENTRIES"),
    "speaker-matrix": ("reference.matrices", "SPEAKER_ENTRIES"),
    "emotion-matrix": ("reference.matrices", "EMOTION_ENTRIES"),
}
# Models whose layout differs in an IndexTTS release version (the file's metadata
# family_version; a file without one is 2.0), as the schema's "<kind>@<version>" sections.
VERSIONED: dict[tuple[str, str], tuple[str, str]] = {
    ("gpt", "2.5"): ("reference.gpt", "ENTRIES_2_5"),
    ("semantic-codec", "2.5"): ("reference.semantic_codec", "ENTRIES_2_5"),
}


def entries(kind: str, family_version: str | None = None) -> tuple[Entry, ...]:
    """The entry points of the reference forward for one canonical model kind, in files
    of ``family_version`` (None or "2.0": the 2.0 entries)."""
    import importlib

    if kind not in MODULES:
        raise KeyError(f"no reference forward for model {kind!r}; known: {', '.join(MODULES)}")
    module, attr = VERSIONED.get((kind, family_version or "2.0"), MODULES[kind])
    return tuple(getattr(importlib.import_module(module), attr))


def entries_for(w) -> tuple[Entry, ...]:
    """The entry points for a loaded canonical file (its metadata model and family_version)."""
    return entries(w.model, w.metadata.get("family_version"))
