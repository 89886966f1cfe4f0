"""Shared test helpers: run the CLI, load canonical files, map them back upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from converters.format import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, expect: int | None = 0, process: bool = False) -> subprocess.CompletedProcess:
    """Run the command line as a user would: in this process through click's runner (the
    same ``main`` with the same options, output and exit code, without paying for a
    Python start and ``import torch`` per call), or with ``process=True`` as
    ``python convert.py`` in a subprocess, for what only a process shows (tracebacks
    with --debug, the real exit path)."""
    if process:
        p = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *map(str, args)],
                           capture_output=True, text=True, cwd=ROOT)
    else:
        from click.testing import CliRunner

        from converters.cli import commands as cli

        here = os.getcwd()
        os.chdir(ROOT)
        try:
            r = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
        finally:
            os.chdir(here)
        p = subprocess.CompletedProcess(["convert.py", *map(str, args)], r.exit_code, r.stdout, r.stderr)
    if expect is not None:
        assert p.returncode == expect, f"exit {p.returncode}, expected {expect}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def assert_refused(p: subprocess.CompletedProcess, *needles: str) -> None:
    """A refusal: non-zero exit, one `error:` line naming what is wrong, no traceback."""
    assert p.returncode != 0, p.stdout
    assert p.stderr.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, f"{n!r} not in {p.stderr!r}"


def metadata(path: str) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def load_canonical(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    md = metadata(path)
    return load_file(path), json.loads(md["provenance"])


def back_to_upstream(path: str) -> dict[str, torch.Tensor]:
    """Canonical file -> upstream state dict (weight norm folded), via provenance only."""
    tensors, prov = load_canonical(path)
    return ops.invert(prov, tensors)


def rewrite(path: str, out: str, tensors=None, meta=None) -> str:
    """Write a (tampered) copy of a canonical file with the library writer."""
    t0, _ = load_canonical(path)
    m0 = metadata(path)
    save_file(tensors if tensors is not None else t0, out, metadata=meta if meta is not None else m0)
    return out


# ------------------------------------------------------------------ reference runtime


def reference_load(path):
    """A canonical file as the reference runtime reads it (CPU, memory-mapped views),
    with float tensors in float32, the reference's compute dtype."""
    from reference.load import load

    return load(str(path), device="cpu").float()


def convert_in_process(kind: str, src, out, *, config=None, extra=None, options=None):
    """Convert one model in this process (the engine the CLI calls), quietly."""
    from converters.release import engine

    engine.convert(kind, str(src), str(out), str(config) if config else None, quiet=True, force=True,
                   extra=extra, options=options)
    return out


def swap_rows(monkeypatch, kind: str, *pairs: tuple[str, str], family_version: str = "2.0") -> None:
    """Make ``kind``'s table exchange the canonical names of each pair of row templates:
    each name moves together with its op and sources, so provenance stays consistent and
    ``check`` and the inverse-op round trip still pass.  Only a forward that reads
    tensors by role can tell."""
    import dataclasses

    from converters.release import engine

    mod = engine.model_module(kind, family_version)
    original = mod.table
    swap = {a: b for a, b in pairs} | {b: a for a, b in pairs}

    def table(cfg):
        rows, loops = original(cfg)
        hit = {r.canonical for r in rows} & set(swap)
        assert hit == set(swap), f"rows not in the {kind} table: {sorted(set(swap) - hit)}"
        return [dataclasses.replace(r, canonical=swap[r.canonical]) if r.canonical in swap else r for r in rows], loops

    monkeypatch.setattr(mod, "table", table)


def assert_dtype_policy(path, file_dtype: str) -> None:
    """Every tensor has the dtype its schema class gives it in a ``file_dtype`` file:
    'float' tensors the file's dtype, 'float32' tensors F32 (F64 in a float64 file);
    and the file has tensors of both kinds where the model has 'float32'-class ones."""
    from converters.format import schema
    from reference.header import read_header

    h = read_header(str(path))
    assert h.metadata["dtype"] == file_dtype
    classes = schema.dtype_classes(h.metadata["model"], json.loads(h.metadata["config"]))
    seen = set()
    for name, info in h.tensors.items():
        cls = classes[name]
        want = file_dtype if cls == "float" else schema.full_precision(file_dtype) if cls == "float32" else cls
        assert info.dtype == want, f"{name}: {info.dtype}, class {cls} in a {file_dtype} file wants {want}"
        seen.add(cls)
    assert "float" in seen
    assert schema.check_file(str(path))[1] == []


