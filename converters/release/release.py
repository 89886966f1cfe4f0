"""`convert.py all`: a whole IndexTTS-2 release into one folder of canonical files.

- Where each source is found (flags, the release folder, the Hugging Face cache) and
  the vocoder checks: :mod:`discovery`.  Each source's location is printed.
- ``OUT/manifest.json`` lists every canonical file (model, sha256, size, schema
  version) with its sources (path as given, size, sha256) and the options used.
- Incremental: an output whose sources, options, converter and schema version are
  unchanged since the manifest was written is skipped; comparing size and mtime is
  enough, and a source whose mtime moved is re-hashed before it counts as changed.
- The files must belong together (:func:`pipeline.cross_file_problems` on the planned
  configs) before anything is converted.
- The tokenizer and the emotion classifier are copied in unconverted (:mod:`bundle`),
  and ``manifest.json`` gets the pipeline contract (:mod:`pipeline`).
"""

from __future__ import annotations

import json
import os

from . import bundle, pipeline
from ..format import family, schema
from .discovery import ITEMS_BY_VERSION, UNUSED_2_5, Item, discover, release_version
from ..errors import ConvertError
from ..io.hashing import SERVICE as HASHES
from ..io.hashing import sha256_file
from ..models.registry import CHOICES, CONVERTER_VERSION, EXTRA_FILES, converter_fingerprint, locate

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
# ------------------------------------------------------------------ manifest


def fingerprint(path: str, digest: str | None = None) -> dict:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest or HASHES.digest(path)}


def read_manifest(out_dir: str) -> dict | None:
    p = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{p}: unreadable manifest ({e}); delete it to start over") from None
    if not isinstance(m, dict) or m.get("manifest_version") != MANIFEST_VERSION or not isinstance(m.get("files"), dict):
        raise ConvertError(f"{p}: not a manifest this tool wrote (manifest_version {MANIFEST_VERSION})")
    return m


def write_manifest(out_dir: str, manifest: dict) -> None:
    from ..io.safetensors_io import AtomicOutput

    with AtomicOutput(os.path.join(out_dir, MANIFEST)) as out:
        out.file.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        out.commit()


def _same_stat(rec: dict, path: str) -> bool:
    """Same path, size and mtime as recorded."""
    if rec.get("path") != path or not os.path.isfile(path):
        return False
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns) == (rec.get("size"), rec.get("mtime_ns"))


def _same_file(rec: dict, path: str) -> bool:
    """Cheap: same path, size and mtime; else, at the same path and size, compare hashes."""
    if _same_stat(rec, path):
        return True
    if rec.get("path") != path or not os.path.isfile(path) or os.path.getsize(path) != rec.get("size"):
        return False
    return HASHES.digest(path) == rec.get("sha256")


def _fingerprint(kind: str, version: str) -> str:
    return converter_fingerprint(kind) if version == family.DEFAULT else converter_fingerprint(kind, version)


def _inputs(item: Item, located: tuple[str, str | None], release_dir: str,
            version: str = family.DEFAULT) -> tuple[dict[str, str], dict[str, str]]:
    """({role: path} of every input file, extra options) for one item."""
    from . import engine

    mod = engine.model_module(item.kind, version)
    extra = _extra(item, release_dir)
    src_file, cfg_file = located
    files = {"checkpoint": src_file}
    if cfg_file is not None:  # CAMPPlus has no upstream config file
        files["config"] = cfg_file
    files.update(engine.input_files(mod, src_file, extra))
    return files, extra


def _extra(item: Item, release_dir: str) -> dict[str, str]:
    """Extra source files (registry.EXTRA_FILES), taken from the release folder."""
    return {opt: os.path.join(release_dir, f) for opt, (_, f) in EXTRA_FILES.get(item.kind, {}).items()}


def _hash_ahead(items, release_dir: str, old: dict, out_dir: str, options_of, version: str = family.DEFAULT) -> None:
    """Ask for the sha256 of every source that may need converting, in conversion
    order, before torch is imported.  Torch-free and cheap: an output whose manifest
    entry has the same options, an unchanged output file and a checkpoint of the same
    path, size and mtime is left out (the exact up-to-date test comes later)."""
    for item, (src_file, cfg_file) in items:
        entry = old["files"].get(item.out) or {}
        if (entry.get("options") == options_of(item) and entry.get("fingerprint") == _fingerprint(item.kind, version)
                and _written_unchanged(entry, os.path.join(out_dir, item.out))
                and _same_stat(entry.get("sources", {}).get("checkpoint", {}), src_file)):
            continue
        HASHES.prefetch([src_file, cfg_file, *_extra(item, release_dir).values()])


