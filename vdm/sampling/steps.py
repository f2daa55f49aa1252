"""One-step updates z_t -> z_s of the discrete-time samplers, registered as predictors.

Each takes the EpsModel, the batch z at time t, the next (smaller) time s and the step's
standard-normal noise, so a loop (vdm/sampling/loops.py) or a predictor-corrector sampler can
use any of them. The score-SDE updates (Euler-Maruyama, Langevin) are in vdm/sampling/sde.py.
"""

import jax
import jax.numpy as jnp

from vdm.core import diffusion
from vdm.sampling.model import EpsModel
from vdm.sampling.registries import PREDICTORS


@PREDICTORS.register("ancestral")
def ancestral_step(model: EpsModel, z, t, s, noise):
    """One VDM ancestral step z_t -> z_s ~ N(posterior mean with eps_hat, sigma_s^2 c)."""
    g_t, g_s = model.gamma(t), model.gamma(s)
    mean, var = diffusion.posterior_from_eps(model.eps(z, t), z, g_s, g_t)
    return mean + jnp.sqrt(var) * noise


@PREDICTORS.register("ddim")
def ddim_step(model: EpsModel, z, t, s, noise, eta=0.0):
    """One DDIM step: alpha_s x_hat + sqrt(sigma_s^2 - v) eps_hat + sqrt(v) noise.

    v = eta^2 sigma_s^2 c is eta^2 times the ancestral variance (c = -expm1(gamma_s -
    gamma_t)). The x_hat term is written as (alpha_s / alpha_t)(z - sigma_t eps_hat) so no
    division by a small alpha_t happens on its own.
    """
    g_t, g_s = model.gamma(t), model.gamma(s)
    eps = model.eps(z, t)
    alpha_ts, _ = diffusion.transition(g_s, g_t)
    _, sigma_t = diffusion.alpha_sigma(g_t)
    var_s = jax.nn.sigmoid(g_s)
    var_eta = eta**2 * var_s * -jnp.expm1(g_s - g_t)
    return (
        (z - sigma_t * eps) / alpha_ts + jnp.sqrt(var_s - var_eta) * eps + jnp.sqrt(var_eta) * noise
    )


@PREDICTORS.register("ddpm")
def ddpm_step(model: EpsModel, z, t, s, noise, variance: str = "beta"):
    """Ho et al. Algorithm 2: (z - beta / sigma_t eps_hat) / sqrt(1 - beta) + std * noise.

    beta = 1 - alpha_t^2 / alpha_s^2 equals sigma2_ts of q(z_t | z_s); the mean is the
    ancestral one, only the variance differs ('beta' or the posterior's sigma_s^2 c).
    """
    g_t, g_s = model.gamma(t), model.gamma(s)
    alpha_ts, beta = diffusion.transition(g_s, g_t)
    _, sigma_t = diffusion.alpha_sigma(g_t)
    mean = (z - beta / sigma_t * model.eps(z, t)) / alpha_ts
    if variance == "beta":
        var = beta
    elif variance == "posterior":
        var = jax.nn.sigmoid(g_s) * -jnp.expm1(g_s - g_t)
    else:
        raise ValueError(f"Unknown DDPM variance {variance!r}; use beta|posterior.")
    return mean + jnp.sqrt(var) * noise
