"""No sampler and no exact denoiser calls LAPACK from inside a compiled program.

On CPU (jaxlib 0.10.2) jnp.linalg.solve lowers to LAPACK's LU custom call, which splits its
batch over XLA's intra-op thread pool and blocks its worker until the pieces finish; two such
calls running at once on a 2-thread pool each wait for work queued behind the other, and the
program hangs with no CPU used (seen 2 runs in 15 of tests/run/test_objective.py's training on
2 cores; gdb showed both pool threads in jax::ParallelBatchMap under lapack_sgetrf_ffi). UniPC
solved three independent Vandermonde systems per step and the Gaussian oracle one per network
call, so both now solve in closed form; these tests keep it that way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.core import oracles, schedules
from vdm.sampling import samplers
from vdm.sampling.registries import SAMPLERS
from vdm.sampling.unipc import _weights

COV = np.array([[0.8, 0.3, 0.0], [0.3, 0.5, -0.2], [0.0, -0.2, 1.1]])
MU = np.array([0.5, -0.3, 0.2])
SCHEDULE = schedules.fixed_linear(-13.3, 5.0)


def _lowered_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_unipc_weights_solve_the_vandermonde_system(x64):
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        r, rhs = rng.uniform(-3.0, 1.0, n), rng.normal(size=n)
        vander = np.stack([r**j for j in range(n)])  # row j: r_k^j
        got = np.asarray(_weights(jnp.asarray(r), jnp.asarray(rhs)))
        np.testing.assert_allclose(got, np.linalg.solve(vander, rhs), rtol=1e-10, atol=1e-12)


def test_full_covariance_oracle_is_exact_without_a_solve():
    den = oracles.gaussian_eps(MU, COV)
    z = jax.random.normal(jax.random.key(0), (5, 3))
    gamma = jnp.linspace(-6.0, 4.0, 5)
    alpha, sigma = np.sqrt(jax.nn.sigmoid(-gamma))[:, None], np.sqrt(jax.nn.sigmoid(gamma))[:, None]
    want = [
        s * np.linalg.solve(a**2 * COV + s**2 * np.eye(3), zi - a * MU)
        for a, s, zi in zip(alpha, sigma, np.asarray(z, np.float64), strict=True)
    ]
    np.testing.assert_allclose(den(z, gamma), np.stack(want), rtol=1e-5, atol=1e-6)
    assert "lapack" not in _lowered_text(den, z, gamma)


def test_the_old_solve_would_be_caught():
    """The check below can fail: a jnp.linalg.solve shows up as a LAPACK call in the text."""
    text = _lowered_text(lambda a, b: jnp.linalg.solve(a, b), jnp.eye(3), jnp.ones(3))
    assert "lapack" in text


CASES = [(name, {}) for name in SAMPLERS.names()] + [("unipc", {"order": 3})]


@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}{o or ''}" for n, o in CASES])
def test_no_sampler_program_calls_lapack(name, opts):
    den = oracles.gaussian_eps(MU, COV)

    def run(key):
        return samplers.sample_z0(name, den, SCHEDULE, {}, key, (4, 3), steps=4, **opts)

    assert "lapack" not in _lowered_text(run, jax.random.key(0))
