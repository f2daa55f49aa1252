"""Likelihood evaluation: the full-split ELBO in bits/dim, and exact NLL via the PF-ODE.

`evaluate_elbo` makes one deterministic pass over an evaluation split with a caller-built
`terms_fn` (normally a jitted wrapper of `vdm.core.losses.loss_terms`).

`ode_log_prob` gives log p_ODE(z) at time t0 by integrating the PF-ODE (vdm.sampling.ode) up to
t = 1 together with the divergence of its velocity, log p_t0(z) = log N(z_1; 0, I) + int div dt,
the divergence exact (D reverse-mode passes, small D) or Hutchinson's estimate with fixed
Rademacher or Gaussian probes. Both assume examples do not interact inside the denoiser (no
batch statistics), so the batch Jacobian is block-diagonal.

`ode_nll` turns that density into a negative log-likelihood of the data, in nats and bits/dim,
with a per-term breakdown (prior, divergence, dequantisation, Jacobian, importance weighting)
that adds up to it. Its dequantisations (vdm.sampling.dequantization), one line each:

  decoder           bits per integer sub-pixel: VDM's one-latent bound -log p(x|z_0)
                    - log p_ODE(z_0) + log q(z_0|x), softmax decoder, >= 0 in expectation.
  uniform           bits per integer sub-pixel: Jensen bound with y uniform over x's bin, the
                    [-1, 1] density converted with D log(V/2), z_0 = alpha_0 y read as data
                    (-D log alpha_0); Song et al. 2021's numbers.
  truncated_normal  bits per integer sub-pixel: i-DODE's (Zheng et al. 2023) bound with eps
                    truncated to |eps| <= alpha/(sigma V), so z/alpha stays in x's bin.
  none              the continuous data's own density: -log p_ODE(alpha_0 x) - D log alpha_0.
All start the ODE at t_eps (default 0; VDM's gamma_min keeps t = 0 finite), reading alpha_0,
sigma_0, the decoder and the truncation at gamma(t_eps); the stochastic ones take K draws per
example (num_samples) and report the importance-weighted bound, tighter as K grows.
"""

import functools
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from vdm.core import diffusion, split_stats
from vdm.sampling import dequantization as dequantization_lib
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

# Divergence estimators and Hutchinson probe distributions (`trace`, `probe`).
TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


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
            raise ValueError(f"Unknown probe {probe!r}; use {'|'.join(PROBES)}.")
    else:
        raise ValueError(f"Unknown trace {trace!r}; use {'|'.join(TRACES)}.")
    return tangents


def _divergence_fn(velocity: Callable, trace: str, div_scale: float = 1.0):
    """(t, (z, _), tangents) -> (velocity, div_scale * divergence [B]), exact or Hutchinson."""

    def field(t, state, tangents):
        z, _ = state  # the second entry accumulates int div dt
        b, d = z.shape[0], math.prod(z.shape[1:])
        # Reverse mode (v^T J), not forward: the networks' fused GroupNorm is a custom_vjp,
        # which has no forward-mode rule. The trace is the same either way.
        f, vjp = jax.vjp(lambda zz: velocity(t, zz), z)
        (vj,) = jax.vmap(vjp)(tangents)
        vj = vj.reshape(tangents.shape[0], b, d)
        if trace == "exact":
            div = jnp.einsum("ibi->b", vj)
        else:
            div = jnp.mean(jnp.sum(vj * tangents.reshape(vj.shape), axis=-1), axis=0)
        return f, div_scale * div

    return field


