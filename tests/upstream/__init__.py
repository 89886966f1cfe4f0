"""The real upstream model classes, built at tiny sizes, as test oracles.

``indextts2-inference`` is installed with ``--no-deps``; its top-level ``__init__``
imports the whole inference stack, so :func:`indextts` registers an empty package
object with the installed folder as its path and imports only the model modules.
One module here per model builds a tiny upstream instance and saves it in the
release layout; ``scripts/make_demo.py`` uses the same builders.
"""

from __future__ import annotations


def indextts(module: str):
    """Import ``indextts.<module>`` without running ``indextts/__init__.py``
    (:func:`converters.cli.forward.indextts`, which ``verify --forward`` uses too)."""
    from converters.cli.forward import indextts as imp

    return imp(module)
