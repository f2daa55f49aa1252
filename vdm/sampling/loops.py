"""Samplers that walk z_1 ~ N(0, I) down a uniform time grid t_i = i / steps to z_0.

Each loop is a registered sampler (vdm/sampling/registries.py SAMPLERS) built from the one-step
updates in steps.py and sde.py; `pc` composes any registered predictor with any registered
corrector. Every loop is a pure function of its key, run with lax.fori_loop, and draws its
noise from a key folded with the step index, so results do not depend on the device count.
"""

from collections.abc import Callable

import jax

from vdm.sampling import sde
from vdm.sampling.model import EpsModel
from vdm.sampling.registries import CORRECTORS, PREDICTORS, SAMPLERS
from vdm.sampling.sharded import constrain, normal
from vdm.sampling.steps import ancestral_step, ddim_step, ddpm_step


def reverse_loop(step_fn: Callable, key, shape, steps: int, batch_sharding=None, z_init=None):
    """Runs z_1 ~ N(0, I) down the grid t = 1, (steps-1)/steps, ..., 0 with a fori_loop.

    Args:
      step_fn: (z, t, s, i, key_i) -> z_s, one step from t = i / steps to s = (i-1) / steps;
        key_i is this step's key (a pure function of the loop key and i).
      key: PRNG key; split into the initial-noise key and the loop key.
      shape: global batch shape.
      steps: number of steps.
      batch_sharding: optional sharding of the batch.
      z_init: optional starting point instead of prior noise.

    Returns:
      z at t = 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    k_init, k_loop = jax.random.split(key)
    z = normal(k_init, shape, batch_sharding) if z_init is None else z_init

    def body(j, z):
        i = steps - j
        t = i / steps
        s = (i - 1) / steps
        z = step_fn(z, t, s, i, jax.random.fold_in(k_loop, i))
        return constrain(z, batch_sharding)

    return jax.lax.fori_loop(0, steps, body, z)


@SAMPLERS.register("ancestral")
def ancestral(model: EpsModel, key, shape, steps: int, *, batch_sharding=None):
    """VDM's ancestral sampler on a uniform grid of `steps`; returns z_0."""

    def step(z, t, s, i, k):
        return ancestral_step(model, z, t, s, normal(k, shape, batch_sharding))

    return reverse_loop(step, key, shape, steps, batch_sharding)


@SAMPLERS.register("ddpm")
def ddpm(model: EpsModel, key, shape, steps: int, *, variance: str = "beta", batch_sharding=None):
    """DDPM sampling (no noise on the last step, as in Algorithm 2); returns z_0."""

    def step(z, t, s, i, k):
        noise = normal(k, shape, batch_sharding) * (i > 1)
        return ddpm_step(model, z, t, s, noise, variance)

    return reverse_loop(step, key, shape, steps, batch_sharding)


@SAMPLERS.register("ddim")
def ddim(model: EpsModel, key, shape, steps: int, *, eta: float = 0.0, batch_sharding=None):
    """DDIM with stochasticity eta on `steps` uniform steps; returns z_0."""

    def step(z, t, s, i, k):
        return ddim_step(model, z, t, s, normal(k, shape, batch_sharding), eta)

    return reverse_loop(step, key, shape, steps, batch_sharding)


@SAMPLERS.register("sde")
def euler_maruyama(model: EpsModel, key, shape, steps: int, *, batch_sharding=None):
    """Reverse-time SDE sampling with `steps` Euler-Maruyama steps; returns z_0."""

    def step(z, t, s, i, k):
        return sde.euler_maruyama_step(model, z, t, s, normal(k, shape, batch_sharding))

    return reverse_loop(step, key, shape, steps, batch_sharding)


def _with_options(registry, name: str, available: dict) -> Callable:
    """The registered part `name` with those of `available` options that it declares bound."""
    entry = registry.get(name)
    bound = {k: v for k, v in available.items() if k in entry.options}
    return lambda *args: entry.fn(*args, **bound)


@SAMPLERS.register("pc")
def predictor_corrector(
    model: EpsModel,
    key,
    shape,
    steps: int,
    *,
    predictor: str = "ancestral",
    corrector: str = "langevin",
    corrector_steps: int = 1,
    snr: float = 0.16,
    eta: float = 0.0,
    variance: str = "beta",
    batch_sharding=None,
):
    """Predictor-corrector sampling: at each grid time, corrector steps then one predictor
    step down to the next time (Song et al.'s order).

    Any registered predictor (vdm/sampling/registries.py PREDICTORS: ancestral, ddim, ddpm,
    sde, ...) composes with any registered corrector (langevin, none, ...); each receives
    those of this sampler's options that it declares (eta for ddim, variance for ddpm, snr
    for langevin).

    Args:
      model, key, shape, steps: as for every sampler.
      predictor: a PREDICTORS name.
      corrector: a CORRECTORS name.
      corrector_steps: corrector steps per grid time (network evaluations per step: this + 1).
      snr: the Langevin corrector's signal-to-noise ratio r.
      eta: DDIM's eta when predictor='ddim'.
      variance: DDPM's variance when predictor='ddpm'.
      batch_sharding: optional sharding of the batch.

    Returns:
      z_0.
    """
    mine = {"eta": eta, "variance": variance, "snr": snr}
    predict = _with_options(PREDICTORS, predictor, mine)
    correct_once = _with_options(CORRECTORS, corrector, mine)

    def step(z, t, s, i, k):
        def correct(j, z):
            k_j = jax.random.fold_in(k, j + 1)
            return correct_once(model, z, t, s, k_j, shape, batch_sharding)

        z = jax.lax.fori_loop(0, corrector_steps, correct, z)
        return predict(model, z, t, s, normal(jax.random.fold_in(k, 0), shape, batch_sharding))

    return reverse_loop(step, key, shape, steps, batch_sharding)


@SAMPLERS.register("langevin")
def annealed_langevin(
    model: EpsModel,
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
                return sde.langevin_step(model, z, t, noise, snr=snr)
            return sde.langevin_step(model, z, t, noise, step_lr=step_lr)

        return jax.lax.fori_loop(0, steps_each, inner, z)

    return jax.lax.fori_loop(0, steps, level, z)