def assert_std_of(std: torch.Tensor, var: torch.Tensor) -> None:
    """``std`` is the correctly rounded sqrt of a float32 ``var`` (float64 sqrt, then
    rounded: exact, as float64 carries more than twice float32's precision), and within
    one ulp of ``torch.sqrt`` (what upstream computes at run time; with MKL it is not
    always correctly rounded)."""
    assert var.dtype == torch.float32 and std.dtype == torch.float32
    assert torch.equal(std, torch.sqrt(var.double()).float())
    torch.testing.assert_close(std, torch.sqrt(var), rtol=2.0 ** -23, atol=0.0)


def copy_release(src: str, tmp_path) -> "os.PathLike":
    """A writable copy of a release folder (a demo), at ``tmp_path/release``."""
    import shutil

    d = tmp_path / "release"
    shutil.copytree(src, d)
    return d


def manifest(folder) -> dict:
    """A bundle's ``manifest.json``, parsed."""
    with open(os.path.join(folder, "manifest.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------ child Pythons with torch already imported

_ZYGOTE = r"""
import atexit, json, os, resource, signal, sys, threading, traceback
import torch  # noqa: F401  (the one import the children share; nothing else is imported before their code runs)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.stdin = open(0, closefd=False)
            os.environ.clear()
            os.environ.update(job["env"])
            os.chdir(job["cwd"])
            if job["fsize"] is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
            if job["ignore_sigxfsz"]:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            sys.argv = ["-c", *job["argv"]]
            rc = 0
            try:
                exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            except SystemExit as e:  # as the interpreter turns it into an exit status
                if e.code is None:
                    rc = 0
                elif isinstance(e.code, int):
                    rc = e.code & 0xFF
                else:
                    print(e.code, file=sys.stderr)
                    rc = 1
            except BaseException:
                sys.excepthook(*sys.exc_info())
                rc = 1
            threading._shutdown()  # the interpreter's exit: threads joined, atexit handlers, streams flushed
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            traceback.print_exc()
            rc = 70
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), flush=True)
"""

_zygote: dict = {}


def python_c(code: str, *args, cwd=ROOT, fsize: int | None = None, ignore_sigxfsz: bool = False
             ) -> subprocess.CompletedProcess:
    """``python -c code *args`` (stdout and stderr captured, text), as ``subprocess.run``
    gives it, in a child process forked from one Python of this test process that has
    imported torch and nothing else of ours (started on first use): the child pays for
    no interpreter start and no ``import torch`` (~1.5 s), and is otherwise what a new
    process is: its own memory (VmHWM starts at what is mapped at the fork, as after an
    exec), this process's environment and the given ``cwd``, ``sys.argv`` as ``-c``
    sets it, everything beyond torch imported by its own code (after any patch or
    import blocker it installs first), the interpreter's exit (its status from
    SystemExit or a traceback, threads joined, atexit handlers), or a signal's death
    (a negative returncode).  ``fsize``: an RLIMIT_FSIZE set in the child, and
    ``ignore_sigxfsz`` SIGXFSZ ignored there (what a ``preexec_fn`` would set).  For
    children whose point is what a fresh interpreter imports before torch (a module or
    an ``os`` function hidden first, torch never imported), use a real subprocess."""
    import atexit
    import tempfile

    z = _zygote.get("p")
    if z is None or z.poll() is not None:
        z = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        _zygote["p"] = z
        atexit.register(lambda: (z.stdin.close(), z.wait()))
    with tempfile.TemporaryDirectory(prefix="python-c-") as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        job = {"code": code, "argv": [str(a) for a in args], "cwd": str(cwd), "env": dict(os.environ),
               "stdout": out, "stderr": err, "fsize": fsize, "ignore_sigxfsz": ignore_sigxfsz}
        z.stdin.write(json.dumps(job) + "\n")
        z.stdin.flush()
        line = z.stdout.readline()
        if not line:
            raise RuntimeError("the forking Python (tests/helpers.py python_c) died")
        with open(out) as f, open(err) as g:
            return subprocess.CompletedProcess([sys.executable, "-c", code, *map(str, args)], json.loads(line),
                                               f.read(), g.read())
