"""The canonical layout at the released configs, from the converter's own plans.

    python -m bench.layout            # rewrite bench/full_size_layout.json

For the four large models (gpt, s2mel, w2v-bert, BigVGAN) the upstream classes are
built on the meta device at the released configs (no data), their state-dict names,
shapes and dtypes stand in for a source, and the converter's tables resolve them
exactly as a conversion would.  The result, in file order, with each file's metadata
config and the schema version, is ``bench/full_size_layout.json``:

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


def _meta_source(sd: dict, path: str):
    from converters.sources import Source

    return Source(path, "meta", {k: tuple(v.shape) for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()})


@functools.lru_cache(maxsize=1)
def planned() -> dict:
    """{file name: {"model", "dtype", "config", "tensors": [[name, dtype, shape], ...]}}."""
    import yaml

    from converters import engine, schema
    from converters.safetensors_io import DTYPES, st_dtype
    from converters.table import resolve

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
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"yaml": os.path.join(tmp, "config.yaml"), "w2v": os.path.join(tmp, "w2v.json"),
                 "bigvgan": os.path.join(tmp, "bigvgan.json")}
        with open(files["yaml"], "w") as f:
            yaml.safe_dump(cfgs["yaml"], f)
        mods["w2v_config"].to_json_file(files["w2v"])
        with open(files["bigvgan"], "w") as f:
            json.dump(cfgs["bigvgan"], f)
        cfg_file = {"gpt": files["yaml"], "s2mel": files["yaml"], "w2v-bert": files["w2v"], "bigvgan": files["bigvgan"]}
        for kind in KINDS:
            mod = engine.model_module(kind)
            config = mod.runtime_config(mod.load_config(cfg_file[kind]), cfg_file[kind])
            rows, loops = mod.table(config)
            drops = mod.drops(config) if hasattr(mod, "drops") else mod.DROPS
            plan = resolve(_meta_source(sds[kind], f"(meta {kind})"), rows, loops, drops, config, None)
            entries = sorted(plan.entries, key=lambda e: (-DTYPES[st_dtype(e.dtype)][1], e.name))
            floats = sorted({st_dtype(e.dtype) for e in entries if e.dtype.is_floating_point})
            out[schema.model_spec(kind)["file"]] = {
                "model": kind,
                "dtype": floats[0],
                "config": json.loads(json.dumps(config)),
                "tensors": [[e.name, st_dtype(e.dtype), list(e.shape)] for e in entries],
            }
    return out


def snapshot() -> dict:
    from converters import schema

    return {"schema_version": schema.schema_version(), "files": json.loads(json.dumps(planned()))}  # a fresh copy


def dumps(snap: dict) -> str:
    """One tensor per line: a diff shows which tensor changed."""
    parts = []
    for name, s in sorted(snap["files"].items()):
        tensors = ",\n".join(json.dumps(t) for t in s["tensors"])
        parts.append(f"{json.dumps(name)}: {{\"model\": {json.dumps(s['model'])}, \"dtype\": {json.dumps(s['dtype'])}, "
                     f"\"config\": {json.dumps(s['config'], sort_keys=True)}, \"tensors\": [\n{tensors}\n]}}")
    return "{\"schema_version\": " + json.dumps(snap["schema_version"]) + ", \"files\": {\n" + ",\n".join(parts) + "\n}}\n"


def load() -> dict:
    with open(SNAPSHOT) as f:
        return json.load(f)


def tensors_changed(old: dict, new: dict) -> list[str]:
    """Files whose tensors (names, dtypes, shapes) differ between two snapshots."""
    names = sorted(set(old["files"]) | set(new["files"]))
    return [n for n in names if (old["files"].get(n) or {}).get("tensors") != (new["files"].get(n) or {}).get("tensors")]


def main() -> None:
    sys.path.insert(0, ROOT)
    new = snapshot()
    if os.path.exists(SNAPSHOT):
        old = load()
        changed = tensors_changed(old, new)
        from converters.schema import parse_version

        if changed and parse_version(new["schema_version"]) <= parse_version(old.get("schema_version", 0)):
            raise SystemExit(f"the canonical tensors of {', '.join(changed)} changed at the released config, but the schema "
                             f"version is still {new['schema_version']}: bump canonical_schema.json \"version\" first "
                             "(the major for a changed layout, the minor for what older files may lack)")
    with open(SNAPSHOT, "w") as f:
        f.write(dumps(new))
    print(f"wrote {SNAPSHOT}: " + ", ".join(f"{n} ({len(s['tensors'])} tensors)" for n, s in sorted(new["files"].items())))


if __name__ == "__main__":
    main()
