"""DPM-Solver++ (Lu et al. 2022), multistep, data-prediction form, stepping in log-SNR.

With lambda = log(alpha / sigma) = -gamma / 2 the PF-ODE's solution from s to t is exactly
  z_t = (sigma_t / sigma_s) z_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_hat dlambda,
so only the data prediction x_hat = (z - sigma eps_hat) / alpha is approximated: by a constant
(order 1, = DDIM), or by a polynomial through the previous one or two steps' x_hat (2M, 3M),
one network evaluation per step. The grid is chosen in gamma (uniform in log-SNR, uniform in
t, or EDM's rho-spacing of sigma / alpha) and mapped to times with the schedule's numerical
inverse (vdm.core.schedule_inverse), so any monotone schedule works, learned ones included.
Guidance comes with the EpsModel; no thresholding (likelihood-trained models do not need it).
"""

import jax
import jax.numpy as jnp

from vdm.sampling.model import EpsModel
from vdm.sampling.registries import SAMPLERS
from vdm.sampling.sharded import constrain, normal

SPACINGS = ("log_snr", "t", "edm")


def step_grid(model: EpsModel, steps: int, spacing: str = "log_snr", rho: float = 7.0):
    """Times and gammas of a `steps`-step grid from t = 1 down to t = 0.

    Args:
      model: the EpsModel (its gamma and time_of).
      steps: number of steps (steps + 1 grid points).
      spacing: log_snr (uniform in gamma), t (uniform in t) or edm (uniform in
        (sigma / alpha)^(1 / rho), Karras et al. 2022).
      rho: EDM's exponent.

    Returns:
      (t [steps + 1], gamma [steps + 1]), decreasing, t[0] = 1 and t[-1] = 0 exactly.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; use one of {SPACINGS}.")
    frac = jnp.linspace(0.0, 1.0, steps + 1)
    if spacing == "t":
        t = 1.0 - frac
        return t, model.gamma(t)
    g1, g0 = model.gamma(1.0), model.gamma(0.0)
    if spacing == "log_snr":
        g = g1 + (g0 - g1) * frac
    else:
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}.")
        # sigma / alpha = exp(gamma / 2); its 1/rho-th power is linear in the step index.
        hi, lo = jnp.exp(g1 / (2 * rho)), jnp.exp(g0 / (2 * rho))
        g = 2 * rho * jnp.log(hi + (lo - hi) * frac)
    t = model.time_of(g)
    # The ends exactly: the inverse is accurate to float resolution, the endpoints must be exact.
    t = t.at[0].set(1.0).at[-1].set(0.0)
    return t, g.at[0].set(g1).at[-1].set(g0)


def _alpha_sigma(g):
    return jnp.sqrt(jax.nn.sigmoid(-g)), jnp.sqrt(jax.nn.sigmoid(g))


@SAMPLERS.register("dpm_solver")
def dpm_solver_pp(
    model: EpsModel,
    key,
    shape,
    steps: int,
    *,
    order: int = 2,
    spacing: str = "log_snr",
    rho: float = 7.0,
    lower_order_final: bool = True,
    batch_sharding=None,
):
    """DPM-Solver++ multistep (order 1, 2M or 3M) from z_1 ~ N(0, I); `steps` network
    evaluations; returns z_0.

    Args:
      model, key, shape, steps: as for every sampler.
      order: 1, 2 (2M) or 3 (3M).
      spacing, rho: the grid (`step_grid`).
      lower_order_final: drop to the order the remaining steps allow at the end (more stable
        for few steps, Lu et al.'s recommendation).
      batch_sharding: optional sharding of the batch.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}.")
    t, g = step_grid(model, steps, spacing, rho)
    lam = -0.5 * g
    z = normal(key, shape, batch_sharding)
    zeros = constrain(jnp.zeros(shape, z.dtype), batch_sharding)  # same layout as x0

    def body(carry, i):
        z, x1, x2, h1, h2 = carry  # previous two data predictions and step sizes
        a_s, s_s = _alpha_sigma(g[i])
        a_t, s_t = _alpha_sigma(g[i + 1])
        x0 = (z - s_s * model.eps(z, t[i])) / a_s
        h = lam[i + 1] - lam[i]
        phi1 = jnp.expm1(-h)
        base = (s_t / s_s) * z - a_t * phi1 * x0
        r0, r1 = h1 / h, h2 / h
        d1_0 = (x0 - x1) / r0
        second = base - 0.5 * a_t * phi1 * d1_0
        d1_1 = (x1 - x2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        third = base + a_t * phi2 * d1 - a_t * phi3 * d2
        k = jnp.minimum(order, i + 1)
        if lower_order_final:
            k = jnp.minimum(k, steps - i)
        z_new = jnp.where(k == 1, base, jnp.where(k == 2, second, third))
        x0 = constrain(x0, batch_sharding)
        return (constrain(z_new, batch_sharding), x0, x1, h, h1), None

    one = jnp.ones((), z.dtype)  # dummy previous steps (never selected before they exist)
    carry, _ = jax.lax.scan(body, (z, zeros, zeros, one, one), jnp.arange(steps))
    return carry[0]
