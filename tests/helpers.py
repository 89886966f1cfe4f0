"""Shared test helpers: run the CLI, load canonical files, map them back upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from converters import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``convert.py`` in a subprocess, as a user would."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT)
    if expect is not None:
        assert p.returncode == expect, f"exit {p.returncode}, expected {expect}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def assert_refused(p: subprocess.CompletedProcess, *needles: str) -> None:
    """A refusal: non-zero exit, one `error:` line naming what is wrong, no traceback."""
    assert p.returncode != 0, p.stdout
    assert p.stderr.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, f"{n!r} not in {p.stderr!r}"


def metadata(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def load_canonical(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    md = metadata(path)
    return load_file(path), json.loads(md["provenance"])


def back_to_upstream(path: str) -> dict[str, torch.Tensor]:
    """Canonical file -> upstream state dict (weight norm folded), via provenance only."""
    tensors, prov = load_canonical(path)
    return ops.invert(prov, tensors)


def rewrite(path: str, out: str, tensors=None, meta=None) -> str:
    """Write a (tampered) copy of a canonical file with the library writer."""
    t0, _ = load_canonical(path)
    m0 = metadata(path)
    save_file(tensors if tensors is not None else t0, out, metadata=meta if meta is not None else m0)
    return out
