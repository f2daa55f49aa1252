"""Likelihood evaluation: the full-split ELBO in bits/dim, and exact NLL via the PF-ODE.

`evaluate_elbo` makes one deterministic pass over an evaluation split with a caller-built
`terms_fn` (normally a jitted wrapper of `vdm.core.losses.loss_terms`).

`ode_log_prob` gives log p_ODE(z) at time t0 by integrating the PF-ODE (vdm.sampling.ode) up to
t = 1 together with the divergence of its velocity, log p_t0(z) = log N(z_1; 0, I) + int div dt,
the divergence exact (D forward-mode passes, small D) or Hutchinson's estimate with fixed
Rademacher or Gaussian probes. Both assume examples do not interact inside the denoiser (no
batch statistics), so the batch Jacobian is block-diagonal.

`ode_nll` turns that density into a negative log-likelihood of the data, in nats and bits/dim:

  decoder (default; VDM's own model): z_0 ~ q(z_0 | x) = N(alpha_0 e(x), sigma_0^2 I) and
    NLL = -log p(x | z_0) - log p_ODE(z_0) + log q(z_0 | x).
    This is the one-latent variational bound on -log P(x) for the model
    P(x) = int p(x | z_0) p_ODE(z_0) dz_0, p(x | z_0) VDM's decoder. For discrete data the
    decoder is a softmax over the V values, so P sums to one over the V^D possible x and
    -log P(x) >= 0: the bound's expectation cannot be negative, and it is in the published
    convention (bits per integer-valued sub-pixel, like the ELBO). Individual Monte-Carlo
    draws can still dip below zero; means over a split cannot, beyond their noise.
  uniform (discrete data): y = e(x) + (2/V)(u - 1/2), u ~ U[0, 1)^D, i.e. uniform over x's
    bin in [-1, 1], and the ODE's t = 0 latent read as data, z_0 = alpha_0 y:
    NLL = -log p_ODE(alpha_0 y) - D log alpha_0 + D log(V / 2).
    Jensen on P(x) = int_bin p(y) dy >= vol(bin) exp E_u log p(y), vol = (2/V)^D, bounds
    -log P(x) of a (sub-)probability mass function, so again >= 0 in expectation; the
    log(V/2) term converts the [-1, 1] density to integer units (Song et al. 2021's numbers).
  none (continuous data): the density of x itself, NLL = -log p_ODE(alpha_0 x) - D log alpha_0.
All three start the ODE at t_eps (default 0; VDM's gamma_min keeps t = 0 finite), reading
alpha_0, sigma_0 and the decoder at gamma(t_eps).
"""

import functools
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from vdm.core import decoder, diffusion, split_stats
from vdm.sampling import ode
from vdm.sampling.model import eps_model
from vdm.sampling.sharded import constrain


def evaluate_elbo(
    terms_fn: Callable, batches: Iterable[dict], *, key, num_draws: int = 1
) -> dict[str, float]:
    """The negative ELBO of a whole split in bits/dim, with its standard error and breakdown.

    vdm.core.split_stats.evaluate_split with each term converted to its bits/dim share
    (bits/dim = nats / (D ln 2) with one D for every example, so term * bpd / total is exact).

    Args:
      terms_fn: (batch, key) -> dict of per-example [B] arrays with at least 'bpd',
        'diffusion', 'prior', 'recon', 'total' (nats, except bpd); normally jitted.
      batches: iterable of batch dicts, each with 'mask' float [B] (1 real, 0 padding).
      key: PRNG key (batch i, draw d uses fold_in(fold_in(key, i), d)).
      num_draws: Monte-Carlo draws per example.

    Returns:
      {'bpd', 'bpd_stderr', 'diffusion_bpd', 'prior_bpd', 'recon_bpd', 'num_examples'}.
    """

    def shares(batch, k):
        t = terms_fn(batch, k)
        scale = t["bpd"] / t["total"]
        return {
            "bpd": t["bpd"],
            **{f"{n}_bpd": t[n] * scale for n in ("diffusion", "prior", "recon")},
        }

    return split_stats.evaluate_split(shares, batches, key=key, num_draws=num_draws)


