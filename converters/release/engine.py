"""The conversion pipeline shared by every model.

source file -> :mod:`sources` (flat view) -> model table -> :func:`table.resolve` (plan,
strict accounting) -> :func:`schema.check` on the planned header -> streaming write ->
:func:`schema.check_file` on what was written.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
from dataclasses import dataclass, field

from ..format import arrays, config_dims, opspec, schema
from ..io import safetensors_io as stio
from ..errors import ConvertError
from ..io.hashing import SERVICE as HASHES
from ..format import family
from ..models.registry import CONVERTER_VERSION, MODELS, locate, module_name
from ..io.sources import CombinedSource, Source, open_source
from ..format.table import Plan, resolve

DTYPE_CHOICES = {"keep": None, "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Set by tests to compute every tensor in torch, as before the numpy path, to show that
# both give the same bytes.
FORCE_TORCH = False


def model_module(kind: str, family_version: str = family.DEFAULT):
    """The converter module of ``kind`` for a release of ``family_version``."""
    if kind not in MODELS:
        raise ConvertError(f"unknown model {kind!r}; known: {', '.join(MODELS)}")
    name = module_name(kind, family_version)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ConvertError(f"the {kind} converter does not exist yet") from None


def check_output_path(out: str, src_file: str, force: bool) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.exists(parent):
        raise ConvertError(f"{out}: output folder {parent} does not exist")
    if not os.path.isdir(parent):
        raise ConvertError(f"{out}: {parent} is not a folder")
    if os.path.isdir(out):
        raise ConvertError(f"{out}: is a folder; give the output file name")
    if os.path.lexists(out):
        if os.path.exists(out) and os.path.samefile(out, src_file):
            raise ConvertError(f"{out}: is the input file (or a link to it); refusing to write over the source")
        if not force:
            raise ConvertError(f"{out}: already exists; pass --force to replace it")
    if os.path.realpath(out) == os.path.realpath(src_file):
        raise ConvertError(f"{out}: is the input file; refusing to write over the source")


def input_files(mod, src_file: str, extra: dict[str, str] | None) -> dict[str, str]:
    """The other upstream files a model is built from, as {prefix: path} (the w2v-bert
    statistics: {"stats/": ...}); empty for single-file models."""
    return mod.extra_sources(src_file, extra or {}) if hasattr(mod, "extra_sources") else {}


def combine(main: Source, extra_files: dict[str, str]) -> Source:
    """The main source, with each extra file's tensors under its prefix (an extra that
    fails to open closes those opened before it)."""
    if not extra_files:
        return main
    opened: dict[str, Source] = {}
    try:
        for p, f in extra_files.items():
            opened[p] = open_source(f)
    except BaseException:
        for s in opened.values():
            s.close()
        raise
    return CombinedSource(main, opened)


@dataclass
class Prepared:
    kind: str
    src: Source
    src_file: str
    plan: Plan
    config: dict
    meta: dict  # the __metadata__, structured: JSON values stay objects until metadata() serialises them
    files: dict[str, str]  # "" for the main source, else the extra source's prefix
    stats: dict[str, tuple] = field(default_factory=dict)  # each input file's (size, mtime_ns, inode) when opened
    family_version: str = family.DEFAULT
    family_why: str = ""  # what the version was told from

    @property
    def source(self) -> dict:
        """The ``source`` record: file name, size, sha256 (a placeholder until
        :func:`write` fills in the digests), and the extra sources under ``extra``."""
        return self.meta["source"]

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` strings, serialised once, with sorted keys."""
        return {k: v if isinstance(v, str) else _dumps(v) for k, v in self.meta.items()}


def source_version(kind: str, src: Source, src_file: str, expected: str | None = None) -> tuple[str, str]:
    """(family version, why) of a checkpoint: its tensors tell gpt and semantic-codec
    apart, the release folder around it the rest (:mod:`family`).  ``expected``: the
    version of the release ``all`` converts; a gpt or codec whose tensors say another
    is refused, and the other models take it."""
    if expected is not None and kind not in family.VERSIONED_KINDS:
        return expected, "the release it was converted with"
    try:
        v, why = family.detect(kind, src.names(), src_file)
    except family.Unsupported as e:
        raise ConvertError(f"{src.path}: {e}") from None
    if expected is not None and v != expected:
        raise ConvertError(f"{src.path}: is an {family.label(v)} {kind} checkpoint ({why}), but the release is "
                           f"{family.label(expected)}; the files do not belong to one release")
    return v, why


