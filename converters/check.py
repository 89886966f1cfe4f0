"""``python -m converters.check PATH... [--hash] [--schema-version X]``: the stdlib-only
checker, kept at this name for runtimes' CI scripts; it lives in :mod:`converters.cli.check`."""

from .cli.check import check_paths, main, run_check  # noqa: F401

if __name__ == "__main__":
    main()
