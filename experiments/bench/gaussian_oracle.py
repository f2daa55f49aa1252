"""The Gaussian oracle of experiments/bench_samplers.py, without its command-line flags (so
that tests import it): the test Gaussian and its exact denoiser, the 2-Wasserstein distance of
a sample's fitted Gaussian, and network evaluations counted as they run."""

import jax
import jax.numpy as jnp
import numpy as np

from vdm.core import oracles, schedules
from vdm.sampling import samplers

# gamma_max = 10 makes q(z_1) = N(0, I) to 5e-5, so the prior mismatch of gamma_max = 5 does
# not hide the samplers' discretisation error.
SCHEDULE = schedules.fixed_linear(-13.3, 10.0)


def problem(dims: int, seed: int = 0):
    """mu, Q, lam of the test Gaussian and its eps-denoiser (eigenbasis, exact)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    lam = np.geomspace(0.05, 2.0, dims)
    mu = rng.normal(size=dims) * 0.5
    inner = oracles.gaussian_eps(mu @ q, lam)  # the data's law in the eigenbasis
    qj = jnp.asarray(q, jnp.float32)

    def denoise(z, gamma, cond=None):
        return inner(z @ qj, gamma) @ qj.T

    full = oracles.gaussian_eps(mu, (q * lam) @ q.T)
    z = jax.random.normal(jax.random.key(9), (64, dims))
    for g in (-10.0, 0.0, 8.0):
        gam = jnp.full((64,), g)
        err = float(jnp.max(jnp.abs(denoise(z, gam) - full(z, gam))))
        assert err < 1e-4, f"eigenbasis denoiser differs from the full oracle by {err}"
    return mu, q, lam, denoise


def w2_gaussian(x, mu, cov_sqrt, cov):
    """W2 between N(mean(x), cov(x)) and N(mu, cov) (cov_sqrt its symmetric square root)."""
    x = np.asarray(x, np.float64)
    m, c = x.mean(0), np.cov(x, rowvar=False)
    cross = cov_sqrt @ c @ cov_sqrt
    ev = np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)
    w2sq = np.sum((m - mu) ** 2) + np.trace(c) + np.trace(cov) - 2.0 * np.sum(np.sqrt(ev))
    return float(np.sqrt(max(w2sq, 0.0)))


def count_nfe(denoise, name, opts, steps, shape):
    """Denoiser calls of one sampling run, counted on the host as they execute."""
    calls = []

    def counted(z, gamma, cond=None):
        jax.debug.callback(lambda: calls.append(1))
        return denoise(z, gamma, cond)

    x = samplers.sample(name, counted, SCHEDULE, {}, jax.random.key(1), shape, vocab_size=None,
                        steps=steps, **opts)  # fmt: skip
    jax.block_until_ready(x)
    jax.effects_barrier()
    return len(calls)
