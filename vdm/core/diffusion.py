"""The Gaussian forward process in terms of gamma = -log SNR, and the parameterisations.

z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t).
Every variance below is written with sigmoid/expm1 of gamma differences so nothing is computed
as 1 - (something close to 1): near gamma = -13.3 alpha^2 = 1 - 1.7e-6, which float32 cannot
subtract from 1 accurately, but sigmoid(gamma) and expm1 of a gap in gamma are exact.

Parameterisations (Luo 2022, sec. 2.4-2.5): a network may predict the noise eps, the data x,
the velocity v = alpha eps - sigma x, or the score grad log q(z_t) = -eps / sigma. Given z_t
and gamma_t each is an exact affine function of any other; `to_eps`/`from_eps` convert.
"""

import chex
import jax
import jax.numpy as jnp

PARAMETERIZATIONS = ("eps", "x", "v", "score")


def broadcast(g, like):
    """Broadcasts per-example gamma [B] against a batch [B, ...]."""
    g = jnp.asarray(g)
    g = g.reshape(g.shape + (1,) * (jnp.ndim(like) - g.ndim))
    # A [B] gamma against a batch of another size would otherwise broadcast silently when
    # one of them is 1, or fail later with a less helpful message.
    chex.assert_is_broadcastable(g.shape, jnp.shape(like))
    return g


def alpha_sigma(gamma):
    """Returns (alpha, sigma) for log-SNR -gamma."""
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def q_sample(x, gamma, eps):
    """Draws z ~ q(z_t | x) given the noise: alpha x + sigma eps (gamma per example)."""
    chex.assert_equal_shape([x, eps])
    alpha, sigma = alpha_sigma(broadcast(gamma, x))
    return alpha * x + sigma * eps


def transition(gamma_s, gamma_t):
    """q(z_t | z_s) = N(alpha_ts z_s, sigma2_ts) for s < t.

    Returns:
      (alpha_ts, sigma2_ts) with alpha_ts = alpha_t / alpha_s and
      sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2 = sigma_t^2 * -expm1(gamma_s - gamma_t).
    """
    alpha_ts = jnp.exp(0.5 * (jax.nn.log_sigmoid(-gamma_t) - jax.nn.log_sigmoid(-gamma_s)))
    sigma2_ts = jax.nn.sigmoid(gamma_t) * -jnp.expm1(gamma_s - gamma_t)
    return alpha_ts, sigma2_ts


def posterior(x, z_t, gamma_s, gamma_t):
    """q(z_s | z_t, x) for s < t.

    With c = -expm1(gamma_s - gamma_t) (the fraction of sigma_t^2 added between s and t):
    mean = (alpha_s / alpha_t) (1 - c) z_t + alpha_s c x and variance = sigma_s^2 c.

    Returns:
      (mean, variance), variance broadcastable against mean.
    """
    chex.assert_equal_shape([x, z_t])
    gs, gt = broadcast(gamma_s, z_t), broadcast(gamma_t, z_t)
    c = -jnp.expm1(gs - gt)
    alpha_s, sigma_s = alpha_sigma(gs)
    alpha_t, _ = alpha_sigma(gt)
    mean = alpha_s / alpha_t * (1.0 - c) * z_t + alpha_s * c * x
    return mean, sigma_s**2 * c


def posterior_from_eps(eps_hat, z_t, gamma_s, gamma_t):
    """q(z_s | z_t, x = x_hat(eps_hat)), in the form used by the ancestral sampler.

    mean = (alpha_s / alpha_t) (z_t - sigma_t c eps_hat), variance = sigma_s^2 c.
    """
    chex.assert_equal_shape([eps_hat, z_t])
    gs, gt = broadcast(gamma_s, z_t), broadcast(gamma_t, z_t)
    c = -jnp.expm1(gs - gt)
    alpha_s, sigma_s = alpha_sigma(gs)
    alpha_t, sigma_t = alpha_sigma(gt)
    return alpha_s / alpha_t * (z_t - sigma_t * c * eps_hat), sigma_s**2 * c


def to_eps(pred, z, gamma, parameterization: str):
    """Converts a prediction of kind `parameterization` into the implied eps prediction."""
    chex.assert_equal_shape([pred, z])
    alpha, sigma = alpha_sigma(broadcast(gamma, z))
    if parameterization == "eps":
        return pred
    if parameterization == "x":
        return (z - alpha * pred) / sigma
    if parameterization == "v":
        # v = alpha eps - sigma x and z = alpha x + sigma eps, alpha^2 + sigma^2 = 1.
        return alpha * pred + sigma * z
    if parameterization == "score":
        return -sigma * pred
    raise ValueError(f"Unknown parameterization {parameterization!r}; use {PARAMETERIZATIONS}.")


def from_eps(eps, z, gamma, parameterization: str):
    """Converts an eps prediction into the `parameterization` one (inverse of `to_eps`)."""
    chex.assert_equal_shape([eps, z])
    alpha, sigma = alpha_sigma(broadcast(gamma, z))
    if parameterization == "eps":
        return eps
    if parameterization == "x":
        return (z - sigma * eps) / alpha
    if parameterization == "v":
        return (eps - sigma * z) / alpha
    if parameterization == "score":
        return -eps / sigma
    raise ValueError(f"Unknown parameterization {parameterization!r}; use {PARAMETERIZATIONS}.")


def x_from_eps(eps, z, gamma):
    """The data estimate implied by an eps prediction."""
    return from_eps(eps, z, gamma, "x")
