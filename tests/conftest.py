"""Fixtures shared by the whole suite.

The test folders mirror the package (tests/core for vdm/core, tests/run for vdm/run, ...) and
have no __init__.py: pytest's default import mode puts each file's folder on sys.path, so test
file names must be unique across folders. tests/ itself is on sys.path through pyproject's
`pythonpath`, for `import train_helpers as th`.

Tests that start processes or subprocesses carry `@pytest.mark.slow`: `pytest -m "not slow"`
is the quick loop, plain `pytest` runs everything.

The suite compiles with faster-compiling XLA:CPU settings than the product's (measured and
explained at train_helpers.TEST_XLA_FLAGS); VDM_TEST_XLA_FLAGS=0 runs it with the product's.
"""

import os
import shutil

import jax
import pytest
import train_helpers as th

# Before any test starts JAX's backend, which reads XLA_FLAGS once (see TEST_XLA_FLAGS).
os.environ["XLA_FLAGS"] = th.with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))


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