def _written_unchanged(entry: dict | None, out_path: str) -> bool:
    """The output is the file this tool wrote: the manifest's size and mtime."""
    if entry is None or not os.path.isfile(out_path):
        return False
    st = os.stat(out_path)
    return (st.st_size, st.st_mtime_ns) == (entry.get("size"), entry.get("mtime_ns"))


def up_to_date(entry: dict | None, files: dict[str, str], out_path: str, options: dict) -> bool:
    if not entry or entry.get("options") != options or entry.get("converter_version") != CONVERTER_VERSION:
        return False
    if entry.get("fingerprint") != _fingerprint(entry.get("model", ""), entry.get("family_version", family.DEFAULT)):
        return False  # the converter, its ops or its schema section changed since
    if entry.get("schema_version") != schema.schema_version():
        return False
    if not _written_unchanged(entry, out_path):
        return False
    recs = entry.get("sources", {})
    return set(recs) == set(files) and all(_same_file(recs[r], p) for r, p in files.items())


def _options(item: Item, dtype: str, allow_nonfinite: bool, choices: dict[str, str]) -> tuple[dict, dict]:
    """(the options recorded in the manifest, the model options passed to the converter)."""
    model_opts = {k: v for k, v in choices.items() if k in CHOICES.get(item.kind, {})}
    return {"dtype": dtype, "allow_nonfinite": allow_nonfinite, **model_opts}, model_opts


def planned_configs(plan, version: str = family.DEFAULT) -> dict[str, dict]:
    """Each item's metadata config, computed from its config file without reading
    tensors (``load_config`` + ``runtime_config``), for the cross-file rules."""
    from . import engine

    out = {}
    for item, src, config, files, extra, model_opts in plan:
        mod = engine.model_module(item.kind, version)
        cfg_file = files.get("config")
        out[item.kind] = mod.runtime_config(mod.load_config(cfg_file), cfg_file, **model_opts)
    return out


