"""`convert.py all`: a whole IndexTTS-2 release into one folder of canonical files.

- Where each source is found: an explicit flag, else the release folder, else the
  Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``; ``models--ORG--NAME/snapshots/REV/``).  Never the
  network.  Each source's location is printed.
- ``OUT/manifest.json`` lists every canonical file (model, sha256, size, schema
  version) with its sources (path as given, size, sha256) and the options used.
- Incremental: an output whose sources, options, converter and schema version are
  unchanged since the manifest was written is skipped; comparing size and mtime is
  enough, and a source whose mtime moved is re-hashed before it counts as changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from . import schema
from .errors import ConvertError
from .hashing import SERVICE as HASHES
from .hashing import sha256_file
from .registry import CHOICES, CONVERTER_VERSION, EXTRA_FILES, locate

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Item:
    kind: str
    out: str  # file name in OUT
    release: str  # file or folder inside the release folder
    hf: tuple[str, str] | None = None  # (repo id, path inside a snapshot) in the HF cache
    flag: str | None = None  # `all` option that names the source explicitly
    release_config: str | None = None  # config file taken from the release folder


# Conversion order: smallest sources first and gpt last.  Each output's header waits for
# its source's sha256 (so the output can be hashed as it streams); the sources are
# hashed in this order from the start, and small models convert meanwhile.
ITEMS: list[Item] = [
    Item("speaker-matrix", "speaker_matrix.safetensors", "feat1.pt"),
    Item("emotion-matrix", "emotion_matrix.safetensors", "feat2.pt"),
    Item("campplus", "campplus.safetensors", "campplus", hf=("funasr/campplus", ""), flag="campplus"),
    Item("semantic-codec", "semantic_codec.safetensors", "MaskGCT/semantic_codec", hf=("amphion/MaskGCT", "semantic_codec"),
         flag="semantic_codec", release_config="config.yaml"),
    Item("bigvgan", "bigvgan.safetensors", "bigvgan", hf=("nvidia/bigvgan_v2_22khz_80band_256x", ""), flag="bigvgan"),
    Item("s2mel", "s2mel.safetensors", "s2mel.pth"),
    Item("w2v-bert", "w2v_bert.safetensors", "w2v-bert-2.0", hf=("facebook/w2v-bert-2.0", ""), flag="w2v_bert"),
    Item("gpt", "gpt.safetensors", "gpt.pth"),
]


# ------------------------------------------------------------------ discovery


def hf_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def hf_snapshot(cache: str, repo: str) -> str | None:
    """The snapshot folder ``refs/main`` points at; the only snapshot if there is no
    ref; an error if several snapshots exist and none is marked."""
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snaps = os.path.join(base, "snapshots")
    if not os.path.isdir(snaps):
        return None
    ref = os.path.join(base, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            rev = f.read().strip()
        if os.path.isdir(os.path.join(snaps, rev)):
            return os.path.join(snaps, rev)
    revs = sorted(os.listdir(snaps))
    if len(revs) == 1:
        return os.path.join(snaps, revs[0])
    if not revs:
        return None
    raise ConvertError(f"{snaps}: several snapshots ({', '.join(revs)}) and no refs/main; name the one to use with a flag")


def find_source(item: Item, release_dir: str, flags: dict[str, str | None]) -> tuple[str, str]:
    """(path, how it was found) for one item."""
    if item.flag and flags.get(item.flag):
        return flags[item.flag], "given on the command line"
    looked = []
    p = os.path.join(release_dir, item.release)
    if os.path.exists(p):
        return p, "in the release folder"
    looked.append(p)
    if item.hf:
        cache = hf_cache_dir()
        snap = hf_snapshot(cache, item.hf[0])
        if snap is not None:
            q = os.path.join(snap, item.hf[1]) if item.hf[1] else snap
            if os.path.exists(q):
                return q, f"in the Hugging Face cache ({item.hf[0]})"
            looked.append(q)
        else:
            looked.append(os.path.join(cache, "models--" + item.hf[0].replace("/", "--")))
    hint = f"; pass --{item.flag.replace('_', '-')}" if item.flag else ""
    raise ConvertError(f"no {item.kind} source found: looked in {', '.join(looked)}{hint}")


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
    from .safetensors_io import AtomicOutput

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


def _inputs(item: Item, src: str, release_dir: str, config: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """({role: path} of every input file, extra options) for one item."""
    from . import engine

    mod = engine.model_module(item.kind)
    extra = _extra(item, release_dir)
    src_file, cfg_file = locate(item.kind, src, config)
    files = {"checkpoint": src_file}
    if cfg_file is not None:  # CAMPPlus has no upstream config file
        files["config"] = cfg_file
    files.update(engine.input_files(mod, src_file, extra))
    return files, extra


def _extra(item: Item, release_dir: str) -> dict[str, str]:
    """Extra source files (registry.EXTRA_FILES), taken from the release folder."""
    return {opt: os.path.join(release_dir, f) for opt, (_, f) in EXTRA_FILES.get(item.kind, {}).items()}


def _hash_ahead(items, release_dir: str, old: dict, out_dir: str, options_of) -> None:
    """Ask for the sha256 of every source that may need converting, in conversion
    order, before torch is imported.  Torch-free and cheap: an output whose manifest
    entry has the same options, an unchanged output file and a checkpoint of the same
    path, size and mtime is left out (the exact up-to-date test comes later)."""
    for item, src, config in items:
        try:
            src_file, cfg_file = locate(item.kind, src, config, need_config=False)
        except ConvertError:
            continue  # reported by the conversion
        entry = old["files"].get(item.out) or {}
        if (entry.get("options") == options_of(item) and _written_unchanged(entry, os.path.join(out_dir, item.out))
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


def convert_all(release_dir: str, out_dir: str, flags: dict[str, str | None], dtype: str, force: bool,
                quiet: bool, allow_nonfinite: bool, echo=print, choices: dict[str, str] | None = None) -> dict:
    """Convert every item; ``choices`` are model options (``profile``) applied to the
    models that take them."""
    choices = choices or {}
    if not os.path.isdir(release_dir):
        raise ConvertError(f"{release_dir}: release folder not found")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConvertError(f"{out_dir}: exists and is not a folder")
    found = []
    for item in ITEMS:  # find every source before converting anything
        src, how = find_source(item, release_dir, flags)
        config = os.path.join(release_dir, item.release_config) if item.release_config else None
        found.append((item, src, config))
        echo(f"{item.kind}: {src} ({how})")
    old = read_manifest(out_dir) or {"files": {}}
    _hash_ahead(found, release_dir, old, out_dir, lambda item: _options(item, dtype, allow_nonfinite, choices)[0])

    from . import engine  # imports torch (about a second, while the hashing runs)

    for item in ITEMS:
        engine.model_module(item.kind)  # a converter that does not exist yet fails before any work
    plan = [(item, src, config, *_inputs(item, src, release_dir, config)) for item, src, config in found]
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"manifest_version": MANIFEST_VERSION, "schema": schema.SCHEMA_NAME, "schema_version": schema.schema_version(),
                "converter_version": CONVERTER_VERSION,
                "options": {"dtype": dtype, "allow_nonfinite": allow_nonfinite, **choices}, "files": {}}
    for item, src, config, files, extra in plan:
        out_path = os.path.join(out_dir, item.out)
        entry = old["files"].get(item.out)
        options, model_opts = _options(item, dtype, allow_nonfinite, choices)
        if up_to_date(entry, files, out_path, options):
            echo(f"up to date: {out_path}")
            manifest["files"][item.out] = entry
            continue
        # Replacing a file this tool wrote (listed in the manifest, unchanged since) needs no --force.
        ours = _written_unchanged(entry, out_path)
        # The output's sha256 is computed while it is written (no second read).
        p, digest = engine.convert(item.kind, src, out_path, config, dtype, force or ours, quiet, allow_nonfinite, extra,
                                   model_opts, hash_output=True)
        src_meta = json.loads(p.metadata["source"])
        digests = {"checkpoint": src_meta["sha256"], **{k: v["sha256"] for k, v in src_meta.get("extra", {}).items()}}
        st = os.stat(out_path)
        manifest["files"][item.out] = {
            "model": item.kind,
            "sha256": digest,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "schema_version": schema.schema_version(),
            "converter_version": CONVERTER_VERSION,
            "options": options,
            "sources": {role: fingerprint(f, digests.get(role)) for role, f in files.items()},
        }
        echo(f"wrote {out_path} ({item.kind}, {len(p.plan.entries)} tensors, {len(p.plan.dropped)} dropped)")
        write_manifest(out_dir, {**manifest, "files": {**old["files"], **manifest["files"]}})
    write_manifest(out_dir, manifest)
    return manifest


def check_manifest(out_dir: str, full_hash: bool = False) -> list[str]:
    """Problems with OUT/manifest.json against the files (headers only, unless
    ``full_hash``, which re-hashes every canonical file)."""
    from . import st_header

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
        try:
            src_sha = json.loads(md.get("source", "{}")).get("sha256")
        except ValueError:
            src_sha = None
        if src_sha != e.get("sources", {}).get("checkpoint", {}).get("sha256"):
            errs.append(f"{where}: {n} was converted from another source than the manifest records")
        if full_hash and sha256_file(p) != e.get("sha256"):
            errs.append(f"{where}: {n} does not match its sha256 in the manifest")
    return errs
