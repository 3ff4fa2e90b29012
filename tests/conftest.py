"""Tests run offline, on one torch thread, with tiny models, and each starts from the same random state, so a test's
outcome depends neither on the order the tests run in (pytest-randomly shuffles it) nor on which pytest-xdist worker
runs it."""
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_and_a_fixed_random_state():
    """One torch thread, and torch's, numpy's and Python's global generators seeded alike before every test (code
    under test that draws from them, e.g. a layer's initialisation, then draws the same numbers in any order)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    dtype = torch.get_default_dtype()
    yield
    assert torch.get_default_dtype() == dtype, "a test left another default dtype behind"


# ---- two-process runs shared by several test files (tests/helpers/torchrun.py) -------------------------------------
@pytest.fixture(scope="session")
def two_process_draft(tmp_path_factory):
    """(folder, run directory, each rank's record) of the shared float64 DRaFT-K run of 3 updates on 2 processes."""
    from helpers.torchrun import SHARED_ENV, SHARED_EXTRA, SHARED_STEPS, shared_launch, torchrun

    tmp, ranks = shared_launch(tmp_path_factory, "two_process_draft", lambda tmp: torchrun(
        tmp, tmp / "run", SHARED_STEPS, tmp / "out", extra=SHARED_EXTRA, env_extra=SHARED_ENV))
    return tmp, tmp / "run", ranks


@pytest.fixture(scope="session")
def two_process_probe(tmp_path_factory):
    """(folder, run directory, each rank's record) of the shared probe run (tests/helpers/torchrun.py PROBE)."""
    from helpers.torchrun import PROBE, shared_launch, torchrun

    tmp, ranks = shared_launch(tmp_path_factory, "two_process_probe", lambda tmp: torchrun(
        tmp, tmp / "run", 2, tmp / "out", mode="probe", extra=PROBE))
    return tmp, tmp / "run", ranks


def pytest_terminal_summary(terminalreporter, config):
    """The random order's seed (pytest-randomly), so that a failure that depends on the order can be replayed."""
    if config.pluginmanager.hasplugin("randomly"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(f"random order: --randomly-seed={seed} replays it; -p no:randomly runs in file order")
