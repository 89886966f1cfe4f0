"""Command line: ``python convert.py {all,<model>,check,inspect,verify,golden}``."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from ..models import registry
from ..format import schema
from ..errors import ConvertError
from .check import PIN_HELP

# Only torch-free modules are imported here; the converters (and torch) load when a
# command that converts runs, so `--help`, `check` and `inspect` of a canonical file
# start in a fraction of a second (tests/test_package.py checks all three).
DTYPE = click.Choice(list(registry.DTYPE_NAMES))

def _fail(msg: str, code: int = 1):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def guarded(fn):
    """Turn every failure into one ``error:`` line and a non-zero exit, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConvertError as e:
            if debug:
                raise
            _fail(str(e))
        except BrokenPipeError:
            sys.exit(1)
        except ModuleNotFoundError as e:
            if debug:
                raise
            _fail(f"no module named {e.name!r}: this command needs the converter's dependencies (torch, safetensors, numpy, "
                  "PyYAML, tqdm); install indextts2-convert with them (without --no-deps). `check` needs none of them")
        except KeyboardInterrupt:
            if debug:
                raise
            _fail("interrupted; the file being written was discarded (files finished before it, and for `all` "
                  "their manifest entries, are kept)", 130)
        except OSError as e:
            if debug:
                raise
            _fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
        except Exception as e:  # noqa: BLE001 - a tool for users: no tracebacks by default
            if debug:
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)", 2)

    wrapper = click.option("--debug", is_flag=True, help="Show a traceback on failure.")(wrapper)
    return wrapper


