"""Shared pieces of every sampler: the eps model on a time grid, noise draws, the reverse loop.

A sampler sees the trained model only through `Model`: eps(z, t) (guidance already folded in)
and gamma(t) / gamma'(t) of the schedule, so any schedule (learned ones included) and any
parameterisation work unchanged. Time runs on a uniform grid t_i = i / steps of [0, 1].

Noise is always drawn for the global batch shape from a key folded with the step index, never
per device, so a batch sharded over any number of devices gets the same numbers; with a
`batch_sharding` the draws are also laid out across devices like the batch.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from vdm import guidance as guidance_lib
from vdm.schedules import Schedule, gamma_and_slope


class Model(NamedTuple):
    """The denoiser as the samplers use it.

    Attributes:
      eps: (z [B, ...], t scalar) -> eps prediction (guided).
      gamma: t -> gamma(t).
      gamma_slope: t -> (gamma(t), gamma'(t)).
    """

    eps: Callable
    gamma: Callable
    gamma_slope: Callable


def build_model(
    denoise_fn: Callable,
    schedule: Schedule,
    schedule_params,
    *,
    parameterization: str = "eps",
    cond=None,
    guidance: float = 1.0,
    null_cond=None,
    num_classes: int | None = None,
) -> Model:
    """Wraps a denoiser, its schedule and classifier-free guidance into a `Model`.

    Args:
      denoise_fn: (z, gamma [B], cond) -> prediction of kind `parameterization`.
      schedule, schedule_params: the noise schedule and its parameters.
      parameterization: eps|x|v|score.
      cond, guidance, null_cond, num_classes: see `vdm.guidance.guided_eps_fn`.

    Returns:
      A Model.
    """
    eps_fn = guidance_lib.guided_eps_fn(
        denoise_fn,
        parameterization,
        cond=cond,
        guidance=guidance,
        null_cond=null_cond,
        num_classes=num_classes,
    )

    def eps(z, t):
        g = schedule.gamma(schedule_params, jnp.asarray(t, z.dtype))
        return eps_fn(z, jnp.full(z.shape[:1], g, z.dtype))

    return Model(
        eps=eps,
        gamma=lambda t: schedule.gamma(schedule_params, jnp.asarray(t, jnp.float32)),
        gamma_slope=lambda t: gamma_and_slope(schedule, schedule_params, t),
    )


def explicit_axes() -> tuple[str, ...]:
    """Names of the context mesh's Explicit axes (jax.set_mesh), empty if none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(
        n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Explicit
    )


def constrain(x, batch_sharding):
    """Lays x out like the batch (no-op without a sharding).

    With a mesh context whose axes are Explicit (jax.make_mesh's default, which jit needs
    entered with jax.set_mesh) shardings are part of the array types and `reshard` sets them;
    otherwise (Auto axes, e.g. the trainer's mesh, or inside jax.sharding.auto_axes) a
    sharding constraint guides XLA's propagation.
    """
    if batch_sharding is None:
        return x
    if jax.sharding.get_abstract_mesh().empty:
        if AxisType.Explicit in tuple(getattr(batch_sharding.mesh, "axis_types", ())):
            raise ValueError("A sharding on a mesh with Explicit axes needs jax.set_mesh(mesh).")
        return jax.lax.with_sharding_constraint(x, batch_sharding)
    if explicit_axes():
        return jax.sharding.reshard(x, batch_sharding.spec)
    return jax.lax.with_sharding_constraint(x, batch_sharding.spec)


def normal(key, shape, batch_sharding=None, dtype=jnp.float32):
    """Standard normal noise for the global batch shape."""
    return constrain(jax.random.normal(key, shape, dtype), batch_sharding)


def step_noise(key, i, shape, batch_sharding=None):
    """The noise of grid step i: a pure function of (key, i), identical on any device count."""
    return normal(jax.random.fold_in(key, i), shape, batch_sharding)


def per_example_norm(x):
    """||x|| over all but the batch axis, shaped to broadcast against x."""
    sq = jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True)
    return jnp.sqrt(sq)


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
