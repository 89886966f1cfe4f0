"""``convert.py verify --forward``: every reference entry point on the canonical file
against upstream's own module loaded from the source.  It passes on every model of the
demo release, fails (naming the entry) on a file whose tensors swapped roles, which the
provenance check alone passes, and refuses plainly when upstream code is missing."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from converters.cli.commands import main
from reference.entry import MODULES, entries
from tests.helpers import ROOT, assert_refused, convert_in_process, manifest, python_c, swap_rows

DEMO = os.path.join(ROOT, "demo", "release")


@pytest.fixture
def bundle(demo_bundle):
    return demo_bundle  # read only (conftest)


def verify(*args):
    """The CLI in this process (the subprocess start would dominate the test's time)."""
    return CliRunner().invoke(main, ["verify", *map(str, args)])


def test_passes_on_every_demo_model(bundle):
    """Sources and configs as the manifest records them; the config is given only for the
    semantic codec, whose Hugging Face folder has none (``all`` passes the release's)."""
    files = manifest(bundle)["files"]
    kinds = {e["model"] for e in files.values()}
    assert kinds == set(MODULES)
    for name, e in sorted(files.items()):
        src = e["sources"]["checkpoint"]["path"]
        more = ["--config", e["sources"]["config"]["path"]] if e["model"] == "semantic-codec" else []
        if "stats/" in e["sources"]:
            more += ["--stats", e["sources"]["stats/"]["path"]]
        r = verify("--forward", src, bundle / name, *more)
        assert r.exit_code == 0, (name, r.output)
        assert f"forward-verified {bundle / name}" in r.output, r.output
        for entry in entries(e["model"]):
            for o in entry.outputs:
                assert f"ok  forward {entry.name}.{o} max_abs_diff=" in r.output, (name, entry.name, o, r.output)
        assert "MISMATCH" not in r.output


def test_half_precision_tolerance_is_stated(bundle):
    """The demo gpt.pth is float16, so is its canonical file: the tolerance is scaled by
    float16's eps and the output says so."""
    r = verify("--forward", DEMO, bundle / "gpt.safetensors")
    assert r.exit_code == 0, r.output
    assert "F16 file: upstream's loaded values rounded to F16 too; tolerance 8 x eps(F16)" in r.output


SWAPS = {
    "gpt": ("forward_latents", [("gpt.h.{i}.attn.q.weight", "gpt.h.{i}.attn.k.weight"),
                                ("gpt.h.{i}.attn.q.bias", "gpt.h.{i}.attn.k.bias")]),
    "s2mel": ("dit", [(f"cfm.estimator.wavenet.res_skip_layers.0.{a}.{p}", f"cfm.estimator.wavenet.res_skip_layers.0.{b}.{p}")
                      for a, b in [("res", "skip")] for p in ("weight", "bias")]),
}


@pytest.mark.parametrize("kind", list(SWAPS))
def test_swapped_roles_fail_and_name_the_entry(kind, tmp_path, monkeypatch):
    """A table that exchanged two same-shape roles writes a file whose provenance records
    the exchange faithfully: plain ``verify`` passes it, ``--forward`` does not."""
    entry, pairs = SWAPS[kind]
    with monkeypatch.context() as mp:
        swap_rows(mp, kind, *pairs)
        bad = convert_in_process(kind, DEMO, tmp_path / "bad.safetensors")
    plain = verify(DEMO, bad)
    assert plain.exit_code == 0 and "verified" in plain.output, plain.output
    r = verify("--forward", DEMO, bad)
    assert r.exit_code == 1, r.output
    assert f"MISMATCH forward {entry}." in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "differs from upstream's in" in last and f"{entry}." in last, last


def test_config_without_forward_is_refused(bundle):
    r = verify(DEMO, bundle / "gpt.safetensors", "--config", os.path.join(DEMO, "config.yaml"))
    assert r.exit_code == 1 and "error: --config is only read with --forward" in r.output, r.output


# A missing package, as Python reports one (ModuleNotFoundError naming it); then the CLI.
BLOCKER = r"""
import importlib.abc, sys
BLOCKED = tuple(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from converters.cli.commands import run
run(sys.argv[2:])
"""


@pytest.mark.parametrize("blocked,model,package", [("indextts", "gpt.safetensors", "indextts2-inference"),
                                                   ("transformers", "w2v_bert.safetensors", "transformers")])
def test_refuses_plainly_without_upstream(bundle, blocked, model, package):
    """Not a skip: one error line saying which package is missing and that the forward
    comparison was not run; nothing is compared first."""
    src = os.path.join(DEMO, "w2v-bert-2.0" if model.startswith("w2v") else "")
    p = python_c(BLOCKER, blocked, "verify", "--forward", src, bundle / model)  # forked with torch imported (tests/helpers.py)
    assert_refused(p, "the forward comparison was not run", f"package {package} is missing", "pip install")
    assert p.stderr.count("\n") == 1 and p.stdout == "", (p.stdout, p.stderr)


def test_w2v_bert_indextts2_profile(tmp_path):
    """The profile's last hidden state is the normalised feature: upstream's first 17
    states and get_emb."""
    src = os.path.join(DEMO, "w2v-bert-2.0")
    out = convert_in_process("w2v-bert", src, tmp_path / "w2v_bert.safetensors", options={"profile": "indextts2"})
    r = verify("--forward", src, out)
    assert r.exit_code == 0, r.output
    assert "ok  forward hidden_states.hidden_states" in r.output and "ok  forward semantic_features.semantic_features" in r.output
