"""The canonical layout at the released configs (bench/full_size_layout.json) is what
the converter's tables give today: a table, op or runtime-config change shows here, and
rewriting the snapshot for changed tensors needs a schema version bump."""

from __future__ import annotations

import json

import pytest

from bench import layout


def test_snapshot_is_the_current_layout():
    want, got = layout.load(), layout.snapshot()
    changed = layout.tensors_changed(want, got)
    assert not changed, (f"the canonical tensors of {changed} changed at the released config; if that is intended, bump "
                         "canonical_schema.json 'version' and run `python -m bench.layout`")
    for name in got["files"]:
        assert got["files"][name]["config"] == want["files"][name]["config"], \
            f"{name}: the metadata config changed at the released config; run `python -m bench.layout`"
    assert got == want


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
