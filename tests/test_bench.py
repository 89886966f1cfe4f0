"""Smoke run of the bench machinery (bench/) on tiny generated inputs.

Timings are not asserted (benchmarks are not timed tests); this checks that every
measurement runs, the inputs have the release layout the converters accept, the
memory sampler sees the process, and the JSON report has every row.
"""

from __future__ import annotations

import json
import os

import pytest

from bench import inputs, run


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    res = run.main(["--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "res"), "--runs", "1", "--size", "tiny"])
    saved = json.loads((tmp_path / "res" / "latest-tiny.json").read_text())
    assert saved["table"] == res["table"]
    assert set(saved["verdicts"]) >= {"convert_gpt", "convert_all", "memory_gpt", "check", "load_gpt", "load_s2mel", "load_bigvgan",
                                      "convert_gpt_copy_or_hash", "no_torch_gpt", "no_torch_w2v-bert"}
    # issue 16: the gpt and w2v-bert conversions of the bench release never import torch
    assert saved["torch_free"]["imports_torch"] == {"gpt": False, "w2v-bert": False}
    assert saved["torch_free"]["import_torch_median_s"] > 0 and saved["convert"]["gpt"]["sha256sum_median_s"] > 0
    for which in ("gpt", "all"):
        assert saved["convert"][which]["convert_median_s"] > 0 and saved["convert"][which]["copy_median_s"] > 0
    assert saved["memory"]["converter"]["runs"][0]["samples"] > 0
    assert saved["memory"]["converter"]["peak_rss_anon_mib"] > 0 and saved["memory"]["naive"]["peak_rss_anon_mib"] > 0
    assert set(saved["load"]) == set(run.OUT_NAMES)
    assert all(row["canonical_median_s"] > 0 and row["upstream_median_s"] > 0 for row in saved["load"].values())
    assert saved["machine"]["cpus"] >= 1
    bl = saved["bulk_load"]["cpu"]
    assert set(bl["warm"]) == {"load_file", "ours", "page_cache"} and all(r["median_s"] > 0 for r in bl["warm"].values())
    # The work folder (outputs, copies) is cleaned up; the inputs stay for reuse.
    assert sorted(os.listdir(tmp_path / "cache")) == ["release-tiny"]
    release = str(tmp_path / "cache" / "release-tiny")
    assert all(os.path.isfile(p) for p in inputs.release_files(release).values())
    logs = []
    inputs.ensure(release, "tiny", logs.append)
    assert logs == [f"inputs: reusing {release}"]


@pytest.mark.slow
def test_inputs_have_upstream_names_and_shapes(tmp_path):
    """The generated files hold exactly the upstream classes' state-dict names and shapes."""
    import torch
    from safetensors.torch import load_file

    folder = inputs.ensure(str(tmp_path / "rel"), "tiny", lambda m: None)
    files = inputs.release_files(folder)
    mods = inputs.modules(inputs.configs("tiny"))
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(torch.load(files["gpt"], weights_only=True)) == shapes(mods["gpt"].state_dict())
    s2 = torch.load(files["s2mel"], weights_only=True)
    assert {k: shapes(v) for k, v in s2["net"].items()} == {k: shapes(m.state_dict()) for k, m in mods["s2mel"].items()}
    n_params = sum(1 for m in mods["s2mel"].values() for _ in m.parameters())
    assert sum(len(o["state"]) for o in s2["optimizer"].values()) == n_params
    assert shapes(load_file(files["w2v-bert"])) == shapes(mods["w2v"].state_dict())
    bv = torch.load(files["bigvgan"], weights_only=True)["generator"]
    assert shapes(bv) == shapes(mods["bigvgan"].state_dict()) and any(k.endswith("weight_g") for k in bv)


def test_release_2_5_inputs_are_full_size_only(tmp_path, capsys):
    """``--release 2.5`` has no tiny inputs (its smoke coverage is the layout snapshot's
    meta-device plan): refused before anything is generated."""
    import pytest

    with pytest.raises(SystemExit):
        run.main(["--cache", str(tmp_path / "cache"), "--release", "2.5", "--size", "tiny"])
    assert "--release 2.5 has full-size inputs only" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    files = inputs.release_files("R", "full-2.5")  # the roles run.py reads exist for 2.5 too
    assert {"gpt", "s2mel", "w2v-bert", "stats", "bigvgan", "codec"} <= set(files)
    assert files["w2v-bert"] == os.path.join("R", "hf_cache", "w2v-bert-2.0", "model.safetensors")


@pytest.mark.slow
def test_bulk_load_explore_plumbing(demo_bundle):
    """``bench.bulk_load.explore`` (what ``device_check --explore`` runs on a GPU
    machine), on the CPU: each variant is checked against ``load_file`` in a child
    process before it is timed, and the fastest verified one is named."""
    from bench import bulk_load

    lines = []
    res = bulk_load.explore(str(demo_bundle), "cpu", variants=[("pinned", "cudart", 2, 1)],
                            runs=1, log=lines.append)
    assert not res["failed"], res["failed"]
    assert all(r["tensors"] > 100 and r["mismatches"] == [] for r in res["verify"].values()) and len(res["verify"]) == 1
    assert set(res["warm"]) == {"load_file", "pinned-cudart-2x1"}
    assert res["best"]["name"] == "pinned-cudart-2x1" and res["best"]["piece_mib"] == 1