def prepare(kind: str, src_path: str, config_path: str | None, dtype: str = "keep", hash_source: bool = True,
            extra: dict[str, str] | None = None, options: dict[str, str] | None = None,
            located: tuple[str, str | None] | None = None, opened: Source | None = None,
            family_version: str | None = None) -> Prepared:
    """Open the sources, tell the release version, plan every output tensor and check
    the plan against the schema; with ``hash_source``, the sources' sha256 are asked for
    (they may already be running: the CLI asks before importing torch).  ``located`` is
    the (checkpoint, config) pair :func:`registry.locate` already found, if the caller
    did; ``opened``, the checkpoint already opened (``inspect``), which the caller
    closes; ``family_version``, the version of the release ``all`` converts."""
    model_module(kind)
    src_file, cfg_file = located or locate(kind, src_path, config_path)
    main = opened or open_source(src_file)
    src = main
    stats = {}
    try:
        _refuse_other_model(kind, main)
        fv, why = source_version(kind, main, src_file, family_version)
        mod = model_module(kind, fv)
        raw = mod.load_config(cfg_file)
        # Options that change the canonical form (registry.CHOICES) go to runtime_config,
        # which records them in the metadata config.
        config = _runtime_config(kind, mod, raw, cfg_file, options, main, src_file, fv, why)
        refuse_config_mismatch(kind, mod, config, main, src_file, cfg_file, fv, why)
        extra_files = input_files(mod, src_file, extra)
        src = combine(main, extra_files)
        stats = {f: file_stat(f) for f in (src_file, *extra_files.values())}
        p = _plan(kind, mod, src, src_file, extra_files, config, dtype, hash_source, fv)
        p.stats = stats
        p.family_why = why
        return p
    except BaseException:
        if opened is None:
            src.close()  # nothing of a refused source stays open (a combined source closes its parts)
        elif src is not main:
            for prefix, part in src.parts.items():
                if prefix:
                    part.close()
        raise


def _told(kind: str, src: Source, why: str) -> str:
    """What tells a checkpoint's release, for messages: its tensors where they tell it."""
    return family.evidence(kind, src.names()) or why


def _runtime_config(kind, mod, raw: dict, cfg_file, options, src: Source, src_file: str, fv: str, why: str) -> dict:
    """``mod.runtime_config``; for the models whose tensors tell the release, a refusal
    also says which release the checkpoint is and what tells it (the other release's
    config: a codec's ``downsample_scale``, a GPT's conditioning sections)."""
    try:
        return mod.runtime_config(raw, cfg_file, **(options or {}))
    except ConvertError as e:
        if kind not in family.VERSIONED_KINDS:
            raise
        what = family.KIND_LABELS.get(kind, kind)
        raise ConvertError(f"{src_file}: is an {family.label(fv)} {what} ({_told(kind, src, why)}), and {cfg_file} "
                           f"does not fit it:\n  {e}") from None


def refuse_config_mismatch(kind: str, mod, config: dict, src: Source, src_file: str, cfg_file: str | None, fv: str,
                           why: str) -> None:
    """The config keys that size the checkpoint's tensors (the module's ``CONFIG_DIMS``)
    against the checkpoint's shapes, before the table and the schema check: a config
    that does not fit is refused by key, with both values and whose release each is."""
    dims = getattr(mod, "CONFIG_DIMS", None)
    if not dims or cfg_file is None:
        return
    found = config_dims.mismatches(dims, config, src.shapes)
    if not found:
        return
    released = {}
    if kind in family.VERSIONED_KINDS:
        released = {v: getattr(model_module(kind, v), "RELEASE_VALUES", {}) for v in family.VERSIONS}
    raise ConvertError(config_dims.message(kind, fv, _told(kind, src, why), src_file, cfg_file, mod.SECTION, found,
                                           released))


