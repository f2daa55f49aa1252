"""The denoiser as every sampler sees it: eps(z, t) with guidance folded in, and gamma(t).

A sampler sees the trained model only through `EpsModel`: eps(z, t) and gamma(t) / gamma'(t)
of the schedule, so any schedule (learned ones included) and any parameterisation work
unchanged. (The score network itself is built by vdm.nets.build_network.)
"""

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from vdm.core import guidance as guidance_lib
from vdm.core.losses import scalar_gamma_input
from vdm.core.schedule_inverse import inverse_gamma
from vdm.core.schedules import Schedule, gamma_and_slope


class EpsModel(NamedTuple):
    """The denoiser as the samplers use it.

    Attributes:
      eps: (z [B, ...], t scalar) -> eps prediction (guided).
      gamma: t -> gamma(t).
      gamma_slope: t -> (gamma(t), gamma'(t)).
      time_of: gamma -> t, the schedule's numerical inverse (for steps in log-SNR).
    """

    eps: Callable
    gamma: Callable
    gamma_slope: Callable
    time_of: Callable | None = None


def eps_model(
    denoise_fn: Callable,
    schedule: Schedule,
    schedule_params,
    *,
    parameterization: str = "eps",
    cond=None,
    guidance: float = 1.0,
    null_cond=None,
    num_classes: int | None = None,
) -> EpsModel:
    """Wraps a denoiser, its schedule and classifier-free guidance into an `EpsModel`.

    Args:
      denoise_fn: (z, gamma [B], cond) -> prediction of kind `parameterization`.
      schedule, schedule_params: the noise schedule and its parameters.
      parameterization: eps|x|v|score.
      cond, guidance, null_cond, num_classes: see `vdm.core.guidance.guided_eps_fn`.

    Returns:
      An EpsModel.
    """
    multi = bool(schedule.event_shape)
    if multi:
        # A per-element gamma: the network sees its mean over the elements (as in training),
        # the eps conversion and the sampler's steps the elements' own values.
        denoise_fn = scalar_gamma_input(denoise_fn)
    eps_fn = guidance_lib.guided_eps_fn(
        denoise_fn,
        parameterization,
        cond=cond,
        guidance=guidance,
        null_cond=null_cond,
        num_classes=num_classes,
    )

    def gamma(t):
        t = jnp.asarray(t, jnp.float32)
        g = schedule.gamma(schedule_params, t)
        # One time for the batch: [1, *shape] broadcasts against z [B, *shape] elementwise.
        return g[None] if multi and t.ndim == 0 else g

    def eps(z, t):
        if multi:
            return eps_fn(z, jnp.broadcast_to(gamma(t), z.shape).astype(z.dtype))
        g = schedule.gamma(schedule_params, jnp.asarray(t, z.dtype))
        return eps_fn(z, jnp.full(z.shape[:1], g, z.dtype))

    return EpsModel(
        eps=eps,
        gamma=gamma,
        gamma_slope=lambda t: gamma_and_slope(schedule, schedule_params, t),
        time_of=lambda g: inverse_gamma(schedule, schedule_params, g),
    )
