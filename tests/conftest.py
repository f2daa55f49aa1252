"""Fixtures shared by the whole suite.

The test folders mirror the package (tests/core for vdm/core, tests/run for vdm/run, ...) and
have no __init__.py: pytest's default import mode puts each file's folder on sys.path, so test
file names must be unique across folders. tests/ itself is on sys.path through pyproject's
`pythonpath`, for `import train_helpers as th`.

Tests that start processes or subprocesses carry `@pytest.mark.slow`: `pytest -m "not slow"`
is the quick loop, plain `pytest` runs everything.
"""

import jax
import pytest


@pytest.fixture
def x64():
    """Runs a test with float64 enabled and restores the previous setting afterwards."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
