"""The command line: ``convert.py`` and ``indextts-convert`` (:func:`console`), the
stdlib-only ``check`` (:mod:`.check`), the click commands (:mod:`.commands`),
``verify`` with its upstream adapters (:mod:`.verify`, :mod:`.forward`) and ``golden``
(:mod:`.golden`).

Layer 5, the top: it may import ``converters.errors``, ``converters.format``,
``converters.io``, ``converters.models`` and ``converters.release`` (and the reference
runtime).  Importing this package imports only the standard library.
"""

from __future__ import annotations

import os
import sys

NO_CLICK = ("error: this installation has no click (installed with --no-deps?): only `indextts-convert check` runs with "
            "the standard library alone; install indextts2-convert with its dependencies for the other commands")


def console(argv: list[str] | None = None) -> None:
    """The ``indextts-convert`` console script, and ``convert.py``: ``check`` runs with
    the standard library alone; the other commands (and ``--help``) go to the click
    command line."""
    from .check import _err, run_check

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:
        sys.exit(run_check(argv[1:], prog=f"{os.path.basename(sys.argv[0])} check"))
    try:
        import click  # noqa: F401
    except ImportError:
        _err(NO_CLICK)
        sys.exit(1)
    from .commands import run

    run(argv)
