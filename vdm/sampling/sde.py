"""Score-SDE one-step updates: reverse-time Euler-Maruyama (a predictor) and Langevin (a corrector).

The forward process z_t = alpha_t x + sigma_t eps is the VP SDE dz = f z dt + g dW with
  f(t) = d log alpha_t / dt = -0.5 gamma'(t) sigma_t^2,   g(t)^2 = gamma'(t) sigma_t^2
(differentiate alpha^2 = sigmoid(-gamma) and use g^2 = d sigma^2/dt - 2 f sigma^2). Its reverse
(Song et al. 2021) is dz = [f z - g^2 score] dt + g dW_bar with score = -eps / sigma, so one
Euler-Maruyama step from t down to s = t - dt is
  z_s = z_t + dt gamma' (0.5 sigma^2 z_t - sigma eps_hat) + sigma sqrt(gamma' dt) xi.
gamma'(t) comes from forward-mode differentiation of the schedule, so learned schedules work.

Langevin steps z <- z + e score + sqrt(2 e) xi target the marginal at a fixed t. Their size
follows Song et al.'s signal-to-noise rule e = 2 a (r ||xi|| / ||score||)^2 with both norms
taken as batch averages (a global reduction, so sharded runs agree), a = alpha_t^2 / alpha_s^2
over one grid step as in their VP corrector; or Song & Ermon's e = step_lr * sigma_t^2.
"""

import math

import jax
import jax.numpy as jnp

from vdm.sampling.model import EpsModel
from vdm.sampling.registries import CORRECTORS, PREDICTORS
from vdm.sampling.sharded import normal


@PREDICTORS.register("sde")
def euler_maruyama_step(model: EpsModel, z, t, s, noise):
    """One reverse-SDE Euler-Maruyama step from t to s < t."""
    g, slope = model.gamma_slope(t)
    dt = t - s
    var = jax.nn.sigmoid(g)
    sigma = jnp.sqrt(var)
    drift = slope * (0.5 * var * z - sigma * model.eps(z, t))
    return z + dt * drift + sigma * jnp.sqrt(slope * dt) * noise


def langevin_step(model: EpsModel, z, t, noise, *, snr=None, step_lr=None, scale=1.0):
    """One Langevin step at time t with the SNR rule (snr given) or e = step_lr sigma_t^2.

    Args:
      model: the Model.
      z: current batch.
      t: time whose marginal is targeted.
      noise: standard normal, like z.
      snr: target signal-to-noise ratio r (SNR rule).
      step_lr: Song & Ermon's step constant (used when snr is None).
      scale: the factor a in the SNR rule.

    Returns:
      The updated batch.
    """
    var = jax.nn.sigmoid(model.gamma(t))
    score = -model.eps(z, t) / jnp.sqrt(var)
    if snr is not None:
        # ||xi||^2 is replaced by its mean D and ||score||^2 by its batch mean: per-example
        # norms are heavy-tailed in low dimension (a z near the mode has a tiny score and
        # would take a huge step); in image dimensions both equal Song et al.'s batch means.
        dims = math.prod(z.shape[1:])
        score_sq = jnp.mean(jnp.sum(jnp.square(score.reshape(z.shape[0], -1)), axis=1))
        e = 2.0 * scale * snr**2 * dims / jnp.maximum(score_sq, 1e-20)
    else:
        e = step_lr * var
    return z + e * score + jnp.sqrt(2.0 * e) * noise


@CORRECTORS.register("langevin")
def langevin_corrector(model: EpsModel, z, t, s, key, shape, batch_sharding=None, *, snr=0.16):
    """One Langevin step at t with the SNR rule, a = alpha_t^2 / alpha_s^2 over the grid step
    (Song et al.'s VP corrector)."""
    g_t, g_s = model.gamma(t), model.gamma(s)
    a = jnp.exp(jax.nn.log_sigmoid(-g_t) - jax.nn.log_sigmoid(-g_s))
    return langevin_step(model, z, t, normal(key, shape, batch_sharding), snr=snr, scale=a)


@CORRECTORS.register("none")
def no_corrector(model: EpsModel, z, t, s, key, shape, batch_sharding=None):
    """No correction (predictor-only sampling)."""
    del model, t, s, key, shape, batch_sharding
    return z
