"""The schema checker: ``canonical_schema.json`` against a file's header.

The schema declares, per model kind, the config keys a runtime needs and every
canonical tensor as a name pattern (``ups.{u}.weight``), a symbolic shape and a dtype
class.  Shapes are small expressions over the config in the file's metadata, loop
variables and free symbols (``["ch0 // 2**(u+1)", "num_mels", 7]``).  A bare name that
is neither in the config nor a loop variable is a free symbol: bound by its first use
and required to agree everywhere after, so a fine-tune with other sizes still passes.

The checker reads headers only.  It is used twice: on the plan before a converter
writes anything, and by ``convert.py check`` on finished files.

Versions are "MAJOR.MINOR" (:func:`parse_version`; a file that says "1" is 1.0).  A
major bump is a breaking change (an existing layout changes); a minor bump is
additive (new optional keys, tensors or models).  The checker accepts a file whose
major equals its own and whose minor is not newer than its own, and a runtime may pin
the version it supports (:func:`version_problem`, ``check --schema-version``).
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
from functools import lru_cache

from reference.header import FLOAT_DTYPES  # noqa: F401 (the file-dtype names, one table)

from . import family, opspec, templates
from ..errors import ConvertError

SCHEMA_NAME = "indextts2-canonical"
SCHEMA_FILE = "canonical_schema.json"
REQUIRED_METADATA = ("schema", "schema_version", "model", "config", "source", "converter_version", "provenance", "dropped", "dtype")
# Added in 2.1 (IndexTTS-2.5), written into every file since; a file without them (every
# 2.0 file) is family_version 2.0.
FAMILY_METADATA = ("family", "family_version")


def _schema_path() -> str:
    """The checkout's top-level ``canonical_schema.json`` (the one source of the
    format), else the copy the build put inside the installed ``converters`` package."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), SCHEMA_FILE)
    if os.path.isfile(checkout):
        return checkout
    from importlib import resources

    return str(resources.files("converters").joinpath(SCHEMA_FILE))


SCHEMA_PATH = _schema_path()


@lru_cache(maxsize=1)
def load_schema() -> dict:
    try:
        with open(SCHEMA_PATH) as f:
            return json.load(f)
    except OSError as e:
        raise ConvertError(f"{SCHEMA_PATH}: cannot read the format specification ({e.strerror or e}); a checkout has "
                           f"{SCHEMA_FILE} at its top level, an installed package inside converters/ (reinstall it)") from None


# ------------------------------------------------------------ versions

_VERSION = re.compile(r"(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*))?")


