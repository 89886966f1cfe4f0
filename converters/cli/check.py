"""``check`` with the standard library alone.

    indextts-convert check PATH... [--hash] [--schema-version X]
    python -m converters.check PATH... [--hash] [--schema-version X]

Everything ``check`` reads (:mod:`..format.schema`, :mod:`..format.st_header` and ``reference.header``,
:mod:`..release.release`'s manifest and cross-file checks, :mod:`.golden`'s check) imports only
the standard library at import time, so a runtime's CI can install this package with
``pip install --no-deps`` (no torch, numpy, safetensors, click, tqdm or PyYAML) and
run it.  The click command line (:mod:`.commands`) runs the same :func:`check_paths`;
:func:`converters.cli.console` parses ``check`` here, before click is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConvertError


PIN_HELP = ("The schema version the runtime supports: '2' accepts any 2.x this checker knows, '2.1' accepts "
            "2.0 and 2.1 (files of a newer minor or another major are refused).")


def _out(msg: str) -> None:
    print(msg, flush=True)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_paths(paths, full_hash: bool = False, pin: str | None = None, echo=_out, echo_err=_err) -> int:
    """Check canonical files and folders (with their manifest.json, cross-file rules and
    golden files).  Prints ``ok ...`` per good file and ``error: ...`` per problem;
    returns the exit code (0 only if everything passed).  A path that does not exist,
    or a bad ``pin``, raises :class:`ConvertError`."""
    from ..format import family, schema
    from ..io.files import file_kind, not_regular
    from . import golden

    if pin is not None:
        schema.check_pin(pin)
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".safetensors"))
            if not found:
                raise ConvertError(f"{p}: no .safetensors files in this folder")
            files += found
        elif os.path.exists(p):
            files.append(p)
        else:
            raise ConvertError(f"{p}: no such file or folder")
    bad = 0
    from ..release.release import check_manifest, cross_file_problems

    for p in paths:
        if os.path.isdir(p):
            errs = check_manifest(p, full_hash) + cross_file_problems(p)
            for e in errs:
                echo_err(f"error: {e}")
            bad += bool(errs)
            gdir = os.path.join(p, golden.FOLDER)
            if os.path.isdir(gdir):
                files += golden.canonical_files(gdir)
    for f in files:
        if file_kind(f) != "file":  # a FIFO, a device or a socket is refused without opening it
            echo_err(f"error: {not_regular(f, expected='a canonical .safetensors file')}")
            bad += 1
            continue
        md = _metadata(f)
        if golden.is_golden(md):
            errs = golden.check_golden(f, full_hash)
            ok = f"ok {f} (golden activations for {os.path.basename(f)})"
        elif golden.is_pipeline_trace(md):
            errs = golden.check_pipeline_trace(f)
            ok = f"ok {f} (end-to-end pipeline trace)"
        else:
            kind, errs = schema.check_file(f, pin)
            ok = f"ok {f} ({kind}, schema v{md.get('schema_version')}): {family.label(family.file_version(md))}"
        if errs:
            bad += 1
            for e in errs:
                echo_err(f"error: {e}")
        else:
            echo(ok)
    return 1 if bad else 0


def _metadata(path: str) -> dict:
    from ..format import st_header

    try:
        return st_header.read_header(path).metadata
    except ConvertError:
        return {}  # reported by the schema check


def parser(prog: str = "indextts-convert check") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Check canonical files (or folders of them, with their manifest.json, cross-file rules and golden "
                    "files) against canonical_schema.json.  Reads headers only, unless --hash.  Standard library only.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--hash", dest="full_hash", action="store_true",
                   help="Also re-hash files against a folder's manifest.json.")
    p.add_argument("--schema-version", dest="pin", default=None, metavar="X",
                   help=PIN_HELP)
    p.add_argument("--debug", action="store_true", help="Show a traceback on failure.")
    return p


def run_check(argv: list[str], prog: str = "indextts-convert check") -> int:
    """Parse ``check``'s arguments and run it: the exit code.  Failures are one
    ``error:`` line, as the click command line prints them (unless --debug)."""
    args = parser(prog).parse_args(argv)
    try:
        return check_paths(args.paths, args.full_hash, args.pin)
    except ConvertError as e:
        if args.debug:
            raise
        _err(f"error: {e}")
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        _err("error: interrupted; check writes nothing")
        return 130
    except OSError as e:
        if args.debug:
            raise
        _err(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except Exception as e:  # noqa: BLE001 - a tool for users: no tracebacks by default
        if args.debug:
            raise
        _err(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)")
        return 2


def main(argv: list[str] | None = None) -> None:
    """``python -m converters.check PATH...``."""
    sys.exit(run_check(sys.argv[1:] if argv is None else argv, prog="python -m converters.check"))


if __name__ == "__main__":
    main()