def convert_all(release_dir: str, out_dir: str, flags: dict[str, str | None], dtype: str, force: bool,
                quiet: bool, allow_nonfinite: bool, echo=print, choices: dict[str, str] | None = None) -> dict:
    """Convert every item; ``choices`` are model options (``profile``) applied to the
    models that take them."""
    choices = choices or {}
    if not os.path.isdir(release_dir):
        raise ConvertError(f"{release_dir}: release folder not found")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConvertError(f"{out_dir}: exists and is not a folder")
    version, why = release_version(release_dir)
    found, cfg_path, doc = discover(release_dir, flags, version)  # every source, before converting anything
    echo(f"release: {family.label(version)} ({why}; the GPT's and codec's tensors are checked against it; "
         "config.yaml's version key is not read)")
    for item, src, how, _ in found:
        echo(f"{item.kind}: {src} ({how})")
    if version == "2.5":
        for rel in UNUSED_2_5:
            if os.path.exists(os.path.join(release_dir, rel)):
                echo(f"{rel}: not converted (the MaskGCT semantic codec; IndexTTS-2.5 runs {family.CODEC_2_5})")
    copies, absent = bundle.find(release_dir, doc, version)
    for role, why in absent.items():
        echo(f"{role}: absent ({why})")
    found = [(item, src, config) for item, src, _, config in found]
    old = read_manifest(out_dir) or {"files": {}}
    located = {item.kind: locate(item.kind, src, config) for item, src, config in found}  # once per model
    _hash_ahead([(item, located[item.kind]) for item, _, _ in found], release_dir, old, out_dir,
                lambda item: _options(item, dtype, allow_nonfinite, choices)[0], version)
    HASHES.prefetch([os.path.join(release_dir, f) for role, (_, files) in copies.items() for f in files
                     if not _same_stat(((old.get("bundle") or {}).get(role) or {}).get("files", {}).get(f, {}).get("source", {}),
                                       os.path.join(release_dir, f))])

    from . import engine  # imports torch (about a second, while the hashing runs)

    for item in ITEMS_BY_VERSION[version]:
        engine.model_module(item.kind, version)  # a converter that does not exist yet fails before any work
    plan = [(item, src, config, *_inputs(item, located[item.kind], release_dir, version),
             _options(item, dtype, allow_nonfinite, choices)[1])
            for item, src, config in found]
    configs = planned_configs(plan, version)
    names = {item.kind: files["checkpoint"] for item, _, _, files, _, _ in plan}
    problems = pipeline.cross_file_problems(configs, names)
    if problems:
        raise ConvertError(f"{release_dir}: the sources do not belong together, nothing was converted:\n  " + "\n  ".join(problems))
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"manifest_version": MANIFEST_VERSION, "schema": schema.SCHEMA_NAME, "schema_version": schema.schema_version(),
                "converter_version": CONVERTER_VERSION, "family": family.FAMILY, "family_version": version,
                "options": {"dtype": dtype, "allow_nonfinite": allow_nonfinite, **choices}, "files": {}}
    for item, src, config, files, extra, _ in plan:
        out_path = os.path.join(out_dir, item.out)
        entry = old["files"].get(item.out)
        options, model_opts = _options(item, dtype, allow_nonfinite, choices)
        if up_to_date(entry, files, out_path, options) and entry.get("family_version", family.DEFAULT) == version:
            echo(f"up to date: {out_path}")
            manifest["files"][item.out] = entry
            continue
        # Replacing a file this tool wrote (listed in the manifest, unchanged since) needs no --force.
        ours = _written_unchanged(entry, out_path)
        # The output's sha256 is computed while it is written (no second read).
        p, digest = engine.convert(item.kind, src, out_path, config, dtype, force or ours, quiet, allow_nonfinite, extra,
                                   model_opts, hash_output=True, located=located[item.kind], family_version=version)
        digests = {"checkpoint": p.source["sha256"], **{k: v["sha256"] for k, v in p.source.get("extra", {}).items()}}
        st = os.stat(out_path)
        manifest["files"][item.out] = {
            "model": item.kind,
            "sha256": digest,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "schema_version": schema.schema_version(),
            "converter_version": CONVERTER_VERSION,
            "family_version": version,
            "fingerprint": _fingerprint(item.kind, version),
            "options": options,
            "sources": {role: fingerprint(f, digests.get(role)) for role, f in files.items()},
        }
        echo(f"wrote {out_path} ({item.kind}, {family.label(version)}, {len(p.plan.entries)} tensors, {len(p.plan.dropped)} dropped)")
        write_manifest(out_dir, {**old, **manifest, "files": {**old["files"], **manifest["files"]}})
    manifest["bundle"] = copy_bundle(release_dir, out_dir, copies, old.get("bundle", {}), force, echo, version)
    manifest["absent"] = absent
    w2v_src = next(src for item, src, _ in found if item.kind == "w2v-bert")
    w2v_folder = w2v_src if os.path.isdir(w2v_src) else os.path.dirname(os.path.abspath(w2v_src))
    manifest["pipeline"] = pipeline.build(configs, w2v_folder, version)
    write_manifest(out_dir, manifest)
    return manifest


def copy_bundle(release_dir: str, out_dir: str, copies: dict, old: dict, force: bool, echo,
                version: str = family.DEFAULT) -> dict:
    """Hard-link (or copy) the tokenizer and emotion classifier into OUT; their manifest
    entries.  A role whose sources and outputs are unchanged since the manifest is left
    as it is."""
    entries = {}
    for role, (rel, files) in copies.items():
        prev = old.get(role) or {}
        srcs = {f: os.path.join(release_dir, f) for f in files}
        outs = {f: os.path.join(out_dir, f) for f in files}
        same = (prev.get("path") == rel and set(prev.get("files", {})) == set(files)
                and all(_same_file(prev["files"][f]["source"], srcs[f]) and os.path.isfile(outs[f])
                        and os.path.getsize(outs[f]) == prev["files"][f]["size"] for f in files))
        if same:
            entries[role] = prev
            echo(f"up to date: {os.path.join(out_dir, rel)}")
            continue
        for f in files:
            if os.path.lexists(outs[f]) and not force and not (f in prev.get("files", {}) and os.path.isfile(outs[f])):
                raise ConvertError(f"{outs[f]}: already exists and is not in the manifest; pass --force to replace it")
        how = {f: bundle.place(srcs[f], outs[f]) for f in files}
        desc = next(c.description for c in bundle.copied(version) if c.role == role)
        entries[role] = {
            "path": rel,
            "role": desc,
            "files": {f: {"size": os.path.getsize(outs[f]), "sha256": HASHES.digest(srcs[f]), "placed": how[f],
                          "source": fingerprint(srcs[f])} for f in files},
        }
        echo(f"{'linked' if set(how.values()) == {'linked'} else 'copied'} {os.path.join(out_dir, rel)} ({role}, {len(files)} file(s))")
    return entries


