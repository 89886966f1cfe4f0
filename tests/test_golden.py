"""Golden activations (``convert.py golden``) and the reference runtime's isolation:
the golden files are deterministic, belong to the canonical files beside them (``check``
says so, and refuses them once a canonical file changes), and a port's parity loop as
docs/reference.md shows it reproduces them; the reference runs with every upstream package,
the converter and the safetensors library unimportable."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from converters.cli.golden import check_golden
from reference.entry import MODULES
from tests.helpers import ROOT, assert_refused, python_c, run_cli

DEMO = os.path.join(ROOT, "demo", "release")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "canonical"
    run_cli("all", "--src", DEMO, "--out", out, "--quiet")
    run_cli("golden", out)
    return out


def test_golden_for_every_canonical_file_and_check_passes(bundle):
    names = sorted(n for n in os.listdir(bundle) if n.endswith(".safetensors"))
    assert sorted(os.listdir(bundle / "golden")) == names
    p = run_cli("check", bundle)
    for n in names:
        assert f"ok {bundle / 'golden' / n} (golden activations" in p.stdout


def test_golden_is_deterministic(bundle, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    shutil.rmtree(again / "golden")
    run_cli("golden", again)
    for n in os.listdir(bundle / "golden"):
        assert (bundle / "golden" / n).read_bytes() == (again / "golden" / n).read_bytes(), n


def test_golden_metadata_and_contents(bundle):
    from safetensors import safe_open

    for n in os.listdir(bundle / "golden"):
        with safe_open(str(bundle / "golden" / n), "pt") as f:
            md = f.metadata()
            names = set(f.keys())
        assert md["canonical_file"] == n and md["dtype"] == "F32" and md["model"] in MODULES
        entries = json.loads(md["entries"])
        assert entries and all(e["outputs"] and e["upstream"] for e in entries)
        for e in entries:
            assert {f"input.{e['name']}.{a}" for a in e["args"]} <= names
            assert {f"output.{e['name']}.{o}" for o in e["outputs"]} <= names
        # every model with layers records them
        if md["model"] not in ("speaker-matrix", "emotion-matrix"):
            assert any(k.startswith("act.") for k in names), n


def port_parity_loop(canonical_dir, golden_file, forward) -> float:
    """What docs/reference.md tells a port to do: load the canonical weights, feed input.*,
    compare with output.*.  ``forward(weights, entry_name, *inputs)`` is the port."""
    from safetensors.torch import load_file
    from safetensors import safe_open

    with safe_open(golden_file, "pt") as f:
        md = f.metadata()
    gold = load_file(golden_file)
    weights = os.path.join(canonical_dir, md["canonical_file"])
    worst = 0.0
    for e in json.loads(md["entries"]):
        outs = forward(weights, e["name"], *[gold[f"input.{e['name']}.{a}"] for a in e["args"]])
        for o, got in zip(e["outputs"], outs):
            want = gold[f"output.{e['name']}.{o}"]
            worst = max(worst, float((got.double() - want.double()).abs().max()) if want.numel() else 0.0)
    return worst


def test_port_parity_loop_with_the_reference_as_port(bundle):
    from reference.entry import entries
    from reference.load import load

    def forward(path, name, *args):
        w = load(path, device="cpu").float()
        e = next(e for e in entries(w.model) if e.name == name)
        out = e.run(w, None, **dict(zip(e.args, args)))
        return [out[o] for o in e.outputs]

    for n in os.listdir(bundle / "golden"):
        assert port_parity_loop(str(bundle), str(bundle / "golden" / n), forward) == 0.0, n


def test_check_refuses_golden_of_another_canonical_file(bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    run_cli("s2mel", DEMO, d / "s2mel.safetensors", "--dtype", "float32", "--force", "--quiet")  # the demo s2mel is float16
    errs = check_golden(str(d / "golden" / "s2mel.safetensors"))
    assert any("computed from another s2mel.safetensors" in e for e in errs), errs
    p = run_cli("check", d / "golden" / "s2mel.safetensors", expect=None)
    assert_refused(p, "computed from another s2mel.safetensors", "convert.py golden")


def test_check_refuses_a_tampered_golden_file(bundle, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    g = d / "golden" / "bigvgan.safetensors"
    with safe_open(str(g), "pt") as f:
        md = f.metadata()
    ts = load_file(str(g))
    victim = sorted(k for k in ts if k.startswith("output."))[0]
    del ts[victim]
    save_file(ts, str(g), metadata=md)
    assert any(f"missing tensor {victim!r}" in e for e in check_golden(str(g)))


def test_golden_needs_canonical_files(tmp_path):
    p = run_cli("golden", tmp_path, expect=None)
    assert_refused(p, "no canonical files")
    p = run_cli("golden", tmp_path / "nope", expect=None)
    assert_refused(p, "no such folder")


BLOCKER = r"""
import importlib.abc, sys
BLOCKED = ("converters", "indextts", "transformers", "yaml", "safetensors", "tests", "omegaconf", "einops",
           "librosa", "torchaudio", "soundfile", "audioread", "scipy", "kaldi_native_fbank")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked in this test: {name}")
        return None
sys.meta_path.insert(0, Block())
import torch
from reference.entry import MODULES, entries
from reference.load import load
files = {k: f.float() for k, f in load(sys.argv[1], device="cpu").items()}
assert sorted(files) == sorted(MODULES), sorted(files)
ran = []
for kind, w in sorted(files.items()):
    for e in entries(kind):
        acts = {}
        out = e.run(w, acts, **e.inputs(w.config, torch.Generator().manual_seed(0)))
        assert list(out) == list(e.outputs)
        ran.append(f"{kind}.{e.name}")
print(" ".join(ran))
# The front ends, configured from manifest.json alone, on a stereo 44.1 kHz prompt (soxr, sinc resampling).
import json, os
import numpy as np
from reference import front_ends as fe
pipe = json.load(open(os.path.join(sys.argv[1], "manifest.json")))["pipeline"]
fronts, rates = pipe["front_ends"], pipe["sample_rates"]
load_p, sinc = fronts["resampling"]["prompt_load"], fronts["resampling"]["sinc"]
t = np.arange(30000) / 44100.0
stereo = (0.5 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)])).astype(np.float32)
a22 = fe.load_prompt(stereo, 44100, load_p["speaker_prompt_hz"], load_p)
a16 = fe.resample(a22, load_p["speaker_prompt_hz"], rates["semantic_features_hz"], sinc)
shapes = [fe.w2v_bert_features(a16, fronts["w2v_bert_features"])[0].shape, fe.campplus_fbank(a16, fronts["campplus_fbank"]).shape,
          fe.s2mel_mel(a22, fronts["s2mel_mel"]).shape]
print("front_ends", *(tuple(s) for s in shapes))
"""


def test_reference_reads_only_canonical_files(bundle):
    """Every entry point, and the front ends on the manifest's values, run with upstream
    code, transformers, YAML, the converter, the safetensors library and the audio
    libraries upstream uses (librosa, torchaudio, soundfile, scipy) unimportable."""
    p = python_c(BLOCKER, bundle)  # forked with torch imported, nothing else (tests/helpers.py)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    ran = lines[0].split()
    assert {r.split(".")[0] for r in ran} == set(MODULES), ran
    assert lines[1].startswith("front_ends (1, "), lines  # reference/front_ends.py ran on the manifest's values