def _plan(kind, mod, src: Source, src_file: str, extra_files: dict[str, str], config: dict, dtype: str,
          hash_source: bool, fv: str = family.DEFAULT) -> Prepared:
    files = {"": src_file, **extra_files}
    rows, loops = mod.table(config)
    target = DTYPE_CHOICES[dtype]
    drops = mod.drops(config) if hasattr(mod, "drops") else mod.DROPS
    plan = resolve(src, rows, loops, drops, config, target)
    floats = apply_dtype_policy(kind, plan, config, fv)
    if len(floats) > 1:
        raise ConvertError(f"{src_file}: source mixes float dtypes {floats}; pass --dtype to choose one")
    if hash_source:
        HASHES.prefetch(files.values())
    source = _file_info(src_file)
    if extra_files:
        source["extra"] = {p: _file_info(f) for p, f in extra_files.items()}
    meta = {
        "schema": schema.SCHEMA_NAME,
        "schema_version": str(schema.schema_version()),
        "model": kind,
        "config": config,
        "source": source,
        "converter_version": CONVERTER_VERSION,
        "provenance": plan.provenance(),
        "dropped": plan.dropped,
        "dtype": floats[0] if floats else "F32",
        "family": family.FAMILY,
        "family_version": fv,
    }
    p = Prepared(kind, src, src_file, plan, config, meta, files, family_version=fv)
    tensors = {e.name: (e.dtype, e.shape) for e in plan.entries}
    errs = schema.check(kind, tensors, p.metadata(), src_file)  # the header as it will be written
    if errs:
        raise ConvertError(f"{src_file}: the converted tensors would not match the schema:\n  " + "\n  ".join(errs[:20]))
    return p


def apply_dtype_policy(kind: str, plan: Plan, config: dict, fv: str = family.DEFAULT) -> list[str]:
    """The schema's dtype classes on the planned tensors: 'float32'-class tensors (norm
    affines, running statistics, positional and frequency tables, snake parameters, the
    w2v-bert statistics) become F32 (F64 in a float64 file) whatever the source or
    ``--dtype`` gave them; the rest keep the file's float dtype.  Returns the float
    dtypes of the 'float'-class tensors (one, or the source mixes them)."""
    try:
        classes = schema.dtype_classes(kind, config, fv)
    except Exception:  # noqa: BLE001 - a config that does not fit the schema is reported by schema.check
        classes = {}
    policy = {e.name for e in plan.entries if classes.get(e.name) == "float32"}
    floats = sorted({e.dtype for e in plan.entries if arrays.is_float(e.dtype) and e.name not in policy})
    full = "F64" if floats == ["F64"] else "F32"
    for e in plan.entries:
        if e.name in policy:
            e.dtype = full
    return floats