# Any per-example estimator over a split (bits/dim, its standard error, its terms' means).
evaluate_estimate = split_stats.evaluate_split


def _tangents(z_like, key, trace: str, num_probes: int, probe: str):
    """The Jacobian-vector-product directions: basis vectors (exact) or fixed probes."""
    d = math.prod(z_like.shape[1:])
    if trace == "exact":
        # e_i in every example at once: the block-diagonal Jacobian's column i per example.
        tangents = jnp.broadcast_to(
            jnp.eye(d).reshape((d, 1) + z_like.shape[1:]), (d,) + z_like.shape
        )
    elif trace == "hutchinson":
        # Fixed for the whole solve: the estimator must be a smooth function of t.
        shape = (num_probes,) + z_like.shape
        if probe == "rademacher":
            tangents = jax.random.rademacher(key, shape, z_like.dtype)
        elif probe == "gaussian":
            tangents = jax.random.normal(key, shape, z_like.dtype)
        else:
            raise ValueError(f"Unknown probe {probe!r}; use rademacher|gaussian.")
    else:
        raise ValueError(f"Unknown trace {trace!r}; use exact|hutchinson.")
    return tangents


def _divergence_fn(velocity: Callable, trace: str):
    """(t, (z, _), tangents) -> (velocity, divergence [B]), exact or Hutchinson."""

    def field(t, state, tangents):
        z, _ = state  # the second entry accumulates int div dt
        b, d = z.shape[0], math.prod(z.shape[1:])
        f, jvp = jax.linearize(lambda zz: velocity(t, zz), z)
        jv = jax.vmap(jvp)(tangents).reshape(tangents.shape[0], b, d)
        if trace == "exact":
            div = jnp.einsum("ibi->b", jv)
        else:
            div = jnp.mean(jnp.sum(jv * tangents.reshape(jv.shape), axis=-1), axis=0)
        return f, div

    return field


_ODE_STATIC = (
    "denoise_fn", "schedule", "parameterization", "t0", "t1", "trace", "num_probes",
    "probe", "solver", "steps", "rtol", "atol", "max_steps", "batch_sharding",
)  # fmt: skip


@functools.partial(jax.jit, static_argnames=_ODE_STATIC)
def ode_log_prob(
    denoise_fn: Callable,
    schedule,
    schedule_params,
    z,
    key,
    *,
    parameterization: str = "eps",
    cond=None,
    t0: float = 0.0,
    t1: float = 1.0,
    trace: str = "hutchinson",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "tsit5",
    steps: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    batch_sharding=None,
) -> dict:
    """log p_ODE(z) of the PF-ODE model (prior N(0, I) at t1) at time t0, per example.

    Args:
      denoise_fn, schedule, schedule_params, parameterization, cond: the model (cond is the
        conditioning of a conditional likelihood; no guidance).
      z: [B, ...] points at time t0.
      key: PRNG key for the Hutchinson probes (unused for the exact trace).
      t0, t1: integration range (t0 < t1).
      trace: exact|hutchinson.
      num_probes, probe: Hutchinson probe count and distribution (rademacher|gaussian).
      solver, steps, rtol, atol, max_steps: see vdm.ode.integrate (adaptive by default).
      batch_sharding: optional sharding of the batch.

    Returns:
      {'log_prob' [B], 'prior_log_prob' [B], 'delta_log_prob' [B] (int div dt),
       'z_end' [B, ...] (the latent at t1), 'num_steps' (one count for the whole batch)}.
    """
    model = eps_model(
        denoise_fn, schedule, schedule_params, parameterization=parameterization, cond=cond
    )

    def velocity(t, zz):
        return constrain(ode.drift(model, t, zz), batch_sharding)

    tangents = _tangents(z, key, trace, num_probes, probe)
    # The step size is controlled on z alone: int div dt is a quadrature along z's path, and
    # its error estimate is rounding noise that would let the device count pick the steps.
    y0 = (z, constrain(jnp.zeros(z.shape[:1], z.dtype), batch_sharding))
    (z_end, delta), num_steps = ode.integrate(
        _divergence_fn(velocity, trace), y0, t0, t1, solver=solver, steps=steps, rtol=rtol,
        atol=atol, max_steps=max_steps, args=tangents, control=lambda y: y[0],
    )  # fmt: skip
    d = math.prod(z.shape[1:])
    flat = z_end.reshape(z.shape[0], -1)
    prior = -0.5 * jnp.sum(jnp.square(flat), axis=1) - 0.5 * d * math.log(2 * math.pi)
    return {
        "log_prob": prior + delta,
        "prior_log_prob": prior,
        "delta_log_prob": delta,
        "z_end": z_end,
        "num_steps": num_steps,
    }


