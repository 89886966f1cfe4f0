#!/usr/bin/env python3
"""Set one model's section of canonical_schema.json from a JSON file, under a lock.

    python scripts/schema_section.py MODEL SECTION.json

Writes the schema in its house format (one tensor entry per line).  Raise the schema
"version" ("MAJOR.MINOR") by hand: the major when a change alters an existing layout,
the minor for an addition older files may lack (README, "Schema versions").
"""

import fcntl
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(ROOT, "canonical_schema.json")


def fmt(obj, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(obj, dict) and not ({"name", "shape"} <= set(obj)):
        if not obj:
            return "{}"
        items = [f'{pad}  {json.dumps(k)}: {fmt(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(x, dict) for x in obj):
        items = [f"{pad}  {fmt(x, indent + 1)}" for x in obj]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(obj)


def main() -> None:
    model, section_file = sys.argv[1], sys.argv[2]
    with open(section_file) as f:
        section = json.load(f)
    with open(SCHEMA + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(SCHEMA) as f:
            schema = json.load(f)
        schema["models"][model] = section
        tmp = SCHEMA + ".tmp"
        with open(tmp, "w") as f:
            f.write(fmt(schema) + "\n")
        os.replace(tmp, SCHEMA)
    os.unlink(SCHEMA + ".lock") if os.path.exists(SCHEMA + ".lock") else None


if __name__ == "__main__":
    main()
