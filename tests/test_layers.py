"""The floor plan of ``converters/`` is enforced: each subpackage's ``__init__``
docstring declares its layer ("Layer N: it may import ``converters.x``, ..."), and
every import in the package, lazy ones included, must go to the same subpackage or one
the importer declares; no import cycle between modules; ``reference/`` imports nothing
of ``converters``.  Imports under ``if TYPE_CHECKING:`` (annotations only) are not
imports at run time and are not counted."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules at the package root, outside the layers: the error type under everything,
# and the ``python -m converters.check`` entry, above everything.
ROOT_MODULES = {"errors": set(), "check": {"cli"}, "__init__": set()}


def _modules(pkg_dir: str, pkg: str) -> dict[str, str]:
    """dotted module name -> file, for every .py under pkg_dir."""
    out = {}
    for d, _, files in os.walk(pkg_dir):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), pkg_dir)[:-3].replace(os.sep, ".")
                name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
                out[name] = os.path.join(d, f)
    return out


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"


def _imports(name: str, path: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` (at ``path``) imports, lazily or not."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module
                subs = {f"{mod}.{a.name}" for a in child.names} & known  # ``from pkg import module``
                found.update(subs or {mod})
            visit(child)

    visit(tree)
    return {m for m in found if m in known}


def graph(pkg_dir: str, pkg: str) -> dict[str, set[str]]:
    mods = _modules(pkg_dir, pkg)
    return {m: _imports(m, p, set(mods)) - {m} for m, p in mods.items()}


def declared_layers(pkg_dir: str, pkg: str) -> dict[str, tuple[int, set[str]]]:
    """subpackage -> (layer number, the subpackages it may import), from its docstring."""
    out = {}
    for sub in sorted(os.listdir(pkg_dir)):
        init = os.path.join(pkg_dir, sub, "__init__.py")
        if not os.path.isfile(init):
            continue
        with open(init) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        mo = re.search(r"Layer (\d+)\b[^\n]*?may import (.*?)(?:\.\s|\.?$)", doc, re.S)
        assert mo, f"{init}: the docstring does not declare its layer ('Layer N: it may import ...')"
        allowed = set(re.findall(rf"``{pkg}\.(\w+)", mo.group(2)))
        out[sub] = (int(mo.group(1)), allowed)
    return out


def _top(module: str, pkg: str) -> str:
    return module.removeprefix(pkg + ".").split(".")[0] if module != pkg else "__init__"


def violations(pkg_dir: str, pkg: str) -> list[str]:
    layers = declared_layers(pkg_dir, pkg)
    bad = []
    for sub, (n, allowed) in layers.items():
        for a in allowed:
            if a in layers and layers[a][0] >= n:
                bad.append(f"{pkg}.{sub} (layer {n}) declares it may import {pkg}.{a} (layer {layers[a][0]})")
    for mod, deps in graph(pkg_dir, pkg).items():
        src = _top(mod, pkg)
        may = ROOT_MODULES.get(src, layers.get(src, (0, set()))[1] | {"errors"})
        for d in deps:
            dst = _top(d, pkg)
            if dst != src and dst not in may and d != pkg:
                bad.append(f"{mod} imports {d}, which {pkg}.{src} does not declare")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def test_imports_follow_the_declared_layers():
    assert violations(os.path.join(ROOT, "converters"), "converters") == []


def test_no_import_cycle():
    assert cycles(graph(os.path.join(ROOT, "converters"), "converters")) == []


def test_layers_are_declared_in_order():
    layers = declared_layers(os.path.join(ROOT, "converters"), "converters")
    assert sorted(layers, key=lambda s: layers[s][0]) == ["format", "io", "models", "release", "cli"]
    assert not [f for f in os.listdir(os.path.join(ROOT, "converters"))
                if f.endswith(".py") and f[:-3] not in ROOT_MODULES], "a module outside the layers"


def test_reference_is_independent_of_converters():
    ref = os.path.join(ROOT, "reference")
    known = set(_modules(os.path.join(ROOT, "converters"), "converters")) | {"converters"}
    found = {m: sorted(_imports(m, p, known)) for m, p in _modules(ref, "reference").items()}
    assert {m: d for m, d in found.items() if d} == {}


def _package(tmp_path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path / "pkg")


LOW = '"""Layer 1: it may import ``pkg.errors`` only."""\n'
HIGH = '"""Layer 2: it may import ``pkg.errors`` and ``pkg.low``."""\n'


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    d = _package(tmp_path, {"__init__.py": "", "errors.py": "", "low/__init__.py": LOW, "high/__init__.py": HIGH,
                            "low/a.py": "def f():\n    from ..high import b\n",  # lazy, still counted
                            "high/b.py": "from ..low import a\n",
                            "high/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..low import a\n"})
    assert violations(d, "pkg") == ["pkg.low.a imports pkg.high.b, which pkg.low does not declare"]
    assert cycles(graph(d, "pkg")) == [["pkg.high.b", "pkg.low.a"]]


def test_the_checker_catches_a_declaration_against_the_order(tmp_path):
    d = _package(tmp_path, {"__init__.py": "", "low/__init__.py": '"""Layer 1: it may import ``pkg.high``."""\n',
                            "high/__init__.py": HIGH})
    assert violations(d, "pkg") == ["pkg.low (layer 1) declares it may import pkg.high (layer 2)"]


@pytest.mark.parametrize("name", ["check", "errors"])
def test_root_modules_are_the_declared_ones(name):
    assert os.path.isfile(os.path.join(ROOT, "converters", name + ".py"))
