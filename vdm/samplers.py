"""Samplers: ancestral (VDM), DDPM and DDIM here, SDE/PC/Langevin and the PF-ODE elsewhere.

`sample(name, denoise_fn, schedule, schedule_params, key, shape, ...)` is the registry every
caller uses; `sample_z0` returns the latent at t = 0 before the decoder (for tests and
likelihood work). Every sampler is a pure function of its key, run under jit with lax loops,
and draws all noise for the global batch shape, so results do not depend on the device count.

Registry names and their options (beyond the common ones num_classes, batch_sharding, decode):
  ancestral  VDM's p(z_s | z_t) = q(z_s | z_t, x_hat), noise at every step
  ddpm       Ho et al. Algorithm 2; variance='beta' (sigma^2 = beta_t) | 'posterior'
  ddim       eta in [0, 1] (0: deterministic, 1: identical to ancestral)
  sde        reverse-time Euler-Maruyama for the VP SDE of gamma(t)
  pc         predictor-corrector: predictor=ancestral|ddim|sde, corrector_steps, snr, eta
  langevin   annealed Langevin over the grid: steps_each, snr | step_rule='sigma', step_lr
  ode        probability-flow ODE: solver=heun|euler|tsit5|dopri5, rtol, atol, max_steps, t_eps
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdm import decoder, diffusion, ode, sde_samplers
from vdm.sampler_base import Model, build_model, normal, reverse_loop


def ancestral_step(model: Model, z, t, s, noise):
    """One VDM ancestral step z_t -> z_s ~ N(posterior mean with eps_hat, sigma_s^2 c)."""
    g_t, g_s = model.gamma(t), model.gamma(s)
    mean, var = diffusion.posterior_from_eps(model.eps(z, t), z, g_s, g_t)
    return mean + jnp.sqrt(var) * noise


def ddim_step(model: Model, z, t, s, noise, eta=0.0):
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


def ddpm_step(model: Model, z, t, s, noise, variance: str = "beta"):
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


def ancestral(model: Model, key, shape, steps: int, *, batch_sharding=None):
    """VDM's ancestral sampler on a uniform grid of `steps`; returns z_0."""

    def step(z, t, s, i, k):
        return ancestral_step(model, z, t, s, normal(k, shape, batch_sharding))

    return reverse_loop(step, key, shape, steps, batch_sharding)


def ddpm(model: Model, key, shape, steps: int, *, variance: str = "beta", batch_sharding=None):
    """DDPM sampling (no noise on the last step, as in Algorithm 2); returns z_0."""

    def step(z, t, s, i, k):
        noise = normal(k, shape, batch_sharding) * (i > 1)
        return ddpm_step(model, z, t, s, noise, variance)

    return reverse_loop(step, key, shape, steps, batch_sharding)


def ddim(model: Model, key, shape, steps: int, *, eta: float = 0.0, batch_sharding=None):
    """DDIM with stochasticity eta on `steps` uniform steps; returns z_0."""

    def step(z, t, s, i, k):
        return ddim_step(model, z, t, s, normal(k, shape, batch_sharding), eta)

    return reverse_loop(step, key, shape, steps, batch_sharding)


# name -> (function, options it accepts). Functions take (model, key, shape, steps, **opts).
SAMPLERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "ancestral": (ancestral, ()),
    "ddpm": (ddpm, ("variance",)),
    "ddim": (ddim, ("eta",)),
    "sde": (sde_samplers.euler_maruyama, ()),
    "pc": (sde_samplers.predictor_corrector, ("predictor", "corrector_steps", "snr", "eta")),
    "langevin": (sde_samplers.annealed_langevin, ("steps_each", "snr", "step_rule", "step_lr")),
    "ode": (ode.sample, ("solver", "rtol", "atol", "max_steps", "t_eps")),
}
_COMMON = ("num_classes", "batch_sharding")


def _final_time(sampler: str, options: dict) -> float:
    return float(options.get("t_eps", 0.0)) if sampler == "ode" else 0.0


def _z0(sampler, denoise_fn, schedule, shape, steps, parameterization, guidance, options,
        schedule_params, key, cond, null_cond):  # fmt: skip
    opts = dict(options)
    model = build_model(
        denoise_fn,
        schedule,
        schedule_params,
        parameterization=parameterization,
        cond=cond,
        guidance=guidance,
        null_cond=null_cond,
        num_classes=opts.pop("num_classes", None),
    )
    fn, _ = SAMPLERS[sampler]
    return fn(model, key, shape, steps, **opts)