def parse_version(v) -> tuple[int, int]:
    """``"MAJOR.MINOR"`` -> (major, minor).  A bare major (``"1"``, or the int 1 of the
    schema files before 1.1) is MAJOR.0.  ValueError for anything else."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v, 0
    m = _VERSION.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError(f"{v!r} is not a schema version (MAJOR.MINOR, such as 1.1, or a bare MAJOR)")
    return int(m[1]), int(m[2] or 0)


def schema_version() -> str:
    """The version of ``canonical_schema.json``, as "MAJOR.MINOR"; every file written
    records it as its ``schema_version``."""
    major, minor = parse_version(load_schema()["version"])
    return f"{major}.{minor}"


def check_pin(pin: str) -> None:
    """Refuse a ``--schema-version`` this checker cannot check for: another major, or
    not a version at all."""
    try:
        major, _ = parse_version(pin)
    except ValueError as e:
        raise ConvertError(f"--schema-version: {e}") from None
    own = parse_version(schema_version())
    if major != own[0]:
        raise ConvertError(f"--schema-version {pin}: this checker knows schema {schema_version()} and checks "
                           f"{own[0]}.x files only; use a release of indextts-convert for schema {major}.x")


def version_problem(found, pin: str | None = None) -> str | None:
    """Why a file made for schema ``found`` is refused, or None.

    Accepted: the same major as this checker, a minor not newer than its own (older
    minors are accepted: minor versions only add what older files may lack).  ``pin``,
    the version a runtime supports: a bare major ("1") accepts every 1.x this checker
    accepts; "MAJOR.MINOR" also refuses files newer than that minor (a runtime for 1.1
    reads 1.0 and 1.1 files, not 1.2)."""
    own_text = schema_version()
    own = parse_version(own_text)
    try:
        got = parse_version(found)
    except ValueError:
        return f"schema_version {found!r} is not MAJOR.MINOR"
    if got[0] != own[0]:
        how = ("convert the source again" if got[0] < own[0]
               else "upgrade indextts-convert, or convert with the converter version the runtime supports")
        return (f"made for schema version {found}, this tool checks version {own_text} (major {own[0]}; another major "
                f"is another layout); {how}")
    if got[1] > own[1]:
        return (f"made for schema version {found}, newer than this tool's {own_text}; upgrade indextts-convert "
                "(a newer minor only adds, but this checker does not know what)")
    if pin is not None:
        want = parse_version(pin)
        if got[0] != want[0]:
            return f"made for schema version {found}, but --schema-version {pin} was asked for"
        if "." in str(pin) and got[1] > want[1]:
            return (f"made for schema version {found}, newer than the {pin} the runtime supports (--schema-version {pin}); "
                    f"the runtime needs updating to read {got[0]}.{got[1]} files")
    return None


def model_spec(kind: str, family_version: str = family.DEFAULT) -> dict:
    """The section of ``kind`` for files of ``family_version``: ``models["<kind>@<version>"]``
    where the layout differs by version, else ``models[kind]``."""
    models = load_schema()["models"]
    if kind not in models:
        raise ConvertError(f"{SCHEMA_PATH}: no schema for model {kind!r}")
    return models[family.section(kind, family_version, models)]


def kind_sections(kind: str) -> dict[str, dict]:
    """Every section of ``kind`` (``kind`` and each ``kind@version``), by key."""
    return {k: v for k, v in load_schema()["models"].items() if k == kind or k.startswith(kind + "@")}


# ------------------------------------------------------------ expressions

_BIN = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CMP = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}


class Unbound(Exception):
    def __init__(self, name: str):
        self.name = name


def evaluate(expr, env: dict):
    """Evaluate a schema expression: ints, names, + - * // % **, comparisons,
    and/or/not, ``x[i]``, ``len(x)``, ``a if c else b``.  Nothing else."""
    if isinstance(expr, (int, float, bool)):
        return expr
    tree = _parse(expr)
    return _ev(tree.body, env)


@lru_cache(maxsize=4096)
def _parse(expr: str) -> ast.Expression:
    return ast.parse(expr, mode="eval")


def _ev(n, env):
    if isinstance(n, ast.Constant) and isinstance(n.value, (int, float, str, bool)):
        return n.value
    if isinstance(n, ast.Name):
        if n.id in env:
            return env[n.id]
        raise Unbound(n.id)
    if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
        return _BIN[type(n.op)](_ev(n.left, env), _ev(n.right, env))
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
        return -_ev(n.operand, env)
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
        return not _ev(n.operand, env)
    if isinstance(n, ast.BoolOp):
        vals = (_ev(v, env) for v in n.values)
        return all(vals) if isinstance(n.op, ast.And) else any(vals)
    if isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in _CMP:
        return _CMP[type(n.ops[0])](_ev(n.left, env), _ev(n.comparators[0], env))
    if isinstance(n, ast.Subscript):
        return _ev(n.value, env)[_ev(n.slice, env)]
    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "len" and len(n.args) == 1:
        return len(_ev(n.args[0], env))
    if isinstance(n, ast.IfExp):
        return _ev(n.body, env) if _ev(n.test, env) else _ev(n.orelse, env)
    raise ValueError(f"unsupported schema expression {ast.unparse(n)!r}")


# ------------------------------------------------------------ expansion

_TYPES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}


def full_precision(file_dtype: str) -> str:
    """The dtype of a 'float32'-class tensor in a file whose float dtype is ``file_dtype``:
    F32, or F64 in a float64 file (the class never lowers precision)."""
    return "F64" if file_dtype == "F64" else "F32"


def dtype_classes(kind: str, config: dict, family_version: str = family.DEFAULT) -> dict[str, str]:
    """Each expected tensor's dtype class (``float``, ``float32`` or a fixed dtype)."""
    return {name: e["dtype"] for name, e in expected_tensors(kind, config, family_version).items()}


def expected_tensors(kind: str, config: dict, family_version: str = family.DEFAULT) -> dict[str, dict]:
    """name -> {"shape": [...], "dtype": class, "env": loop values} for this config (the
    entries are shared between calls: read them, do not change them)."""
    try:
        key = json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # not a JSON config: expanded afresh
        return _expected_tensors(kind, config, family_version)
    return dict(_expected_for_json(kind, key, family_version))


