"""The installed tool (issue 17): a wheel built from the checkout, installed into fresh
venvs; ``check`` on the standard library alone; the runtime CI sample; schema versions.

How the environments are made, so nothing is downloaded:

- the wheel: ``pip wheel --no-deps --no-build-isolation --no-index`` on a copy of the
  checkout's files (tracked and new, as a clone has them), built with this venv's
  setuptools;
- "installed with its dependencies": a venv made by this venv's Python with
  ``--without-pip``, given this venv's site-packages through a ``.pth`` file (the
  pinned torch and the rest, instead of installing them again), and the wheel
  installed into it with ``--no-deps`` by this venv's pip (``pip --python``);
- "no third-party packages": a venv made the same way with nothing added but the
  wheel (and, for the CI sample, pip, as setup-python provides it).

Commands run from a temporary folder, so ``converters`` comes from the installed
wheel, not from the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig

import pytest

from converters.format import schema
from converters.cli import NO_CLICK
from converters.cli.check import run_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIRD_PARTY = ("torch", "numpy", "safetensors", "click", "tqdm", "yaml")
NO_NETWORK = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def sh(*cmd, cwd=None, env=None, expect=0) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, **(env or {})})
    if expect is not None:
        assert p.returncode == expect, f"{cmd}: exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def site_packages(venv) -> str:
    return os.path.join(venv, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")


def make_venv(path, pth: list[str] = ()) -> str:
    """A venv of this Python with nothing in it, plus ``pth`` folders on its path."""
    sh(sys.executable, "-m", "venv", "--without-pip", path)
    if pth:
        with open(os.path.join(site_packages(path), "extra-paths.pth"), "w") as f:
            f.write("\n".join(pth) + "\n")
    return str(path)


def pip_install(venv, wheel) -> None:
    sh(sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "--no-deps", "-q", wheel,
       env=NO_NETWORK)


def with_metadata(src, dst, **changes) -> str:
    """A copy of a canonical file with metadata values changed (standard library only:
    the header is rewritten and re-padded, the data section copied)."""
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header["__metadata__"].update(changes)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return str(dst)


def tamper_dtype(path) -> None:
    """Recast one tensor of a canonical file in place (F16 -> I16 or F32 -> I32: the
    same item size, so only the schema check sees it)."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = f.read(n)
        m = re.search(rb'"dtype":"F(16|32)","shape"', head)
        f.seek(8 + m.start(1) - 1)
        f.write(b"I")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", base / "dist", src,
       env=NO_NETWORK)
    (whl,) = (base / "dist").glob("*.whl")
    return str(whl)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    """The demo release converted, with golden activations, by the checkout's convert.py."""
    out = str(tmp_path_factory.mktemp("demo") / "canonical")
    sh(sys.executable, os.path.join(ROOT, "convert.py"), "all", "--src", os.path.join(ROOT, "demo", "release"),
       "--out", out, "--quiet")
    sh(sys.executable, os.path.join(ROOT, "convert.py"), "golden", out)
    return out