def file_stat(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def unchanged_sources(p: Prepared) -> None:
    """Refuse (before the output takes its name) if a source changed while it was read:
    a download finishing or an rsync would otherwise leave metadata claiming the hash of
    other bytes, and the next ``all`` would call the output up to date."""
    for f, before in p.stats.items():
        try:
            now = file_stat(f)
        except OSError as e:
            raise ConvertError(f"{f}: disappeared while it was being converted ({e.strerror}); nothing was written") from None
        if now != before:
            raise ConvertError(f"{f}: changed while it was being converted (size, modification time or inode differ); "
                               "the output was discarded: convert again once the file is complete")


def _file_info(path: str) -> dict:
    # sha256 is a placeholder of the final length; write() fills it in at the end.
    return {"file": os.path.basename(path), "size": os.path.getsize(path), "sha256": "0" * 64}


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _refuse_other_model(kind: str, src: Source) -> None:
    from ..format.detect import detect

    seen = detect(src.names())
    if seen is not None and seen != kind:
        raise ConvertError(f"{src.path}: looks like a {seen} checkpoint, not {kind}; use `convert.py {seen}`")


@contextlib.contextmanager
def no_gc():
    """The cyclic garbage collector paused: planning and writing create many small
    objects and no cycles worth collecting, and its passes cost about 0.3 s of a
    4 s gpt conversion here.  Tensors are freed by reference counting meanwhile."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def convert(kind: str, src_path: str, out_path: str, config_path: str | None = None, dtype: str = "keep",
            force: bool = False, quiet: bool = False, allow_nonfinite: bool = False,
            extra: dict[str, str] | None = None, options: dict[str, str] | None = None,
            hash_output: bool = False, located: tuple[str, str | None] | None = None,
            family_version: str | None = None) -> tuple[Prepared, str | None]:
    """Convert one model.  Returns the plan and, with ``hash_output``, the output's
    sha256 (computed while writing: the header then waits for the source hashes).
    ``located``: the (checkpoint, config) the caller already found with ``locate``;
    ``family_version``: the release version (``all``), else told from the source."""
    located = located or locate(kind, src_path, config_path)  # once per model
    check_output_path(out_path, located[0], force)
    with no_gc():
        p = prepare(kind, src_path, config_path, dtype, extra=extra, options=options, located=located,
                    family_version=family_version)
        for f in p.files.values():
            if os.path.exists(out_path) and os.path.samefile(out_path, f):
                raise ConvertError(f"{out_path}: is an input file (or a link to it); refusing to write over a source")
        try:
            digest = write(p, out_path, quiet, allow_nonfinite, hash_output)
        finally:
            p.src.close()
    _, errs = schema.check_file(out_path)
    if errs:
        raise ConvertError(f"{out_path}: written file fails the schema check (converter bug):\n  " + "\n  ".join(errs[:20]))
    return p, digest


def in_torch(p: Prepared) -> list[str]:
    """The planned tensors computed in torch: regenerated ones, and those whose op chain
    or cast numpy does not reproduce byte for byte (:func:`arrays.numpy_capable`).  The
    rest are produced with numpy, and when this is empty torch is never imported."""
    out = []
    for e in p.plan.entries:
        src = [p.src.dtypes[s] for s in e.sources]
        if FORCE_TORCH or e.regenerate is not None or len(src) != 1 \
                or not arrays.numpy_capable(opspec.parse(e.op), src, e.dtype):
            out.append(e.name)
    return out


def write(p: Prepared, out_path: str, quiet: bool, allow_nonfinite: bool, hash_output: bool = False) -> str | None:
    """Stream the planned tensors to ``out_path``.  The source digests go into the
    header: patched in at the end (the hash runs meanwhile), or, with ``hash_output``,
    awaited before the header is written so the output can be hashed as it streams."""
    from tqdm import tqdm

    torch_names = set(in_torch(p))
    torch = None
    if torch_names:
        import torch

        from ..format import ops
        from reference.load import DTYPES as TORCH_DTYPES

    def producer(e):
        def produce():
            if e.regenerate is not None:
                return e.regenerate(p.config).to(TORCH_DTYPES[e.dtype])
            xs = [p.src.get(s) for s in e.sources]
            src = [p.src.dtypes[s] for s in e.sources]
            if e.name not in torch_names:
                return arrays.apply_numpy(opspec.parse(e.op), xs[0], src[0], e.dtype)
            try:
                t = ops.apply(e.op, [arrays.to_torch(x, d) for x, d in zip(xs, src)])
            except opspec.OpError as err:
                raise ConvertError(f"{p.src_file}: {', '.join(e.sources)} -> {e.name}: {err}") from None
            return t.to(TORCH_DTYPES[e.dtype])
        return produce

    def checker(e):
        # NaN/Inf are looked for in the output values, piece by piece as they are staged
        # (contiguous and in the CPU cache there: cheaper than a pass over the source).
        if allow_nonfinite or not arrays.is_float(e.dtype):
            return None
        cast = bool(e.sources) and p.src.dtypes[e.sources[-1]] != e.dtype

        def check(staged) -> None:
            if not arrays.all_finite(staged, e.dtype):
                how = f" after the cast to {e.dtype}" if cast else ""
                raise ConvertError(f"{p.src_file}: tensor {', '.join(e.sources) or e.name} has NaN or Inf values{how} "
                                   f"(-> {e.name}); pass --allow-nonfinite to convert anyway")
        return check

    outs = [stio.OutTensor(e.name, e.dtype, e.shape, producer(e), checker(e)) for e in p.plan.entries]
    total = sum(o.nbytes for o in outs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{p.kind} -> {os.path.basename(out_path)}",
               disable=True if quiet else None, leave=False)  # None: off when stderr is not a terminal

    def final_meta() -> dict[str, str]:
        info = p.source
        for prefix, f in p.files.items():
            try:
                digest = HASHES.digest(f)
            except OSError as e:
                raise ConvertError(f"{f}: cannot read while hashing: {e.strerror or e}") from None
            (info if prefix == "" else info["extra"][prefix])["sha256"] = digest
        return p.metadata()

    # The writer's copy threads (and the hashing child) are the parallelism here; torch's
    # own intra-op threads would only multiply them (measured: single-threaded sums and
    # transposes were faster on 2 cores), so each op runs on one thread.
    threads = None
    if torch is not None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    try:
        check = lambda: unchanged_sources(p)  # noqa: E731
        if hash_output:
            return stio.write_stream(out_path, outs, final_meta(), bar.update, hash_output=True, before_commit=check)
        stio.write_stream(out_path, outs, p.metadata(), bar.update, final_meta, before_commit=check)
        return None
    except OSError as e:
        raise ConvertError(f"{out_path}: write failed: {e.strerror or e}; nothing was written there") from None
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        bar.close()