@lru_cache(maxsize=256)  # one entry per model and config: every check and conversion of a bundle repeats them
def _expected_for_json(kind: str, config_json: str, family_version: str) -> dict[str, dict]:
    return _expected_tensors(kind, json.loads(config_json), family_version)


def _expected_tensors(kind: str, config: dict, family_version: str) -> dict[str, dict]:
    spec = model_spec(kind, family_version)
    env = dict(config)
    for k, expr in spec.get("let", {}).items():
        env[k] = evaluate(expr, env)
    out: dict[str, dict] = {}
    for t in spec["tensors"]:
        def limit(name: str, bound: dict) -> int:
            return evaluate(spec["loops"][name], {**env, **bound})

        for bound in templates.expand(templates.fields(t["name"]), limit):
            if "when" in t and not evaluate(t["when"], {**env, **bound}):
                continue
            out[t["name"].format(**bound)] = {"shape": t["shape"], "dtype": t["dtype"], "env": bound}
    return out


def check(kind: str, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str], where: str,
          pin: str | None = None) -> list[str]:
    """Every problem found, as messages naming ``where`` and the tensor.  Empty = pass.
    ``pin``: the schema version a runtime supports (:func:`version_problem`).  A file
    that fails its family version's section but fits another's is told so."""
    errs = _check(kind, tensors, metadata, where, pin)
    said = metadata.get("family_version")
    if errs and said in (None, *family.VERSIONS) and len(kind_sections(kind)) > 1:
        says = f"says family_version {said}" if said else f"has no family_version (read as {family.DEFAULT})"
        for other in family.VERSIONS:
            if other != (said or family.DEFAULT) and not _check(kind, tensors, {**metadata, "family_version": other}, where, pin):
                errs.insert(0, f"{where}: its tensors and config are an {family.label(other)} {kind}'s, but its metadata "
                               f"{says}: a file of one release never passes as the other's")
    return errs


def _check(kind: str, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str], where: str,
           pin: str | None = None) -> list[str]:
    errs: list[str] = []
    for key in REQUIRED_METADATA:
        if key not in metadata:
            errs.append(f"{where}: metadata has no {key!r}")
    if errs:
        return errs
    if metadata["schema"] != SCHEMA_NAME:
        return [f"{where}: metadata schema is {metadata['schema']!r}, not {SCHEMA_NAME!r}"]
    problem = version_problem(metadata["schema_version"], pin)
    if problem:
        return [f"{where}: {problem}"]
    if metadata["model"] != kind:
        return [f"{where}: metadata says model {metadata['model']!r}, expected {kind!r}"]
    fv, errs = _family(metadata, where)
    if errs:
        return errs
    parsed = {}
    for key in ("config", "provenance", "dropped", "source"):
        try:
            parsed[key] = json.loads(metadata[key])
        except ValueError:
            errs.append(f"{where}: metadata {key!r} is not valid JSON")
            continue
        if not isinstance(parsed[key], dict):
            errs.append(f"{where}: metadata {key!r} is not a JSON object")
    if errs:
        return errs
    config, prov = parsed["config"], parsed["provenance"]
    spec = model_spec(kind, fv)
    for key, typ in spec["config"].items():
        optional = typ.endswith("?")  # "int?": a key a minor version added; older files may lack it
        typ = typ.rstrip("?")
        if key not in config and optional:
            continue
        if key not in config:
            older = parse_version(metadata["schema_version"]) < parse_version(schema_version())
            errs.append(f"{where}: config has no {key!r}" + (f" (the file says schema {metadata['schema_version']}, made by "
                        f"an older converter than schema {schema_version()} needs; convert the source again)" if older else ""))
        elif not _TYPES[typ](config[key]):
            errs.append(f"{where}: config {key!r} = {config[key]!r} is not {typ}")
    if errs:
        return errs
    file_dtype = metadata["dtype"]
    if file_dtype not in FLOAT_DTYPES:
        errs.append(f"{where}: metadata dtype {file_dtype!r} is not a float dtype")
    try:
        expected = expected_tensors(kind, config, fv)
    except (Unbound, KeyError, IndexError, TypeError, ValueError) as e:
        return [f"{where}: the config does not fit the schema for {kind} ({family.label(fv)}): {e!r}"]
    for name in sorted(set(expected) - set(tensors)):
        errs.append(f"{where}: missing tensor {name!r}")
    for name in sorted(set(tensors) - set(expected)):
        errs.append(f"{where}: unexpected tensor {name!r}")
    free: dict[str, int] = {}
    env0 = dict(config)
    for k, expr in spec.get("let", {}).items():
        env0[k] = evaluate(expr, env0)
    for name in sorted(set(expected) & set(tensors)):
        exp = expected[name]
        dtype, shape = tensors[name]
        want_dt = exp["dtype"]
        if want_dt == "float":
            if dtype != file_dtype:
                errs.append(f"{where}: tensor {name!r} is {dtype}, the file's float dtype is {file_dtype}")
        elif want_dt == "float32":
            want = full_precision(file_dtype)
            if dtype != want:
                errs.append(f"{where}: tensor {name!r} is {dtype}; its dtype class float32 keeps it {want} in a "
                            f"{file_dtype} file (the dtype policy)")
        elif dtype != want_dt:
            errs.append(f"{where}: tensor {name!r} is {dtype}, schema says {want_dt}")
        errs.extend(_check_shape(where, name, exp, shape, {**env0, **exp["env"]}, free))
    # Provenance covers every tensor, and only those.
    for name in sorted(set(tensors) - set(prov)):
        errs.append(f"{where}: tensor {name!r} has no provenance")
    for name in sorted(set(prov) - set(tensors)):
        errs.append(f"{where}: provenance names {name!r}, which is not in the file")
    for name in sorted(set(prov) & set(tensors)):
        p = prov[name]
        if not (isinstance(p, dict) and isinstance(p.get("from"), list) and all(isinstance(s, str) for s in p["from"]) and isinstance(p.get("op"), str)):
            errs.append(f"{where}: provenance of {name!r} is malformed")
            continue
        if p["from"]:
            try:
                opspec.parse(p["op"])
            except opspec.OpError as e:
                errs.append(f"{where}: provenance of {name!r}: {e}")
    if not all(isinstance(v, str) for v in parsed["dropped"].values()):
        errs.append(f"{where}: metadata 'dropped' must map names to reasons")
    return errs


