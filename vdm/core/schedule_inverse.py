"""The numerical inverse t(gamma) of a monotone noise schedule, for samplers that step in
log-SNR (lambda = -gamma) and must still call the network at a time t.

Every schedule here is monotone increasing in t for every parameter value, so bisection on
[0, 1] always converges, needs nothing but gamma itself (learned schedules with parameters
included), is vectorised over any shape of targets and runs under jit (a fixed number of
halvings in a fori_loop: 40 halve the bracket below float32 resolution of t).
"""

import jax
import jax.numpy as jnp


def inverse_gamma(schedule, params, gamma_target, *, iters: int = 40):
    """t in [0, 1] with schedule.gamma(params, t) = gamma_target, elementwise.

    Args:
      schedule: a vdm.core.schedules.Schedule (gamma increasing in t).
      params: its parameters.
      gamma_target: array of target gamma values (any shape); values outside
        [gamma(0), gamma(1)] map to the nearest end.
      iters: bisection halvings.

    Returns:
      t with gamma_target's shape, float32.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}.")
    g = jnp.asarray(gamma_target, jnp.float32)
    lo, hi = jnp.zeros_like(g), jnp.ones_like(g)

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = schedule.gamma(params, mid) < g
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, halve, (lo, hi))
    return 0.5 * (lo + hi)
