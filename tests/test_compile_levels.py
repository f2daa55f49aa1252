"""The suite's per-test XLA optimisation level (tests/conftest.py, pytest_runtest_setup): a test
compiles at -O0 unless marked run_bound, and a run-bound test after an unmarked one gets freshly
compiled programs rather than the -O0 ones jax cached for it."""

import jax
import jax.numpy as jnp
import pytest
import train_helpers as th

# Together on one worker, in this order, under `--dist loadgroup` (as .ci/run runs them).
pytestmark = pytest.mark.xdist_group("compile_levels")


def _loop(x):
    return jax.lax.fori_loop(0, 10, lambda i, v: jnp.sin(v) + i, x)


LOOP = jax.jit(_loop)  # one function object shared by the tests below, as a library's would be


def test_an_unmarked_test_compiles_without_optimisations():
    assert jax.config.read(th.UNOPTIMISED) is th.FAST_COMPILE
    LOOP(jnp.ones(3))  # cached at this test's level


@pytest.mark.run_bound
def test_a_run_bound_test_compiles_with_them_and_recompiles_what_was_cached():
    assert jax.config.read(th.UNOPTIMISED) is False
    if th.FAST_COMPILE:  # the level changed before this test: jax's caches were dropped
        assert LOOP._cache_size() == 0
    LOOP(jnp.ones(3))
    assert LOOP._cache_size() == 1
