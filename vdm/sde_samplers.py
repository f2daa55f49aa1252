"""Score-SDE samplers: reverse-time Euler-Maruyama, predictor-corrector, annealed Langevin.

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

from vdm.sampler_base import Model, normal, reverse_loop


def euler_maruyama_step(model: Model, z, t, s, noise):
    """One reverse-SDE Euler-Maruyama step from t to s < t."""
    g, slope = model.gamma_slope(t)
    dt = t - s
    var = jax.nn.sigmoid(g)
    sigma = jnp.sqrt(var)
    drift = slope * (0.5 * var * z - sigma * model.eps(z, t))
    return z + dt * drift + sigma * jnp.sqrt(slope * dt) * noise


def langevin_step(model: Model, z, t, noise, *, snr=None, step_lr=None, scale=1.0):
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


def euler_maruyama(model: Model, key, shape, steps: int, *, batch_sharding=None):
    """Reverse-time SDE sampling with `steps` Euler-Maruyama steps; returns z_0."""

    def step(z, t, s, i, k):
        return euler_maruyama_step(model, z, t, s, normal(k, shape, batch_sharding))

    return reverse_loop(step, key, shape, steps, batch_sharding)


def predictor_corrector(
    model: Model,
    key,
    shape,
    steps: int,
    *,
    predictor: str = "ancestral",
    corrector_steps: int = 1,
    snr: float = 0.16,
    eta: float = 0.0,
    batch_sharding=None,
):
    """Predictor-corrector sampling: at each grid time, Langevin corrector steps then one
    predictor step down to the next time (Song et al.'s order).

    Args:
      model, key, shape, steps: as for every sampler.
      predictor: ancestral|ddim|sde.
      corrector_steps: Langevin steps per grid time (network evaluations per step: this + 1).
      snr: the corrector's signal-to-noise ratio r.
      eta: DDIM's eta when predictor='ddim'.
      batch_sharding: optional sharding of the batch.

    Returns:
      z_0.
    """
    # Imported here: samplers imports this module for its registry.
    from vdm import samplers

    predictors = {
        "ancestral": samplers.ancestral_step,
        "ddim": lambda m, z, t, s, n: samplers.ddim_step(m, z, t, s, n, eta),
        "sde": euler_maruyama_step,
    }
    if predictor not in predictors:
        raise ValueError(f"Unknown predictor {predictor!r}; use {sorted(predictors)}.")
    predict = predictors[predictor]

    def step(z, t, s, i, k):
        g_t, g_s = model.gamma(t), model.gamma(s)
        a = jnp.exp(jax.nn.log_sigmoid(-g_t) - jax.nn.log_sigmoid(-g_s))

        def correct(j, z):
            noise = normal(jax.random.fold_in(k, j + 1), shape, batch_sharding)
            return langevin_step(model, z, t, noise, snr=snr, scale=a)

        z = jax.lax.fori_loop(0, corrector_steps, correct, z)
        return predict(model, z, t, s, normal(jax.random.fold_in(k, 0), shape, batch_sharding))

    return reverse_loop(step, key, shape, steps, batch_sharding)


def annealed_langevin(
    model: Model,
    key,
    shape,
    steps: int,
    *,
    steps_each: int = 4,
    snr: float = 0.1,
    step_rule: str = "snr",
    step_lr: float = 0.1,
    batch_sharding=None,
):
    """Annealed Langevin dynamics over the noise ladder t_j = j / steps, j = steps-1, ..., 0.

    Starts from N(0, I) (the t = 1 marginal) and runs steps_each Langevin steps at each level,
    ending on the t = 0 marginal; steps * steps_each network evaluations.

    Args:
      model, key, shape, steps: as for every sampler (steps = number of levels).
      steps_each: Langevin steps per level.
      snr: r of the SNR step rule.
      step_rule: 'snr' (Song et al.) or 'sigma' (Song & Ermon: e = step_lr sigma_t^2).
      step_lr: the 'sigma' rule's constant.
      batch_sharding: optional sharding of the batch.

    Returns:
      z_0.
    """
    if step_rule not in ("snr", "sigma"):
        raise ValueError(f"Unknown step_rule {step_rule!r}; use snr|sigma.")
    k_init, k_loop = jax.random.split(key)
    z = normal(k_init, shape, batch_sharding)

    def level(j, z):
        lvl = steps - 1 - j
        t = lvl / steps
        k = jax.random.fold_in(k_loop, lvl)

        def inner(m, z):
            noise = normal(jax.random.fold_in(k, m), shape, batch_sharding)
            if step_rule == "snr":
                return langevin_step(model, z, t, noise, snr=snr)
            return langevin_step(model, z, t, noise, step_lr=step_lr)

        return jax.lax.fori_loop(0, steps_each, inner, z)

    return jax.lax.fori_loop(0, steps, level, z)