def convert_options(fn):
    fn = click.option("--dtype", type=DTYPE, default="keep", show_default=True, help="Float dtype of the output.")(fn)
    fn = click.option("--force", is_flag=True, help="Replace an existing output file.")(fn)
    fn = click.option("--quiet", is_flag=True, help="No progress bars.")(fn)
    fn = click.option("--allow-nonfinite", is_flag=True, help="Convert weights containing NaN or Inf instead of refusing.")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Convert IndexTTS-2 checkpoints into canonical, schema-checked safetensors."""


def _engine():
    import gc

    gc.disable()  # importing torch makes ~10^5 objects and no garbage: no collections meanwhile
    try:
        from ..release import engine
    finally:
        gc.enable()
    return engine


def run(argv: list[str] | None = None) -> None:
    """The command-line entry point: run the command, then leave without the
    interpreter's teardown, which costs about 0.25 s once torch is loaded.  Every
    output is committed (fsynced and renamed into place) before a command returns."""
    try:
        main(args=argv, standalone_mode=True)
        code = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    from ..io.hashing import shutdown

    shutdown()
    os._exit(code)


def _hash_ahead(kind: str, src: str, config: str | None, extra: dict[str, str]) -> None:
    """Start hashing the sources before torch is imported (about 1.3 s here), on the
    otherwise idle core.  Path problems are left for the conversion to report."""
    from ..io.hashing import SERVICE

    try:
        src_file, _ = registry.locate(kind, src, config, need_config=False)
    except ConvertError:
        return
    SERVICE.prefetch([src_file, *extra.values()])


def _model_command(kind: str):
    files = registry.EXTRA_FILES.get(kind, {})
    choices = registry.CHOICES.get(kind, {})

    def cmd(src, out_file, config, dtype, force, quiet, allow_nonfinite, **more):
        extra = {k: v for k, v in more.items() if k in files and v is not None}
        options = {k: v for k, v in more.items() if k in choices}
        _hash_ahead(kind, src, config, extra)
        p, _ = _engine().convert(kind, src, out_file, config, dtype, force, quiet, allow_nonfinite, extra, options)
        if not quiet:
            click.echo(f"wrote {out_file} ({kind}, {len(p.plan.entries)} tensors, {len(p.plan.dropped)} dropped)")

    cmd = guarded(cmd)
    cmd = convert_options(cmd)
    cmd = choice_options(cmd, choices)
    for name, (help_text, _) in files.items():
        cmd = click.option(f"--{name}", name, type=click.Path(), default=None, help=help_text)(cmd)
    cmd = click.option("--config", type=click.Path(), default=None, help="Config file (default: the one beside the source).")(cmd)
    cmd = click.argument("out_file", type=click.Path())(cmd)
    cmd = click.argument("src", type=click.Path())(cmd)
    return main.command(kind, help=f"Convert one {kind} checkpoint (file or folder) to a canonical file.")(cmd)


def choice_options(cmd, choices: dict):
    for name, (values, default, help_text) in choices.items():
        cmd = click.option(f"--{name}", name, type=click.Choice(list(values)), default=default, show_default=True,
                           help=help_text)(cmd)
    return cmd


for _kind in registry.MODELS:
    _model_command(_kind)


def _all_command():
    from ..release.discovery import ITEMS, VOCODER

    all_choices = {name: spec for kind in registry.CHOICES for name, spec in registry.CHOICES[kind].items()}

    def cmd(src, out, dtype, force, quiet, allow_nonfinite, **more):
        """Convert every model of a release folder into OUT, with OUT/manifest.json.

        Sources not named by a flag are looked for in the release folder, then in the
        Hugging Face cache.  Outputs whose sources and options are unchanged since the
        last run are skipped."""
        from ..release.release import convert_all

        choices = {k: v for k, v in more.items() if k in all_choices}
        flags = {k: v for k, v in more.items() if k not in all_choices}
        convert_all(src, out, flags, dtype, force, quiet, allow_nonfinite, echo=click.echo, choices=choices)

    cmd = guarded(cmd)
    cmd = convert_options(cmd)
    cmd = choice_options(cmd, {k: (v, d, f"({'/'.join(kind for kind in registry.CHOICES if k in registry.CHOICES[kind])}) {h}")
                               for k, (v, d, h) in all_choices.items()})
    for item in reversed([i for i in ITEMS if i.flag]):
        repo = "the vocoder SRC/config.yaml names" if item.hf and item.hf[0] == VOCODER else (item.hf[0] if item.hf else "")
        where = f"SRC/{item.release}" + (f", else the Hugging Face cache ({repo})" if item.hf else "")
        cmd = click.option(f"--{item.flag.replace('_', '-')}", item.flag, type=click.Path(), default=None,
                           help=f"{item.kind} source (default: {where}).")(cmd)
    cmd = click.option("--out", "out", required=True, type=click.Path(), help="Folder for the canonical files.")(cmd)
    cmd = click.option("--src", "src", required=True, type=click.Path(), help="The IndexTTS-2 release folder.")(cmd)
    return main.command("all")(cmd)


_all_command()


@main.command("verify")
@click.argument("src", type=click.Path())
@click.argument("out_file", type=click.Path())
@click.option("--stats", type=click.Path(), default=None, help="w2v-bert statistics file, if not found beside SRC.")
@click.option("--failures-only", is_flag=True, help="Print only tensors (or outputs) that do not match.")
@click.option("--forward", is_flag=True,
              help="Also run every reference entry point on OUT_FILE against upstream's own module loaded from SRC "
                   "(needs indextts2-inference and transformers).")
@click.option("--config", type=click.Path(), default=None,
              help="With --forward: the config upstream is built from (default: the one beside SRC, as the converter finds it).")
@guarded
def verify_cmd(src, out_file, stats, failures_only, forward, config):
    """Recompute every tensor of OUT_FILE from SRC through its provenance and compare.
    With --forward, also compare the reference forward on OUT_FILE with upstream's."""
    from .verify import verify

    if config and not forward:
        raise ConvertError("--config is only read with --forward (the provenance check uses the config in OUT_FILE)")
    extra = {"stats": stats} if stats else {}
    if forward:  # a missing upstream package is reported before the provenance check runs
        from .forward import import_upstream
        from .verify import canonical_kind

        from ..format.family import file_version

        kind, header = canonical_kind(out_file)
        import_upstream(kind, file_version(header.metadata))

    def show(r):
        if not failures_only or not r.ok:
            click.echo(f"{'ok ' if r.ok else 'MISMATCH'} {r.name} max_abs_diff={r.max_abs_diff:.3g} (tolerance {r.tolerance:.3g}) {r.note}")

    rows = verify(src, out_file, extra, on_row=show)
    bad = [r for r in rows if not r.ok]
    if bad:
        raise ConvertError(f"{out_file}: {len(bad)} of {len(rows)} tensors do not match their recomputation from {src}")
    click.echo(f"verified {out_file}: all {len(rows)} tensors match their recomputation from the source")
    if forward:
        _verify_forward(src, out_file, extra, config, failures_only)


def _verify_forward(src, out_file, extra, config, failures_only):
    from .forward import verify_forward

    def show(r):
        if not failures_only or not r.ok:
            click.echo(f"{'ok ' if r.ok else 'MISMATCH'} forward {r.entry}.{r.output} max_abs_diff={r.max_abs_diff:.3g} "
                       f"max_abs={r.max_abs:.3g} (tolerance {r.tolerance:.3g}){' ' + r.note if r.note else ''}")

    rows = verify_forward(src, out_file, extra, config, on_row=show, echo=click.echo)
    bad = [r for r in rows if not r.ok]
    if bad:
        raise ConvertError(f"{out_file}: the reference forward differs from upstream's in "
                           f"{', '.join(f'{r.entry}.{r.output}' for r in bad)}")
    click.echo(f"forward-verified {out_file}: {len(rows)} outputs of {len({r.entry for r in rows})} entry points "
               "match upstream's module loaded from the source")