def _samples(vocab_size, mode, sampler, denoise_fn, schedule, shape, steps, parameterization,
             guidance, options, schedule_params, key, cond, null_cond):  # fmt: skip
    k_z, k_dec = jax.random.split(key)
    z0 = _z0(sampler, denoise_fn, schedule, shape, steps, parameterization, guidance, options,
             schedule_params, k_z, cond, null_cond)  # fmt: skip
    g_end = schedule.gamma(schedule_params, jnp.asarray(_final_time(sampler, dict(options))))
    g_end = jnp.broadcast_to(g_end, z0.shape[:1])
    return decoder.decode(z0, g_end, vocab_size, key=k_dec if mode == "sample" else None)


# Everything but the parameters, key and conditioning is static (compiled in).
_z0_jit = jax.jit(_z0, static_argnums=tuple(range(8)))
_samples_jit = jax.jit(_samples, static_argnums=tuple(range(10)))


def _static_args(sampler, denoise_fn, schedule, shape, steps, parameterization, guidance,
                 options):  # fmt: skip
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
    allowed = SAMPLERS[sampler][1] + _COMMON
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Sampler {sampler!r} got unknown options {unknown}; has {allowed}.")
    frozen = tuple(sorted(options.items()))
    return (sampler, denoise_fn, schedule, tuple(shape), int(steps), parameterization,
            guidance, frozen)  # fmt: skip


def sample_z0(
    sampler: str,
    denoise_fn,
    schedule,
    schedule_params,
    key,
    shape,
    *,
    steps: int,
    parameterization: str = "eps",
    cond=None,
    guidance: float = 0.0,
    null_cond=None,
    **options,
):
    """The sampler's latent z at its final time (t = 0, or t_eps for the ODE), not decoded.

    Same arguments as `sample` except vocab_size and decode; uses `key` itself where `sample`
    uses its first split. Jit-compiled once per (sampler, denoiser, schedule, shape, steps,
    parameterization, guidance, options).
    """
    static = _static_args(
        sampler, denoise_fn, schedule, shape, steps, parameterization, guidance, options
    )
    return _z0_jit(*static, schedule_params, key, cond, null_cond)


def sample(
    sampler: str,
    denoise_fn,
    schedule,
    schedule_params,
    key,
    shape,
    *,
    vocab_size,
    steps: int,
    parameterization: str = "eps",
    cond=None,
    guidance: float = 0.0,
    null_cond=None,
    **options,
):
    """Draws a batch of samples with the named sampler and decodes z_0 to data.

    Args:
      sampler: a key of SAMPLERS (ancestral|ddpm|ddim|sde|pc|langevin|ode).
      denoise_fn: (z_t, gamma_t [B], cond) -> prediction of kind `parameterization`.
      schedule, schedule_params: the noise schedule and its (possibly learned) parameters.
      key: PRNG key.
      shape: the global batch shape (B, ...).
      vocab_size: number of discrete values, or None for continuous data.
      steps: grid steps (noise levels for langevin; fixed steps or the first step 1/steps
        for the ODE's adaptive solvers).
      parameterization: eps|x|v|score.
      cond: conditioning (None, or a dict with 'label' and/or 'aug').
      guidance: classifier-free guidance weight w (0: unconditional, 1: conditional); a
        Python number (it is compiled in).
      null_cond: conditioning of the unconditional branch (default: cond with the null label
        num_classes, which must then be given as an option).
      **options: the sampler's options (module docstring), num_classes, batch_sharding (a
        Sharding of the batch axis), decode='argmax'|'sample'.

    Returns:
      int32 [B, ...] in [0, vocab_size), or float [B, ...] for continuous data.
    """
    mode = options.pop("decode", "argmax")
    if mode not in ("argmax", "sample"):
        raise ValueError(f"Unknown decode mode {mode!r}; use argmax|sample.")
    static = _static_args(
        sampler, denoise_fn, schedule, shape, steps, parameterization, guidance, options
    )
    return _samples_jit(vocab_size, mode, *static, schedule_params, key, cond, null_cond)