def _family(metadata: dict[str, str], where: str) -> tuple[str, list[str]]:
    """(family_version, problems): files name their family and version since 2.1; a file
    without them (every 2.0 file) is family_version 2.0."""
    if "family" in metadata and metadata["family"] != family.FAMILY:
        return "", [f"{where}: metadata family is {metadata['family']!r}, not {family.FAMILY!r}"]
    fv = metadata.get("family_version", family.DEFAULT)
    if fv not in family.VERSIONS:
        return "", [f"{where}: metadata family_version is {fv!r}; this checker knows {', '.join(family.VERSIONS)}"]
    return fv, []


def _check_shape(where, name, exp, shape, env, free) -> list[str]:
    want = exp["shape"]
    if len(want) != len(shape):
        return [f"{where}: tensor {name!r} has shape {list(shape)}, schema says {want}"]
    # Bind bare free symbols first, then evaluate the rest.
    for sym, got in zip(want, shape):
        if isinstance(sym, str) and sym.isidentifier() and sym not in env:
            if sym in free and free[sym] != got:
                return [f"{where}: tensor {name!r} has {sym}={got}, but another tensor set {sym}={free[sym]}"]
            free[sym] = got
    for sym, got in zip(want, shape):
        try:
            val = evaluate(sym, {**env, **free})
        except Unbound as e:
            return [f"{where}: tensor {name!r}: schema shape {want} uses unbound symbol {e.name!r}"]
        if val != got:
            return [f"{where}: tensor {name!r} has shape {list(shape)}, schema says {want} = {[_show(s, env, free) for s in want]}"]
    return []


def _show(sym, env, free):
    try:
        return evaluate(sym, {**env, **free})
    except Exception:
        return sym


def check_file(path: str, pin: str | None = None) -> tuple[str | None, list[str]]:
    """Check one canonical file by its header.  Returns (model kind, problems).
    ``pin``: the schema version a runtime supports (:func:`version_problem`)."""
    from . import st_header

    try:
        header = st_header.read_header(path)
    except ConvertError as e:
        return None, [str(e)]
    kind = header.metadata.get("model")
    if header.metadata.get("schema") != SCHEMA_NAME or kind is None:
        return kind, [f"{path}: not a canonical file (no {SCHEMA_NAME} schema metadata)"]
    if kind not in load_schema()["models"]:
        return kind, [f"{path}: unknown model kind {kind!r}"]
    tensors = {n: (i.dtype, i.shape) for n, i in header.tensors.items()}
    return kind, st_header.layout_problems(header) + check(kind, tensors, header.metadata, path, pin)
