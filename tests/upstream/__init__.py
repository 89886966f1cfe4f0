"""The real upstream model classes, built at tiny sizes, as test oracles.

``indextts2-inference`` is installed with ``--no-deps``; its top-level ``__init__``
imports the whole inference stack, so :func:`indextts` registers an empty package
object with the installed folder as its path and imports only the model modules.
One module here per model builds a tiny upstream instance and saves it in the
release layout; ``scripts/make_demo.py`` uses the same builders.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def indextts(module: str):
    """Import ``indextts.<module>`` without running ``indextts/__init__.py``."""
    if "indextts" not in sys.modules:
        spec = importlib.util.find_spec("indextts")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("indextts2-inference is not installed (make test installs it)")
        pkg = types.ModuleType("indextts")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["indextts"] = pkg
    return importlib.import_module(f"indextts.{module}")
