"""The canonical layout at the released configs, from the converter's own plans.

    python -m bench.layout            # rewrite bench/full_size_layout.json

For the four large models (gpt, s2mel, w2v-bert, BigVGAN) the upstream classes are
built on the meta device at the released configs (no data), their state-dict names,
shapes and dtypes stand in for a source, and the converter's tables resolve them
exactly as a conversion would.  The same for IndexTTS-2.5's two models whose layout
differs from 2.0's (gpt, ``gpt@2.5``; semantic codec, ``semantic-codec@2.5``), at 2.5's
reconstructed config (``released_configs.json`` ``indextts2_5``), from the classes the
2.5 bench release is made of (:func:`bench.inputs.modules`: indextts25's UnifiedVoice
with upstream's ``text_head``, 456 tensors; EnhancedCodec's ``model``, 243 tensors).
The result, in file order, with each file's metadata config and the schema version, is
``bench/full_size_layout.json``: ``files`` holds the 2.0 files (what ``bench.bulk_load
synth`` and ``bench.device_check`` read), ``files@2.5`` the 2.5 ones:

- a test recomputes it, so a change to a table, an op or a runtime config at the
  released config shows as a failing test and a diff;
- rewriting it when the tensors (names, dtypes, shapes) changed is refused unless the
  schema version was bumped (a changed layout is a new version of the format);
- ``bench.bulk_load synth`` writes full-size files from it on machines without the
  bench inputs (the GPU machine).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "bench", "full_size_layout.json")
KINDS = ("gpt", "s2mel", "w2v-bert", "bigvgan")
KINDS_2_5 = ("gpt", "semantic-codec")  # the 2.5 models whose layout differs from 2.0's (family.VERSIONED_KINDS)
SECTIONS = {"2.0": "files", "2.5": "files@2.5"}  # snapshot key of each release's files


def _meta_source(sd: dict, path: str):
    from converters.format.arrays import torch_dtype_name
    from converters.io.sources import Source

    return Source(path, "meta", {k: tuple(v.shape) for k, v in sd.items()}, {k: torch_dtype_name(v.dtype) for k, v in sd.items()})


def _resolve(kind: str, sd: dict, cfg_file: str, family_version: str):
    """(plan, runtime config) of ``kind`` for a source with ``sd``'s names, shapes and
    dtypes, as a conversion resolves it (it refuses a tensor no rule consumes or drops)."""
    from converters.release import engine
    from converters.format.table import resolve

    mod = engine.model_module(kind, family_version)
    config = mod.runtime_config(mod.load_config(cfg_file), cfg_file)
    rows, loops = mod.table(config)
    drops = mod.drops(config) if hasattr(mod, "drops") else mod.DROPS
    return resolve(_meta_source(sd, f"(meta {kind})"), rows, loops, drops, config, None), config


def _summary(plans: dict) -> dict:
    """{file name: {"model", "dtype", "config", "tensors"}} of {kind: (plan, config)}, in file order."""
    from converters.format import schema
    from converters.format.arrays import is_float
    from converters.format.st_header import ITEMSIZE

    out = {}
    for kind, (plan, config) in plans.items():
        entries = sorted(plan.entries, key=lambda e: (-ITEMSIZE[e.dtype], e.name))
        floats = sorted({e.dtype for e in entries if is_float(e.dtype)})
        out[schema.model_spec(kind)["file"]] = {
            "model": kind,
            "dtype": floats[0],
            "config": json.loads(json.dumps(config)),
            "tensors": [[e.name, e.dtype, list(e.shape)] for e in entries],
        }
    return out


@functools.lru_cache(maxsize=1)
def planned() -> dict:
    """{file name: {"model", "dtype", "config", "tensors": [[name, dtype, shape], ...]}}."""
    import yaml

    from . import inputs

    cfgs = inputs.configs("full")
    mods = inputs.modules(cfgs)
    sds = {
        "gpt": mods["gpt"].state_dict(),
        "s2mel": {f"{part}.{k}": v for part, m in mods["s2mel"].items() for k, v in m.state_dict().items()},
        "w2v-bert": mods["w2v"].state_dict(),
        "bigvgan": mods["bigvgan"].state_dict(),
    }
    import torch

    hidden = mods["w2v_config"].hidden_size
    sds["w2v-bert"] = {**sds["w2v-bert"], "stats/mean": torch.empty(hidden, device="meta"),
                       "stats/var": torch.empty(hidden, device="meta")}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"yaml": os.path.join(tmp, "config.yaml"), "w2v": os.path.join(tmp, "w2v.json"),
                 "bigvgan": os.path.join(tmp, "bigvgan.json")}
        with open(files["yaml"], "w") as f:
            yaml.safe_dump(cfgs["yaml"], f)
        mods["w2v_config"].to_json_file(files["w2v"])
        with open(files["bigvgan"], "w") as f:
            json.dump(cfgs["bigvgan"], f)
        cfg_file = {"gpt": files["yaml"], "s2mel": files["yaml"], "w2v-bert": files["w2v"], "bigvgan": files["bigvgan"]}
        return _summary({kind: _resolve(kind, sds[kind], cfg_file[kind], "2.0") for kind in KINDS})


@functools.lru_cache(maxsize=1)
def resolved_2_5() -> dict:
    """{kind: (meta source state dict, plan, runtime config)} for IndexTTS-2.5's gpt and
    semantic codec at 2.5's config: the sources the 2.5 bench release holds (gpt.pth's
    456 tensors, codec.pth's ``model``), resolved as a conversion would."""
    import yaml

    from . import inputs

    cfgs = inputs.configs("full-2.5")
    mods = inputs.modules(cfgs, "2.5")
    sds = {"gpt": inputs.gpt_state_dict(mods), "semantic-codec": mods["codec"]}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfgs["yaml"], f, sort_keys=False)
        return {kind: (sds[kind], *_resolve(kind, sds[kind], path, "2.5")) for kind in KINDS_2_5}


