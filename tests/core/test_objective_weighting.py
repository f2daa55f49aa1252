"""The monotone EDM weighting and the adaptive_lambda proposal (Kingma & Gao 2023)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from vdm.core import losses, time_proposals


def test_edm_weighting_matches_hand_values_and_is_monotone():
    # Peak of N(lam; 2.4, 2.4^2) (e^-lam + 0.25) / 0.25 at lam* ~ -3.31: w = 1 at and below it.
    g = jnp.linspace(-20.0, 20.0, 2001)
    w = np.asarray(losses.edm_weighting(g))
    assert np.all(np.diff(w) >= -1e-7) and abs(w.max() - 1.0) < 1e-6
    assert np.allclose(losses.edm_weighting(jnp.array([4.0, 10.0])), 1.0)

    # Hand value at lam = 2.4 (gamma = -2.4) against the peak lam* = -3.3078.
    def log_w(lam):
        return -0.5 * ((lam - 2.4) / 2.4) ** 2 + math.log(math.exp(-lam) + 0.25)

    expect = math.exp(log_w(2.4) - log_w(-3.3078))
    assert abs(float(losses.edm_weighting(jnp.array(-2.4))) - expect) < 1e-4


def test_adaptive_lambda_reweighting_keeps_the_expectation():
    # A closed-form f(t) = 3 t^2 (integral 1): any histogram-driven q with weights 1/q keeps it.
    t_grid = (jnp.arange(32) + 0.5) / 32
    hist = time_proposals.histogram_values("adaptive_lambda", 3 * t_grid**2, jnp.exp(-t_grid))
    probs = time_proposals.weighted_loss_bins(jnp.square(hist), 0.1)
    u = jax.random.uniform(jax.random.key(0), (200_000,))
    t, wt = time_proposals.sample(probs, u)
    estimate = float(jnp.mean(wt * 3 * t**2))
    assert abs(estimate - 1.0) < 0.01
    # And the proposal follows the weighted loss: heavier bins get more mass.
    assert float(probs[-1]) > float(probs[0])
