import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests gate merges in their bounded form (make test), so there they draw the
# same examples on every run (derandomize): a gate that fails one run in N is noise.  The
# full form (INDEXTTS_TEST_FULL=1, make test-slow) draws fresh examples each run, and
# hypothesis prints the failing example and its seed when one is found.
FULL = os.environ.get("INDEXTTS_TEST_FULL", "") not in ("", "0")
settings.register_profile("gate", derandomize=True, database=None)
settings.register_profile("full")
settings.load_profile("full" if FULL else "gate")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (make test) a test outside any ``xdist_group`` is sent
    to either worker on its own, so a module-scoped fixture is built once on each worker
    whose tests use it (a release written and converted twice).  The tests that use a
    module-scoped fixture of their own module are put in one group per module (here,
    before pytest-xdist reads the groups); the other tests stay free to balance the two
    workers."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", None)
        if module is None or item.get_closest_marker("xdist_group") is not None:
            continue
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(getattr(d, "scope", None) == "module" and getattr(getattr(d, "func", None), "__module__", None) == module
               for ds in defs.values() for d in ds):
            item.add_marker(pytest.mark.xdist_group(f"{module}:module-fixtures"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):
    """``--dist loadgroup`` sends the tests of one ``xdist_group`` to one worker:
    pytest-xdist 3.8 appends ``@<group>`` to each such test's nodeid by assigning
    ``item._nodeid``, but pytest 9 keeps a node's id in ``item._id`` (a ``NodeId``), so
    that assignment is lost and every group is split over the workers (each building the
    group's fixtures again).  The same suffix, set where pytest 9 reads it, before the
    worker reports its collection."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9: xdist's own assignment works
        return
    for item in session.items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        suffix = "@" + "_".join(sorted(names))
        if names and not item.nodeid.endswith(suffix) and isinstance(getattr(item, "_id", None), NodeId):
            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' tensors are tiny: one intra-op thread is faster than a pool (and than
    two pytest workers' pools contending for the build machines' two cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The demo release converted once per test process with ``all`` (the CLI in this
    process), shared by the modules that only read it; a test that changes files works
    on a copy."""
    from tests.helpers import ROOT, run_cli

    out = tmp_path_factory.mktemp("demo-bundle") / "canonical"
    run_cli("all", "--src", os.path.join(ROOT, "demo", "release"), "--out", out, "--quiet")
    return out