_ODE_STATIC = (
    "denoise_fn", "schedule", "parameterization", "t0", "t1", "trace", "num_probes",
    "probe", "solver", "time", "steps", "rtol", "atol", "density_tol", "max_steps",
    "pcoeff", "icoeff", "batch_sharding",
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
    time: str = "t",
    steps: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    density_tol: float = 0.0,
    max_steps: int = 4096,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
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
      solver, steps, rtol, atol, max_steps, pcoeff, icoeff: see vdm.sampling.ode.integrate
        (adaptive by default).
      density_tol: 0: the controller bounds the state's error only, and the log-density
        integral is a quadrature on its steps. > 0: the log-density's own error is
        bounded too: absolute tolerance density_tol bits/dim per example, plus rtol of its
        size, so the state's rtol/atol can be looser than the likelihood's accuracy needs.
      time: one of vdm.sampling.ode.TIMES: t, gamma = -log SNR ('log_snr'; the density change
        is the same integral of the divergence, taken in the other variable), or EDM's
        sigma / alpha ('sigma') or its log ('log_sigma') with the state z / alpha (the
        change of variables adds D log(alpha_1 / alpha_0)).
      batch_sharding: optional sharding of the batch.

    Returns:
      {'log_prob' [B], 'prior_log_prob' [B], 'delta_log_prob' [B]
       (log p - prior: int div ds and the scaling),
       'z_end' [B, ...] (the latent at t1), 'num_steps' (one count for the whole batch)}.
    """
    model = eps_model(
        denoise_fn, schedule, schedule_params, parameterization=parameterization, cond=cond
    )

    flow = ode.time_change(model, time, t0, t1)

    def velocity(s, y):
        return constrain(flow.field(s, y), batch_sharding)

    if density_tol < 0:
        raise ValueError(f"density_tol must be >= 0 bits/dim (0: z alone), got {density_tol}.")
    tangents = _tangents(z, key, trace, num_probes, probe)
    d = math.prod(z.shape[1:])
    if not density_tol:
        # The step size is controlled on the state alone: int div ds is a quadrature along its
        # path, and at tight tolerances its error estimate is rounding noise that would let the
        # device count pick the steps.
        scale, control = 1.0, lambda y: (y[0],)
    else:
        # The controller has one atol; integrating scale * div instead of div gives the
        # accumulator an absolute tolerance of atol / scale: density_tol bits/dim, in nats.
        # rtol applies to it as to z: a relative accuracy of the log-density, which measured
        # fewer steps for the same accuracy than an absolute bound alone on the digits model.
        scale, control = atol / (density_tol * d * math.log(2.0)), lambda y: y
    field = _divergence_fn(velocity, trace, div_scale=scale)
    y0 = (flow.scale0 * z, constrain(jnp.zeros(z.shape[:1], z.dtype), batch_sharding))
    (y_end, div_integral), num_steps = ode.integrate(
        field, y0, flow.s0, flow.s1, solver=solver, steps=steps, rtol=rtol, atol=atol,
        max_steps=max_steps, pcoeff=pcoeff, icoeff=icoeff, args=tangents, control=control,
    )  # fmt: skip
    div_integral = div_integral / scale
    z_end = y_end / flow.scale1
    # y = scale * z: the density of z is that of y times scale^D at each end.
    delta = div_integral + d * (jnp.log(flow.scale0) - jnp.log(flow.scale1))
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
    num_samples: int = 1,
    **ode_options,
) -> dict:
    """Negative log-likelihood of data under the PF-ODE model, in nats and bits/dim.

    The K = num_samples draws of every example are solved together as one batch of K B
    examples (one shared step sequence; K times the memory of K = 1).

    Args:
      denoise_fn, schedule, schedule_params: the model.
      x: data [B, ...]: integers in [0, vocab_size), or continuous (vocab_size None).
      key: PRNG key (dequantisation noise and probes).
      vocab_size: number of discrete values, or None.
      dequantization: decoder|uniform|truncated_normal|none (vdm.sampling.dequantization;
        uniform and truncated_normal need vocab_size, none needs continuous data).
      t_eps: start time of the ODE; alpha, sigma, the decoder and the truncation are read at
        gamma(t_eps).
      num_samples: K dequantisation draws per example, combined by importance weighting,
        -log (1/K sum_k P(x, z_k) / q(z_k | x)); 1 for 'none'.
      **ode_options: passed to ode_log_prob (parameterization, cond, trace, num_probes, probe,
        solver, time, steps, rtol, atol, max_steps, pcoeff, icoeff, batch_sharding).

    Returns:
      Dict of [B] arrays in nats 'nll', 'log_prob' (log p_ODE at the start, averaged over the
      K draws); in bits/dim 'bpd' and its terms 'prior_bpd' (-log N(z_1; 0, I)),
      'divergence_bpd' (-int div dt), 'dequantization_bpd', 'jacobian_bpd' (each the mean
      over the K draws) and 'importance_bpd' (the importance-weighting gain, <= 0, zero for
      K = 1), which add up to 'bpd'; 'z_start' [K, B, ...] (the ODE's start latents); and
      the scalar 'num_steps' of the solve.
    """
    dequantization_lib.check(dequantization, vocab_size, num_samples)
    k_deq, k_ode = jax.random.split(key)
    n, k = x.shape[0], num_samples
    d = math.prod(x.shape[1:])
    # The K draws of example i are rows i, B + i, ...: the batch tiled K times.
    x_rep = x if k == 1 else jnp.concatenate([x] * k, axis=0)
    g = jnp.broadcast_to(schedule.gamma(schedule_params, jnp.asarray(t_eps)), (n * k,))
    alpha, sigma = diffusion.alpha_sigma(g)
    options = dict(ode_options)
    sharding = options.get("batch_sharding")
    if k > 1 and options.get("cond") is not None:
        options["cond"] = jax.tree.map(lambda c: jnp.concatenate([c] * k, axis=0), options["cond"])
    z0, terms = dequantization_lib.dequantize(
        constrain(x_rep, sharding), k_deq, alpha=alpha, sigma=sigma, gamma=g,
        vocab_size=vocab_size, dequantization=dequantization, batch_sharding=sharding,
    )  # fmt: skip
    out = ode_log_prob(denoise_fn, schedule, schedule_params, z0, k_ode, t0=t_eps, **options)
    per_draw = {
        "prior": -out["prior_log_prob"],
        "divergence": -out["delta_log_prob"],
        "dequantization": terms["dequantization"],
        "jacobian": terms["jacobian"],
    }
    per_draw = {name: v.reshape(k, n) for name, v in per_draw.items()}
    nll_draws = sum(per_draw.values())  # [K, B]: each draw's own bound
    # -log mean_k exp(-nll_k): the importance-weighted bound over the K draws.
    nll = -(jax.nn.logsumexp(-nll_draws, axis=0) - math.log(k))
    to_bits = 1.0 / (d * math.log(2.0))
    result = {f"{name}_bpd": v.mean(axis=0) * to_bits for name, v in per_draw.items()}
    result["importance_bpd"] = (nll - nll_draws.mean(axis=0)) * to_bits
    result.update(
        nll=nll,
        bpd=nll * to_bits,
        log_prob=out["log_prob"].reshape(k, n).mean(axis=0),
        z_start=z0.reshape((k, n) + z0.shape[1:]),
        num_steps=out["num_steps"],
    )
    return result