def ode_nll(
    denoise_fn: Callable,
    schedule,
    schedule_params,
    x,
    key,
    *,
    vocab_size: int | None,
    dequantization: str = "decoder",
    t_eps: float = 0.0,
    **ode_options,
) -> dict:
    """Negative log-likelihood of data under the PF-ODE model, in nats and bits/dim.

    Args:
      denoise_fn, schedule, schedule_params: the model.
      x: data [B, ...]: integers in [0, vocab_size), or continuous (vocab_size None).
      key: PRNG key (dequantisation noise and probes).
      vocab_size: number of discrete values, or None.
      dequantization: decoder|uniform|none (module docstring; uniform needs vocab_size,
        none needs continuous data).
      t_eps: start time of the ODE.
      **ode_options: passed to ode_log_prob (parameterization, cond, trace, num_probes, probe,
        solver, steps, rtol, atol, max_steps, batch_sharding).

    Returns:
      Dict of [B] arrays 'nll' (nats), 'bpd', 'log_prob' (log p_ODE at the ODE's start) and
      the scalar 'num_steps'.
    """
    if dequantization not in ("decoder", "uniform", "none"):
        raise ValueError(f"Unknown dequantization {dequantization!r}; use decoder|uniform|none.")
    if dequantization == "uniform" and vocab_size is None:
        raise ValueError("Uniform dequantisation needs discrete data (vocab_size).")
    if dequantization == "none" and vocab_size is not None:
        raise ValueError("dequantization='none' is for continuous data; use decoder|uniform.")
    k_deq, k_ode = jax.random.split(key)
    x_enc = decoder.encode(x, vocab_size)
    n, d = x_enc.shape[0], math.prod(x_enc.shape[1:])
    g = jnp.broadcast_to(schedule.gamma(schedule_params, jnp.asarray(t_eps)), (n,))
    alpha, sigma = diffusion.alpha_sigma(g)
    if dequantization == "decoder":
        eps = constrain(jax.random.normal(k_deq, x_enc.shape, x_enc.dtype),
                        ode_options.get("batch_sharding"))  # fmt: skip
        z0 = diffusion.q_sample(x_enc, g, eps)
        log_q = -0.5 * jnp.sum(jnp.square(eps.reshape(n, -1)), axis=1) - d * (
            jnp.log(sigma) + 0.5 * math.log(2 * math.pi)
        )
        extra = decoder.reconstruction_loss(x, z0, g, vocab_size) + log_q
    else:
        y = x_enc
        if dequantization == "uniform":
            u = jax.random.uniform(k_deq, x_enc.shape, x_enc.dtype)
            y = x_enc + 2.0 / vocab_size * (u - 0.5)
        z0 = diffusion.broadcast(alpha, y) * y
        extra = -d * jnp.log(alpha)
        if dequantization == "uniform":
            extra = extra + d * math.log(vocab_size / 2.0)
    out = ode_log_prob(denoise_fn, schedule, schedule_params, z0, k_ode, t0=t_eps, **ode_options)
    nll = extra - out["log_prob"]
    return {
        "nll": nll,
        "bpd": nll / (d * math.log(2.0)),
        "log_prob": out["log_prob"],
        "num_steps": out["num_steps"],
    }
