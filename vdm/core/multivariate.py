"""A learned multivariate noise schedule: one monotone gamma_i(t) per data element.

Sahoo et al. 2024 ("Diffusion models with learned adaptive noise") give every sub-pixel its own
noise schedule; this is their schedule without the auxiliary latent that conditions it on x.
gamma_i(t) = g0_i + (g1_i - g0_i) s_i(t), where the shape s_i is a convex combination of fixed
increasing basis functions B_k with B_k(0) = 0 and B_k(1) = 1 (the identity t and sigmoid steps
centred on an even grid of [0, 1], rescaled to run from 0 to 1), with softmax weights. So every
s_i is increasing and runs from 0 to 1 for every parameter value: gamma_i is monotone in t by
construction and its endpoints are g0_i, g1_i. Those are schedule.gamma_min/max (pinned), or
learned per element as b_i and b_i + |w_i| (learn_endpoints).

`per` chooses what shares a schedule: per_pixel gives each element of the data shape its own
(H x W x C schedules for images), per_channel one per channel (the last axis), shared over
positions. Either way gamma(params, t) has shape t.shape + data_shape, and the Schedule's
event_shape says so: the forward process, the ELBO terms and the decoder then work
elementwise (vdm.core.losses), and the network is conditioned on the mean of the gammas, a
strictly increasing function of t (`network_gamma`). Parts that need one scalar gamma per
example refuse the schedule when the run is assembled (vdm.model.check_multivariate).
"""

import jax
import jax.numpy as jnp

from vdm.core.schedules import Schedule

PER = ("per_pixel", "per_channel")

# Slope of the sigmoid basis steps in t: steep enough to bend the curve, finite at both ends.
_STEEPNESS = 8.0


def basis(t, n_basis: int):
    """[..., n_basis + 1] increasing functions of t, each 0 at t = 0 and 1 at t = 1.

    Column 0 is t itself; column k >= 1 is a sigmoid step centred at (k - 0.5) / n_basis.
    """
    t = jnp.asarray(t)[..., None]
    centres = (jnp.arange(n_basis) + 0.5) / n_basis
    lo = jax.nn.sigmoid(-_STEEPNESS * centres)
    hi = jax.nn.sigmoid(_STEEPNESS * (1.0 - centres))
    steps = (jax.nn.sigmoid(_STEEPNESS * (t - centres)) - lo) / (hi - lo)
    return jnp.concatenate([t, steps], axis=-1)


def param_shape(data_shape, per: str) -> tuple:
    """The shape of one schedule parameter: data_shape, or 1s but for the channel axis."""
    data_shape = tuple(int(d) for d in data_shape)
    if per not in PER:
        raise ValueError(f"schedule.multivariate.per={per!r}; use one of {', '.join(PER)}.")
    if not data_shape:
        raise ValueError("The multivariate schedule needs the data shape (data_shape=()).")
    if per == "per_channel":
        return (1,) * (len(data_shape) - 1) + data_shape[-1:]
    return data_shape


def multivariate(
    gamma_min: float = -13.3,
    gamma_max: float = 5.0,
    data_shape: tuple = (),
    per: str = "per_pixel",
    n_basis: int = 8,
    learn_endpoints: bool = False,
) -> Schedule:
    """The multivariate schedule for data of shape `data_shape` (see the module docstring).

    Args:
      gamma_min, gamma_max: every element's endpoints (exactly, when pinned; at init, when
        learned).
      data_shape: one example's shape (the run supplies it).
      per: per_pixel (one schedule per element) | per_channel (one per channel).
      n_basis: sigmoid steps in the shape's basis (besides the identity).
      learn_endpoints: learn g0_i and g1_i per element (else they are gamma_min, gamma_max).

    Returns:
      A Schedule whose gamma(params, t) has shape t.shape + data_shape.
    """
    shape = param_shape(data_shape, per)
    event = tuple(int(d) for d in data_shape)
    if n_basis < 1:
        raise ValueError(f"schedule.multivariate.n_basis must be >= 1, got {n_basis}.")
    if not gamma_max > gamma_min:
        raise ValueError(f"gamma_max ({gamma_max}) must exceed gamma_min ({gamma_min}).")

    def init(key):
        # The identity carries most weight at init, so gamma starts close to linear and the
        # same for every element; random logits break the symmetry a little.
        logits = 0.01 * jax.random.normal(key, shape + (n_basis + 1,))
        logits = logits.at[..., 0].add(2.0)
        params = {"logits": logits}
        if learn_endpoints:
            params["b"] = jnp.full(shape, gamma_min)
            params["w"] = jnp.full(shape, gamma_max - gamma_min)
        return params

    def gamma(params, t):
        t = jnp.asarray(t, jnp.result_type(float))
        tt = t.reshape(t.shape + (1,) * len(event))
        weights = jax.nn.softmax(params["logits"], axis=-1)
        s = jnp.sum(weights * basis(tt, n_basis), axis=-1)
        if learn_endpoints:
            g0, g1 = params["b"], params["b"] + jnp.abs(params["w"])
        else:
            g0, g1 = gamma_min, gamma_max
        return jnp.broadcast_to(g0 * (1.0 - s) + g1 * s, t.shape + event)

    return Schedule("multivariate", init, gamma, event)