def planned_2_5() -> dict:
    """As :func:`planned`, for the 2.5 files (:func:`resolved_2_5`)."""
    return _summary({kind: (plan, config) for kind, (_, plan, config) in resolved_2_5().items()})


def snapshot() -> dict:
    from converters.format import schema

    return json.loads(json.dumps({"schema_version": schema.schema_version(), SECTIONS["2.0"]: planned(),
                                  SECTIONS["2.5"]: planned_2_5()}))  # a fresh copy


def dumps(snap: dict) -> str:
    """One tensor per line: a diff shows which tensor changed."""
    sections = []
    for key in SECTIONS.values():
        if key not in snap:
            continue
        parts = []
        for name, s in sorted(snap[key].items()):
            tensors = ",\n".join(json.dumps(t) for t in s["tensors"])
            parts.append(f"{json.dumps(name)}: {{\"model\": {json.dumps(s['model'])}, \"dtype\": {json.dumps(s['dtype'])}, "
                         f"\"config\": {json.dumps(s['config'], sort_keys=True)}, \"tensors\": [\n{tensors}\n]}}")
        sections.append(f"{json.dumps(key)}: {{\n" + ",\n".join(parts) + "\n}")
    return "{\"schema_version\": " + json.dumps(snap["schema_version"]) + ", " + ",\n".join(sections) + "}\n"


def load() -> dict:
    with open(SNAPSHOT) as f:
        return json.load(f)


def tensors_changed(old: dict, new: dict) -> list[str]:
    """Files of ``old`` whose tensors (names, dtypes, shapes) differ in ``new``, or that
    ``new`` lacks; a 2.5 file is named ``<file>@2.5``.  A file ``old`` lacks is an
    addition to the snapshot, not a change of the format (:func:`added`)."""
    out = []
    for version, key in SECTIONS.items():
        a, b = old.get(key) or {}, new.get(key) or {}
        suffix = "" if version == "2.0" else f"@{version}"
        out += [n + suffix for n in sorted(a) if a[n].get("tensors") != (b.get(n) or {}).get("tensors")]
    return out


def added(old: dict, new: dict) -> list[str]:
    """Files ``new`` pins that ``old`` did not (named as in :func:`tensors_changed`)."""
    return [n + ("" if v == "2.0" else f"@{v}") for v, key in SECTIONS.items()
            for n in sorted(set(new.get(key) or {}) - set(old.get(key) or {}))]


def main() -> None:
    sys.path.insert(0, ROOT)
    new = snapshot()
    if os.path.exists(SNAPSHOT):
        old = load()
        changed = tensors_changed(old, new)
        from converters.format.schema import parse_version

        if changed and parse_version(new["schema_version"]) <= parse_version(old.get("schema_version", 0)):
            raise SystemExit(f"the canonical tensors of {', '.join(changed)} changed at the released config, but the schema "
                             f"version is still {new['schema_version']}: bump canonical_schema.json \"version\" first "
                             "(the major for a changed layout, the minor for what older files may lack)")
        if added(old, new):
            print(f"pinned at the released config for the first time: {', '.join(added(old, new))}")
    with open(SNAPSHOT, "w") as f:
        f.write(dumps(new))
    print(f"wrote {SNAPSHOT}: " + ", ".join(f"{n}{'' if v == '2.0' else '@' + v} ({len(s['tensors'])} tensors)"
                                         for v, key in SECTIONS.items() for n, s in sorted(new[key].items())))


if __name__ == "__main__":
    main()
