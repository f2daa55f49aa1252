"""Noise schedules gamma(t) = -log SNR(t) on t in [0, 1], as pure functions of (params, t).

A schedule is a pair of pure functions: `init(key) -> params` (a dict, possibly empty) and
`gamma(params, t) -> gamma_t`. gamma is monotone increasing in t for every parameter value, so
SNR falls from exp(-gamma(0)) to exp(-gamma(1)). Its time derivative, which weights the
continuous-time diffusion loss, comes from forward-mode differentiation (`gamma_and_slope`).

Five scalar schedules, each with endpoints gamma(0) = gamma_min, gamma(1) = gamma_max at init
(and a sixth, multivariate, one gamma per data element: vdm/core/multivariate.py):
  fixed_linear    gamma_min + (gamma_max - gamma_min) t
  learned_linear  b + |w| t (VDM's "learnable scalar"), both ends learned
  learned_net     VDM's monotone network: linear part + positive-weight sigmoid branch; with
                  pin_endpoints the shape is normalised so gamma(0), gamma(1) are held exactly
  cosine          the cosine schedule (Nichol & Dhariwal) expressed in log-SNR, with its time
                  range chosen so that it hits the same endpoints
  ddpm            DDPM's linear-beta schedule (log alpha^2 quadratic in t), likewise rescaled
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vdm.registry import Registry

Params = dict[str, Any]


class Schedule(NamedTuple):
    """A noise schedule: `gamma(params, t)` is -log SNR at time t (any shape).

    event_shape is () for a scalar schedule (gamma has t's shape) and the data shape for a
    multivariate one (vdm.core.multivariate: gamma has shape t.shape + event_shape).
    """

    name: str
    init: Callable[[jax.Array], Params]
    gamma: Callable[[Params, jax.Array], jax.Array]
    event_shape: tuple = ()


def network_gamma(gamma):
    """The [B] gamma a network is conditioned on: gamma itself, or for a per-element gamma
    [B, ...] its mean over the elements (increasing in t, so it identifies the time)."""
    gamma = jnp.asarray(gamma)
    if gamma.ndim <= 1:
        return gamma
    return jnp.mean(gamma.reshape(gamma.shape[0], -1), axis=1)


def gamma_and_slope(schedule: Schedule, params: Params, t: jax.Array):
    """Returns (gamma(t), d gamma / d t) elementwise, by one forward-mode pass."""
    t = jnp.asarray(t, jnp.result_type(float))
    return jax.jvp(lambda tt: schedule.gamma(params, tt), (t,), (jnp.ones_like(t),))


def endpoints(schedule: Schedule, params: Params):
    """Returns (gamma(0), gamma(1))."""
    g = schedule.gamma(params, jnp.array([0.0, 1.0]))
    return g[0], g[1]


def fixed_linear(gamma_min: float = -13.3, gamma_max: float = 5.0) -> Schedule:
    """Linear gamma with fixed endpoints (no parameters)."""

    def gamma(params, t):
        del params
        # Interpolating from both ends returns gamma_min, gamma_max exactly at t = 0, 1; the
        # form gamma_min + (gamma_max - gamma_min) t misses gamma_max by 2 ulps in float32.
        return gamma_min * (1.0 - t) + gamma_max * t

    return Schedule("fixed_linear", lambda key: {}, gamma)


def learned_linear(gamma_min: float = -13.3, gamma_max: float = 5.0) -> Schedule:
    """gamma(t) = b + |w| t; the absolute value keeps it monotone for any w."""

    def init(key):
        del key
        return {"w": jnp.asarray(gamma_max - gamma_min), "b": jnp.asarray(gamma_min)}

    def gamma(params, t):
        return params["b"] + jnp.abs(params["w"]) * t

    return Schedule("learned_linear", init, gamma)


def learned_net(
    gamma_min: float = -13.3,
    gamma_max: float = 5.0,
    n_features: int = 1024,
    pin_endpoints: bool = False,
) -> Schedule:
    """VDM's monotone network: l1(t) + l3(phi(l2(t))) / n_features, all kernels made positive.

    phi(h) = 2 (sigmoid(h) - 0.5). Each branch is increasing in t because every kernel is
    used through its absolute value and phi is increasing, so gamma is monotone by
    construction. With pin_endpoints, gamma(t) = gamma_min + (gamma_max - gamma_min) *
    (f(t) - f(0)) / (f(1) - f(0)): the network only shapes the curve and the endpoints stay
    exactly where the config puts them (the published code lets them drift).

    Args:
      gamma_min, gamma_max: endpoints at initialisation (exactly, when pinned).
      n_features: width of the sigmoid branch.
      pin_endpoints: normalise the shape so the endpoints are fixed.

    Returns:
      A Schedule.
    """

    def init(key):
        k2, k3 = jax.random.split(key)
        return {
            "l1_w": jnp.asarray(gamma_max - gamma_min),
            "l1_b": jnp.asarray(gamma_min),
            "l2_w": 0.01 * jax.random.normal(k2, (n_features,)),
            "l2_b": jnp.zeros((n_features,)),
            "l3_w": 0.01 * jax.random.normal(k3, (n_features,)),
        }

    def raw(params, t):
        t = jnp.asarray(t)[..., None]
        linear = params["l1_b"] + jnp.abs(params["l1_w"]) * t[..., 0]
        h = 2.0 * (jax.nn.sigmoid(t * jnp.abs(params["l2_w"]) + params["l2_b"]) - 0.5)
        return linear + (h @ jnp.abs(params["l3_w"])) / n_features

    def gamma(params, t):
        if not pin_endpoints:
            return raw(params, t)
        t = jnp.asarray(t)
        f0, f1 = raw(params, 0.0), raw(params, 1.0)
        frac = (raw(params, t) - f0) / (f1 - f0)
        # A batched raw(t) reduces over the features in another order than the scalar f0, f1,
        # so frac at t = 0 or 1 can be off by a few ulps (seen under jit). Snap the value
        # there; stop_gradient keeps frac's own derivatives (in t and in params).
        snap = jnp.where(t == 0.0, -frac, jnp.where(t == 1.0, 1.0 - frac, 0.0))
        frac = frac + jax.lax.stop_gradient(snap)
        return gamma_min * (1.0 - frac) + gamma_max * frac

    return Schedule("learned_net", init, gamma)


def cosine(gamma_min: float = -13.3, gamma_max: float = 5.0) -> Schedule:
    """Cosine schedule in log-SNR form: gamma = 2 log tan(pi u / 2), u affine in t.

    alpha^2 = cos^2(pi u / 2) gives SNR = cot^2(pi u / 2); u's range is solved so the
    endpoints are exactly gamma_min and gamma_max.
    """
    # Python floats (double precision, weakly typed) rather than float32 arrays, so the
    # endpoints are exact to the precision of whatever dtype t has (float64 included).
    u0 = 2.0 / math.pi * math.atan(math.exp(gamma_min / 2.0))
    u1 = 2.0 / math.pi * math.atan(math.exp(gamma_max / 2.0))

    def gamma(params, t):
        del params
        u = u0 + (u1 - u0) * t
        return 2.0 * jnp.log(jnp.tan(jnp.pi * u / 2.0))

    return Schedule("cosine", lambda key: {}, gamma)


def ddpm(gamma_min: float = -13.3, gamma_max: float = 5.0, beta_min: float = 0.1) -> Schedule:
    """DDPM's linear-beta schedule: -log alpha^2 = c + beta_min t + (beta_1 - beta_min) t^2 / 2.

    Then gamma = log(expm1(-log alpha^2)). The offset c and beta_1 are solved so that the
    endpoints equal gamma_min and gamma_max (softplus inverts log expm1).
    """

    # Solved in double precision for the same reason as in `cosine`.
    def softplus(g):
        return math.log1p(math.exp(-abs(g))) + max(g, 0.0)

    c = softplus(gamma_min)
    beta_1 = 2.0 * (softplus(gamma_max) - c) - beta_min

    def gamma(params, t):
        del params
        neg_log_alpha2 = c + beta_min * t + 0.5 * (beta_1 - beta_min) * t**2
        return jnp.log(jnp.expm1(neg_log_alpha2))

    return Schedule("ddpm", lambda key: {}, gamma)


# gamma_min / gamma_max are every schedule's endpoints (config.schedule.gamma_min/max); any
# other keyword of a factory is that schedule's option (config.schedule.<name>.<option>).
# data_shape reaches only a schedule whose signature names it (the multivariate one).
SCHEDULES = Registry("schedule", context=("gamma_min", "gamma_max", "data_shape"))
for _factory in (fixed_linear, learned_linear, learned_net, cosine, ddpm):
    SCHEDULES.register(_factory.__name__, _factory)

# Defined in its own module (it needs Schedule, above); registered here so that every user of
# SCHEDULES, the config schema included, sees it.
from vdm.core.multivariate import multivariate  # noqa: E402

SCHEDULES.register("multivariate", multivariate)


def build_schedule(
    name: str, options=None, *, gamma_min: float, gamma_max: float, data_shape: tuple = ()
) -> Schedule:
    """Builds the registered schedule `name`.

    Args:
      name: a SCHEDULES name (fixed_linear|learned_linear|learned_net|cosine|ddpm|...).
      options: that schedule's own options (e.g. learned_net's n_features, pin_endpoints).
      gamma_min, gamma_max: the endpoints gamma(0), gamma(1) at initialisation.
      data_shape: one example's shape (used by the multivariate schedule only).

    Returns:
      A Schedule.
    """
    return SCHEDULES.build(
        name, options, gamma_min=gamma_min, gamma_max=gamma_max, data_shape=data_shape
    )