@main.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--hash", "full_hash", is_flag=True, help="Also re-hash files against a folder's manifest.json.")
@click.option("--schema-version", "pin", default=None, metavar="X",
              help=PIN_HELP)
@guarded
def check_cmd(paths, full_hash, pin):
    """Check canonical files (or folders of them, with their manifest.json) against
    canonical_schema.json.  Reads headers only, unless --hash.  Runs with the standard
    library alone (converters/cli/check.py, which `indextts-convert check` runs without click)."""
    from .check import check_paths

    code = check_paths(paths, full_hash, pin, echo=click.echo, echo_err=lambda m: click.echo(m, err=True))
    if code:
        sys.exit(code)


@main.command("golden")
@click.argument("out_dir", type=click.Path())
@click.option("--models", "models", multiple=True, type=click.Choice(list(registry.MODELS)),
              help="Only these models (repeatable; default: every canonical file in OUT_DIR).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated inputs.")
@guarded
def golden_cmd(out_dir, models, seed):
    """Write OUT_DIR/golden/<file> for each canonical file: seeded inputs, the reference
    runtime's outputs and every layer's activations, for ports to compare against."""
    from .golden import write_golden

    write_golden(out_dir, tuple(models), seed, echo=click.echo)


@main.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--config", type=click.Path(), default=None, help="Config for a source file (default: beside it).")
@guarded
def inspect_cmd(path, config):
    """Describe a source or canonical file: model, tensors, what each becomes."""
    from ..format import st_header

    if os.path.isfile(path):  # a canonical file is described from its header, without importing torch
        try:
            header = st_header.read_header(path)
        except ConvertError:
            header = None  # a source (or a damaged file): the reader below says which
        if header is not None and header.metadata.get("schema") == schema.SCHEMA_NAME:
            _inspect_canonical(path, header)
            return
    from ..format import arrays
    from ..format.detect import detect
    from ..io.sources import open_source

    engine = _engine()
    file = path
    kind = None
    if os.path.isdir(path):
        for k in registry.MODELS:
            if any(os.path.isfile(os.path.join(path, n)) for n in registry.SOURCE_FILES[k]):
                kind = k
                break
        if kind is None:
            raise ConvertError(f"{path}: no known checkpoint in this folder")
        file, _ = registry.locate(kind, path, config)
    with open_source(file) as src:  # opened once: prepare plans from this source
        kind = detect(src.names()) or kind
        click.echo(f"{file}: {src.format} source, {len(src.shapes)} tensors, looks like: {kind or 'unknown model'}")
        for n in src.notes:
            click.echo(f"  note: {n}")
        if kind is None:
            for n in src.names():
                click.echo(f"  {n} {list(src.shapes[n])} {arrays.name(src.dtypes[n])}")
            return
        try:
            p = engine.prepare(kind, file, config, hash_source=False, opened=src)
        except ConvertError as e:
            for n in src.names():
                click.echo(f"  {n} {list(src.shapes[n])} {arrays.name(src.dtypes[n])}")
            raise ConvertError(f"cannot convert as {kind}: {e}") from None
        try:
            from ..format.family import label

            click.echo(f"  release: {label(p.family_version)} (from {p.family_why})")
            click.echo(f"  becomes {len(p.plan.entries)} canonical tensors; {len(p.plan.dropped)} source entries dropped")
            for e in sorted(p.plan.entries, key=lambda e: e.name):
                click.echo(f"  {', '.join(e.sources) or '(regenerated)'} --{e.op}--> {e.name} {list(e.shape)}")
            for n, why in p.plan.dropped.items():
                click.echo(f"  dropped {n}: {why}")
            for n in p.plan.notes:
                click.echo(f"  note: {n}")
        finally:
            p.src.close()  # its extra sources too (the main one is closed by the with)


def _inspect_canonical(path, header):
    md = header.metadata
    prov = json.loads(md.get("provenance", "{}"))
    from ..format.family import file_version, label

    click.echo(f"{path}: canonical {md.get('model')} file, {label(file_version(md))}, schema v{md.get('schema_version')}, "
               f"dtype {md.get('dtype')}, converter {md.get('converter_version')}")
    click.echo(f"  source: {md.get('source')}")
    click.echo(f"  config: {md.get('config')}")
    for n, info in sorted(header.tensors.items()):
        p = prov.get(n, {})
        click.echo(f"  {n} {list(info.shape)} {info.dtype}  <- {p.get('op', '?')}({', '.join(p.get('from', [])) or 'regenerated'})")
    for n, why in json.loads(md.get("dropped", "{}")).items():
        click.echo(f"  dropped {n}: {why}")
    kind, errs = schema.check_file(path)
    click.echo("  schema check: ok" if not errs else "  schema check: FAILED\n    " + "\n    ".join(errs))
