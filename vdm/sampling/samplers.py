"""Drawing samples: `sample(name, denoise_fn, schedule, schedule_params, key, shape, ...)`.

The sampler is looked up by name in the SAMPLERS registry (vdm/sampling/registries.py) and
called with its options; `sample_z0` returns the latent at the sampler's final time before the
decoder (for tests and likelihood work). Every sampler is a pure function of its key, run
under jit with lax loops, and draws all noise for the global batch shape, so results do not
depend on the device count.

Registered samplers and their options (beyond the common ones num_classes, batch_sharding,
decode); the option defaults are the registered functions' signature defaults:
  ancestral  VDM's p(z_s | z_t) = q(z_s | z_t, x_hat), noise at every step
  ddpm       Ho et al. Algorithm 2; variance='beta' (sigma^2 = beta_t) | 'posterior'
  ddim       eta in [0, 1] (0: deterministic, 1: identical to ancestral)
  sde        reverse-time Euler-Maruyama for the VP SDE of gamma(t)
  pc         predictor-corrector: predictor (any PREDICTORS name), corrector (any CORRECTORS
             name), corrector_steps, snr, eta, variance
  langevin   annealed Langevin over the grid: steps_each, snr | step_rule='sigma', step_lr
  ode        probability-flow ODE: solver=heun|euler|bosh3|tsit5|dopri5|dopri8, rtol, atol,
             max_steps, pcoeff, icoeff (step-size controller), t_eps,
             time=t|log_snr|sigma|log_sigma (integrate in t, gamma = -log SNR or EDM's sigma)
  dpm_solver DPM-Solver++ multistep in log-SNR: order=1|2|3, spacing=log_snr|t|edm, rho,
             lower_order_final
  unipc      UniPC predictor-corrector in log-SNR: order=1|2|3, variant=bh1|bh2, and
             dpm_solver's spacing, rho, lower_order_final
"""

import jax
import jax.numpy as jnp

from vdm.core import decoder
from vdm.sampling import dpm_solver, loops, ode, unipc  # noqa: F401  (samplers register on import)
from vdm.sampling.model import eps_model
from vdm.sampling.registries import SAMPLERS

# Options every sampler call accepts besides the sampler's own: guidance's null label count
# and the batch layout.
_COMMON = ("num_classes", "batch_sharding")


def _final_time(options: dict) -> float:
    # Samplers that stop short of t = 0 (the ODE's t_eps) say so through this option.
    return float(options.get("t_eps", 0.0))


def _z0(sampler, denoise_fn, schedule, shape, steps, parameterization, guidance, options,
        schedule_params, key, cond, null_cond):  # fmt: skip
    opts = dict(options)
    model = eps_model(
        denoise_fn,
        schedule,
        schedule_params,
        parameterization=parameterization,
        cond=cond,
        guidance=guidance,
        null_cond=null_cond,
        num_classes=opts.pop("num_classes", None),
    )
    return SAMPLERS.get(sampler).fn(model, key, shape, steps, **opts)


def _samples(vocab_size, mode, sampler, denoise_fn, schedule, shape, steps, parameterization,
             guidance, options, schedule_params, key, cond, null_cond):  # fmt: skip
    k_z, k_dec = jax.random.split(key)
    z0 = _z0(sampler, denoise_fn, schedule, shape, steps, parameterization, guidance, options,
             schedule_params, k_z, cond, null_cond)  # fmt: skip
    g_end = schedule.gamma(schedule_params, jnp.asarray(_final_time(dict(options))))
    g_end = jnp.broadcast_to(g_end, z0.shape if schedule.event_shape else z0.shape[:1])
    return decoder.decode(z0, g_end, vocab_size, key=k_dec if mode == "sample" else None)


# Everything but the parameters, key and conditioning is static (compiled in).
_z0_jit = jax.jit(_z0, static_argnums=tuple(range(8)))
_samples_jit = jax.jit(_samples, static_argnums=tuple(range(10)))


def _static_args(sampler, denoise_fn, schedule, shape, steps, parameterization, guidance,
                 options):  # fmt: skip
    SAMPLERS.check(sampler, options, extra=_COMMON)
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
      sampler: a SAMPLERS name (ancestral|ddpm|ddim|sde|pc|langevin|ode|...).
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
