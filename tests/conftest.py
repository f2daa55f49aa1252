"""Fixtures shared by the whole suite.

The test folders mirror the package (tests/core for vdm/core, tests/run for vdm/run, ...) and
have no __init__.py: pytest's default import mode puts each file's folder on sys.path, so test
file names must be unique across folders. tests/ itself is on sys.path through pyproject's
`pythonpath`, for `import train_helpers as th`.

Tests that start processes or subprocesses carry `@pytest.mark.slow`: `pytest -m "not slow"`
is the quick loop, plain `pytest` runs everything.

The suite compiles with faster-compiling XLA:CPU settings than the product's (measured and
explained at train_helpers.TEST_XLA_FLAGS); VDM_TEST_XLA_FLAGS=0 runs it with the product's.
In-process tests compile without XLA's optimisations unless marked `run_bound` (see
pytest_runtest_setup below).
"""

import os
import shutil

import jax
import pytest
import train_helpers as th

# Before any test starts JAX's backend, which reads XLA_FLAGS once (see TEST_XLA_FLAGS).
os.environ["XLA_FLAGS"] = th.with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))


# Most in-process tests spend their time compiling, not running: the fast suite (576 tests)
# took 342 s with every program compiled at -O0 and 344 s at -O1, but per test -O0 was 203 s
# faster where it helped (a U-Net's loss and gradient 15.5 against 8.1 s) and 205 s slower
# where it did not (an adaptive ODE solve 12 against 79 s, 1000-step sampler loops), measured
# side by side on a 2-vCPU EPYC. So the pytest process starts at TEST_XLA_FLAGS' -O1 and
# lowers each test to -O0 (jax's flag th.UNOPTIMISED, read at every compile)
# unless the test is marked `run_bound`. jax keys its compiled programs by function and
# arguments, not by this flag, so the caches are dropped when the level changes between two
# tests: a long loop compiled at -O0 by an earlier test is never reused by a run-bound one.
# Both levels compile the same HLO; only the machine code differs (results agree to rounding,
# and the vdm.main subprocesses run at -O0 throughout). To re-decide the markers, compare the
# `--durations=0` of `VDM_TEST_XLA_FLAGS=0 VDM_THREEFRY_UNROLLED=0 XLA_FLAGS="<_CLASSIC>N"
# python -m pytest -n 2 -m "not slow"` for N = 0 and 1 (_CLASSIC: tests/train_helpers.py).


def pytest_runtest_setup(item):
    """Sets the test's XLA optimisation level before its fixtures (a module fixture built for
    it compiles at its level too)."""
    if not th.FAST_COMPILE:  # VDM_TEST_XLA_FLAGS=0: XLA's defaults throughout
        return
    unoptimised = item.get_closest_marker("run_bound") is None
    if jax.config.read(th.UNOPTIMISED) != unoptimised:
        jax.clear_caches()
        jax.config.update(th.UNOPTIMISED, unoptimised)


@pytest.fixture
def x64():
    """Runs a test with float64 enabled and restores the previous setting afterwards."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def trained_workdir(tmp_path_factory, tmp_path):
    """tmp_path holding a copy of the 2-step tiny run (train_helpers.TRAINED_FLAGS), which is
    trained once per test run however many tests start from it."""
    shutil.copytree(th.tiny_trained(tmp_path_factory), tmp_path, dirs_exist_ok=True)
    return tmp_path
