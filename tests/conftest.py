import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


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