def imported(stderr: str) -> set[str]:
    """Top-level modules in a ``PYTHONPROFILEIMPORTTIME`` report."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*([\w.]+)\s*$", stderr, re.M)}


# ------------------------------------------------------------------ installed


@pytest.mark.slow
def test_installed_wheel_converts_and_checks(wheel, tmp_path):
    """``pip install`` of the wheel gives ``indextts-convert`` with convert.py's commands;
    ``all`` then ``check`` work from the installed package, which reads the schema copy
    the build put inside it; ``--help``, ``check`` and ``inspect`` of a canonical file
    import no torch (``check`` not even click)."""
    venv = make_venv(tmp_path / "venv", pth=[sysconfig.get_paths()["purelib"]])
    pip_install(venv, wheel)
    tool = os.path.join(venv, "bin", "indextts-convert")
    where = sh(os.path.join(venv, "bin", "python"), "-c",
               "import converters, reference, converters.format.schema as s; print(converters.__file__); "
               "print(reference.__file__); print(s.SCHEMA_PATH)", cwd=tmp_path).stdout.split()
    for p in where:
        assert p.startswith(site_packages(venv)), where
    assert where[2].endswith(os.path.join("converters", "canonical_schema.json"))
    with open(where[2]) as a, open(os.path.join(ROOT, "canonical_schema.json")) as b:
        assert a.read() == b.read()

    out = tmp_path / "out"
    sh(tool, "all", "--src", os.path.join(ROOT, "demo", "release"), "--out", out, "--quiet", cwd=tmp_path)
    p = sh(tool, "check", out, cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert sum(line.startswith("ok ") for line in p.stdout.splitlines()) == 8, p.stdout
    assert f"schema v{schema.schema_version()}" in p.stdout
    assert not imported(p.stderr) & {*THIRD_PARTY}, sorted(imported(p.stderr) & {*THIRD_PARTY})

    helped = sh(tool, "--help", cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert {"converters", "click"} <= imported(helped.stderr)  # the report is read right
    assert not imported(helped.stderr) & {"torch", "numpy", "safetensors", "tqdm", "yaml"}
    described = sh(tool, "inspect", out / "gpt.safetensors", cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "canonical gpt file" in described.stdout and "schema check: ok" in described.stdout
    assert not imported(described.stderr) & {"torch", "numpy", "safetensors", "tqdm", "yaml"}
    ours = sh(sys.executable, os.path.join(ROOT, "convert.py"), "--help").stdout
    assert helped.stdout.replace("indextts-convert", "convert.py") == ours  # the same commands
    for cmd in ("all", "gpt", "verify", "golden", "inspect"):  # and the same flags
        theirs = sh(tool, cmd, "--help", cwd=tmp_path).stdout
        assert theirs.replace("indextts-convert", "convert.py") == sh(sys.executable, os.path.join(ROOT, "convert.py"),
                                                                      cmd, "--help").stdout


@pytest.mark.slow
def test_check_runs_on_the_standard_library_alone(wheel, demo, tmp_path):
    """Installed with --no-deps into a venv without third-party packages, ``check``
    passes a converted demo folder (golden files included), and fails a tampered one
    with the error; the other commands say what is missing."""
    venv = make_venv(tmp_path / "bare")
    pip_install(venv, wheel)
    py = os.path.join(venv, "bin", "python")
    found = sh(py, "-c", f"import importlib.util as u; print([m for m in {THIRD_PARTY!r} if u.find_spec(m)])",
               cwd=tmp_path).stdout.strip()
    assert found == "[]"
    tool = os.path.join(venv, "bin", "indextts-convert")

    folder = shutil.copytree(demo, tmp_path / "canonical")
    p = sh(tool, "check", "--hash", folder, cwd=tmp_path)
    assert "golden activations for gpt.safetensors" in p.stdout and not p.stderr
    assert sh(py, "-m", "converters.check", folder, cwd=tmp_path).stdout == sh(tool, "check", folder, cwd=tmp_path).stdout

    tamper_dtype(os.path.join(folder, "gpt.safetensors"))
    bad = sh(tool, "check", folder, cwd=tmp_path, expect=1)
    assert "error: " in bad.stderr and "gpt.safetensors" in bad.stderr and re.search("is I(16|32)", bad.stderr), bad.stderr
    assert "Traceback" not in bad.stderr
    assert sh(py, "-m", "converters.check", folder, cwd=tmp_path, expect=1).stderr == bad.stderr

    other = sh(tool, "inspect", os.path.join(folder, "gpt.safetensors"), cwd=tmp_path, expect=1)
    assert other.stderr.strip() == NO_CLICK


@pytest.mark.slow
def test_runtime_ci_sample_runs(wheel, demo, tmp_path):
    """docs/runtime-ci.yml's ``run:`` steps, in order, in bash as GitHub runs them.
    Substituted: actions/checkout (a folder holding the runtime's canonical folder, the
    converted demo, at the workflow's CANONICAL path); actions/setup-python (a venv
    without packages, first on PATH, with this venv's pip linked in, as setup-python
    provides pip); INDEXTTS_CONVERT (the local wheel instead of the git URL); pip's
    index (off).  Not run: the ``parity`` step, the runtime's own test (this repository
    has no runtime).  A tampered file turns the check step red."""
    import yaml

    with open(os.path.join(ROOT, "docs", "runtime-ci.yml")) as f:
        wf = yaml.safe_load(f)
    (job,) = wf["jobs"].values()
    steps = job["steps"]
    assert [s["uses"].split("@")[0] for s in steps if "uses" in s] == ["actions/checkout", "actions/setup-python"]
    runs = [s for s in steps if "run" in s]
    assert [s.get("id") for s in runs][-1] == "parity"
    assert "--no-deps" in runs[0]["run"] and "$INDEXTTS_CONVERT" in runs[0]["run"]

    repo = tmp_path / "runtime"
    shutil.copytree(demo, repo / wf["env"]["CANONICAL"])
    pip_dir = tmp_path / "pip-only"
    pip_dir.mkdir()
    os.symlink(os.path.join(sysconfig.get_paths()["purelib"], "pip"), pip_dir / "pip")
    venv = make_venv(tmp_path / "python", pth=[str(pip_dir)])
    env = {**os.environ, **{k: str(v) for k, v in wf["env"].items()}, **NO_NETWORK,
           "INDEXTTS_CONVERT": wheel, "PATH": os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"]}
    env.pop("PYTHONPATH", None)

    def step(s, expect=0):
        p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", s["run"]], cwd=repo, env=env,
                           capture_output=True, text=True)
        assert (p.returncode == 0) == (expect == 0), f"{s.get('name')}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    for s in runs[:-1]:
        step(s)
    check = next(s for s in runs if "indextts-convert check" in s["run"])
    assert "golden activations for gpt.safetensors" in step(check).stdout
    tamper_dtype(repo / wf["env"]["CANONICAL"] / "s2mel.safetensors")
    assert "s2mel.safetensors" in step(check, expect=1).stderr
    major, _ = schema.parse_version(schema.schema_version())
    env["SCHEMA_VERSION"] = f"{major - 1}.0"  # a runtime written for the previous major refuses these files
    shutil.rmtree(repo / wf["env"]["CANONICAL"])
    shutil.copytree(demo, repo / wf["env"]["CANONICAL"])
    assert f"--schema-version {major - 1}.0: this checker knows schema" in step(check, expect=1).stderr


# ------------------------------------------------------------------ schema versions


def test_schema_is_the_checkouts_file():
    assert schema.SCHEMA_PATH == os.path.join(ROOT, "canonical_schema.json")
    assert re.fullmatch(r"\d+\.\d+", schema.schema_version())


def test_parse_version():
    assert schema.parse_version("1") == (1, 0)
    assert schema.parse_version("1.0") == (1, 0)
    assert schema.parse_version("1.12") == (1, 12)
    assert schema.parse_version(1) == (1, 0)  # canonical_schema.json before 1.1
    for bad in ("", "1.", ".1", "v1", "01", "1.01", "1.1.1", "1.x", True, None, 1.1, -1):
        with pytest.raises(ValueError):
            schema.parse_version(bad)


def test_version_rules():
    major, minor = schema.parse_version(schema.schema_version())
    ok = lambda v, pin=None: schema.version_problem(v, pin) is None  # noqa: E731
    assert ok(f"{major}.{minor}") and ok(f"{major}.0") and ok(str(major))  # "1" is 1.0
    assert "upgrade indextts-convert" in schema.version_problem(f"{major}.{minor + 1}")
    assert "convert the source again" in schema.version_problem(f"{major - 1}.9")
    assert "upgrade" in schema.version_problem(f"{major + 1}.0")
    assert "not MAJOR.MINOR" in schema.version_problem("one")
    assert ok(f"{major}.0", str(major)) and ok(f"{major}.{minor}", str(major))  # a bare major: any minor known here
    assert ok(f"{major}.0", f"{major}.{minor}")  # an older minor is readable
    if minor:
        assert "runtime supports" in schema.version_problem(f"{major}.{minor}", f"{major}.{minor - 1}")
    assert ok(f"{major}.{minor}", f"{major}.{minor + 5}")  # a runtime ahead of this checker
    schema.check_pin(str(major))
    for bad in (str(major + 1), f"{major - 1}.0", "x"):
        with pytest.raises(schema.ConvertError, match="--schema-version"):
            schema.check_pin(bad)


def _both(capsys, *args) -> tuple[int, str, str]:
    """``check`` through the argparse entry and through the click command: they must
    print the same and exit the same."""
    from click.testing import CliRunner

    from converters.cli import commands as cli

    code = run_check([str(a) for a in args])
    out, err = capsys.readouterr()
    r = CliRunner().invoke(cli.main, ["check", *map(str, args)], catch_exceptions=False)
    assert (r.exit_code, r.stdout, r.stderr) == (code, out, err)
    return code, out, err


def test_check_schema_versions(demo_bundle, tmp_path, capsys):
    """(On conftest's demo bundle, converted in this process: the checks read one
    canonical file, and the slow tests' ``demo`` fixture pays two convert.py processes.)"""
    major, minor = schema.parse_version(schema.schema_version())
    gpt = os.path.join(demo_bundle, "gpt.safetensors")
    old = with_metadata(gpt, tmp_path / "old.safetensors", schema_version=str(major))
    code, out, _ = _both(capsys, old)
    assert code == 0 and f"(gpt, schema v{major})" in out  # a file that says "1" passes as 1.0
    assert _both(capsys, "--schema-version", f"{major}.0", old)[0] == 0

    newer = with_metadata(gpt, tmp_path / "newer.safetensors", schema_version=f"{major}.{minor + 1}")
    code, _, err = _both(capsys, newer)
    assert code == 1 and "newer than this tool's" in err and "upgrade indextts-convert" in err

    code, _, err = _both(capsys, "--schema-version", str(major), gpt)
    assert code == 0
    if minor:
        code, _, err = _both(capsys, "--schema-version", f"{major}.{minor - 1}", gpt)
        assert code == 1 and f"newer than the {major}.{minor - 1} the runtime supports" in err
    code, _, err = _both(capsys, "--schema-version", str(major + 1), gpt)
    assert code == 1 and err.startswith("error: --schema-version") and err.count("\n") == 1