def check_manifest(out_dir: str, full_hash: bool = False) -> list[str]:
    """Problems with OUT/manifest.json against the files (headers only, unless
    ``full_hash``, which re-hashes every canonical file)."""
    from ..format import st_header

    m = read_manifest(out_dir)
    if m is None:
        return []
    errs = []
    where = os.path.join(out_dir, MANIFEST)
    listed = set(m["files"])
    present = {n for n in os.listdir(out_dir) if n.endswith(".safetensors")}
    for n in sorted(present - listed):
        errs.append(f"{where}: {n} is in the folder but not in the manifest")
    for n in sorted(listed):
        e = m["files"][n]
        p = os.path.join(out_dir, n)
        if not os.path.isfile(p):
            errs.append(f"{where}: lists {n}, which is missing")
            continue
        if os.path.getsize(p) != e.get("size"):
            errs.append(f"{where}: {n} has {os.path.getsize(p)} bytes, the manifest says {e.get('size')}")
            continue
        try:
            md = st_header.read_header(p).metadata
        except ConvertError as err:
            errs.append(str(err))
            continue
        if md.get("model") != e.get("model"):
            errs.append(f"{where}: {n} holds model {md.get('model')!r}, the manifest says {e.get('model')!r}")
        if md.get("schema_version") != str(e.get("schema_version")):
            errs.append(f"{where}: {n} has schema version {md.get('schema_version')}, the manifest says {e.get('schema_version')}")
        if "family_version" in e and family.file_version(md) != e["family_version"]:
            errs.append(f"{where}: {n} is {family.label(family.file_version(md))}, the manifest says {family.label(e['family_version'])}")
        try:
            src_sha = json.loads(md.get("source", "{}")).get("sha256")
        except ValueError:
            src_sha = None
        if src_sha != e.get("sources", {}).get("checkpoint", {}).get("sha256"):
            errs.append(f"{where}: {n} was converted from another source than the manifest records")
        if full_hash and sha256_file(p) != e.get("sha256"):
            errs.append(f"{where}: {n} does not match its sha256 in the manifest")
    for role, e in (m.get("bundle") or {}).items():
        for f, rec in (e.get("files") or {}).items():
            p = os.path.join(out_dir, f)
            if not os.path.isfile(p):
                errs.append(f"{where}: lists {f} ({role}), which is missing")
            elif os.path.getsize(p) != rec.get("size"):
                errs.append(f"{where}: {f} ({role}) has {os.path.getsize(p)} bytes, the manifest says {rec.get('size')}")
            elif full_hash and sha256_file(p) != rec.get("sha256"):
                errs.append(f"{where}: {f} ({role}) does not match its sha256 in the manifest")
    return errs


def cross_file_problems(out_dir: str) -> list[str]:
    """The pipeline's cross-file rules on the canonical files of a folder (headers only)."""
    from ..format import st_header

    configs, files, versions = {}, {}, {}
    for n in sorted(os.listdir(out_dir)):
        p = os.path.join(out_dir, n)
        if not n.endswith(".safetensors") or not os.path.isfile(p):
            continue
        try:
            md = st_header.read_header(p).metadata
            if md.get("schema") != schema.SCHEMA_NAME or "model" not in md:
                continue
            configs[md["model"]], files[md["model"]] = json.loads(md.get("config", "{}")), p
            versions[md["model"]] = family.file_version(md)
        except (ConvertError, ValueError):
            continue  # reported by the file's own check
    return pipeline.cross_file_problems(configs, files, versions)
