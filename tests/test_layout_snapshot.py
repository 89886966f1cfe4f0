"""The canonical layout at the released configs (bench/full_size_layout.json) is what
the converter's tables give today: a table, op or runtime-config change shows here, and
rewriting the snapshot for changed tensors needs a schema version bump."""

from __future__ import annotations

import json

import pytest

from bench import layout

# One worker: bench.layout computes the layout at the released configs once per process
# (~3 s: the meta-device upstream models) and every test here reads it.
pytestmark = pytest.mark.xdist_group("layout-snapshot")


def test_snapshot_is_the_current_layout():
    want, got = layout.load(), layout.snapshot()
    changed = layout.tensors_changed(want, got)
    assert not changed, (f"the canonical tensors of {changed} changed at the released config; if that is intended, bump "
                         "canonical_schema.json 'version' and run `python -m bench.layout`")
    for key in layout.SECTIONS.values():
        assert set(got[key]) == set(want.get(key, {})), f"{key}: the files pinned changed; run `python -m bench.layout`"
        for name in got[key]:
            assert got[key][name]["config"] == want[key][name]["config"], \
                f"{key} {name}: the metadata config changed at the released config; run `python -m bench.layout`"
    assert got == want


def test_full_size_2_5_plan_accounts_for_every_tensor():
    """IndexTTS-2.5's gpt and codec at the released 2.5 config (meta-device upstream
    classes, no data): the sources have the release's size, every source tensor is
    consumed or dropped with a reason, and the pinned files are what the plan gives."""
    res = layout.resolved_2_5()
    sizes = {kind: (len(sd), sum(t.numel() for t in sd.values())) for kind, (sd, _, _) in res.items()}
    assert sizes == {"gpt": (456, 814_849_460), "semantic-codec": (243, 50_583_312)}  # /work/shared/UPSTREAM.md
    for kind, (sd, plan, _) in res.items():
        consumed = {s for e in plan.entries for s in e.sources}
        assert consumed | set(plan.dropped) == set(sd) and not consumed & set(plan.dropped), kind
        assert all(plan.dropped.values()), f"{kind}: a drop without a reason"
    gpt, codec = res["gpt"][1], res["semantic-codec"][1]
    assert sorted(gpt.dropped) == ["text_head.bias", "text_head.weight"]
    assert {n.split(".")[0] for n in codec.dropped} == {"down", "encoder", "quantizer"}
    assert all(n.startswith("quantizer.quantizers.0.in_project.") for n in codec.dropped if n.startswith("quantizer."))
    snap = layout.load()["files@2.5"]
    assert {name: len(s["tensors"]) for name, s in snap.items()} == {"gpt.safetensors": 564, "semantic_codec.safetensors": 121}
    assert snap["gpt.safetensors"]["config"]["number_text_tokens"] == 60509
    assert {t[0] for t in snap["gpt.safetensors"]["tensors"]} >= {"spk_emb_proj.weight", "lang_embedding.weight"}


def test_rewriting_changed_tensors_needs_a_version_bump(tmp_path, monkeypatch):
    snap = layout.load()
    snap["files"]["gpt.safetensors"]["tensors"] = snap["files"]["gpt.safetensors"]["tensors"][1:]
    p = tmp_path / "layout.json"
    p.write_text(layout.dumps(snap))
    monkeypatch.setattr(layout, "SNAPSHOT", str(p))
    with pytest.raises(SystemExit, match="gpt.safetensors changed at the released config, but the schema version is still"):
        layout.main()
    assert json.loads(p.read_text()) == snap  # left as it was
    snap["schema_version"] = "0.0"  # an older snapshot: the bump has happened
    p.write_text(layout.dumps(snap))
    layout.main()
    assert layout.tensors_changed(json.loads(p.read_text()), layout.snapshot()) == []


def test_a_changed_2_5_file_needs_a_version_bump_too(tmp_path, monkeypatch, capsys):
    snap = layout.load()
    assert layout.dumps(snap) == open(layout.SNAPSHOT).read()  # the file is in dumps' format
    codec = snap["files@2.5"]["semantic_codec.safetensors"]
    codec["tensors"][0][2] = [1] + codec["tensors"][0][2][1:]
    p = tmp_path / "layout.json"
    p.write_text(layout.dumps(snap))
    monkeypatch.setattr(layout, "SNAPSHOT", str(p))
    with pytest.raises(SystemExit, match=r"semantic_codec.safetensors@2.5 changed at the released config"):
        layout.main()
    # Pinning a file for the first time is no change of the format: no bump needed.
    del snap["files@2.5"]
    p.write_text(layout.dumps(snap))
    layout.main()
    assert "pinned at the released config for the first time: gpt.safetensors@2.5, semantic_codec.safetensors@2.5" \
        in capsys.readouterr().out
    assert json.loads(p.read_text()) == layout.snapshot()
