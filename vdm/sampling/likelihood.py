"""Likelihood evaluation: the full-split ELBO in bits/dim, and exact NLL via the PF-ODE.

`evaluate_elbo` makes one deterministic pass over an evaluation split with a caller-built
`terms_fn` (normally a jitted wrapper of `vdm.core.losses.loss_terms`).

`ode_log_prob` gives log p_ODE(z) at time t0 by integrating the PF-ODE (vdm.sampling.ode) up to
t = 1 together with the divergence of its velocity, log p_t0(z) = log N(z_1; 0, I) + int div dt,
the divergence exact (D reverse-mode passes, small D) or Hutchinson's estimate with fixed
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
import numpy as np

from vdm.core import decoder, diffusion
from vdm.sampling import ode
from vdm.sampling.model import eps_model
from vdm.sampling.sharded import constrain

# The per-batch statistics kept on device, in this order.
_STATS = ("count", "bpd_sum", "bpd_m2", "diffusion", "prior", "recon", "total")


@jax.jit
def _batch_stats(per_draw: dict, mask):
    """Reduces one batch's draw-averaged terms to a few masked scalars.

    The spread is kept as the sum of squared deviations around the batch's own mean (M2),
    which the host combines across batches in float64 (Chan et al.'s parallel variance), so
    a long split in float32 loses no precision to E[x^2] - E[x]^2 cancellation.
    """
    real = mask > 0
    n = jnp.sum(real.astype(jnp.float32))
    bpd = jnp.where(real, per_draw["bpd"], 0.0)
    s = jnp.sum(bpd)
    mean = s / jnp.maximum(n, 1.0)
    m2 = jnp.sum(jnp.where(real, jnp.square(per_draw["bpd"] - mean), 0.0))
    out = [n, s, m2]
    for name in ("diffusion", "prior", "recon", "total"):
        out.append(jnp.sum(jnp.where(real, per_draw[name], 0.0)))
    return jnp.stack(out)


def _merge_moments(stats: np.ndarray):
    """(n, mean, M2) of the split from per-batch [count, sum, M2] rows (Chan et al.)."""
    n_tot, mean, m2 = 0.0, 0.0, 0.0
    for n, s, m2_b in stats[:, :3]:
        if n == 0:
            continue
        mean_b = s / n
        delta = mean_b - mean
        n_new = n_tot + n
        m2 = m2 + m2_b + delta**2 * n_tot * n / n_new
        mean = mean + delta * n / n_new
        n_tot = n_new
    if n_tot == 0:
        raise ValueError("The evaluation saw no real examples (every mask entry was 0).")
    return n_tot, mean, m2


def _combine(stats: np.ndarray) -> dict[str, float]:
    """Merges per-batch [count, sum, M2, ...] rows (float64) into the split's statistics."""
    n_tot, mean, m2 = _merge_moments(stats)
    sums = stats[:, 3:].sum(axis=0)
    diffusion, prior, recon, total = sums / n_tot
    # bits/dim = nats / (D ln 2) with the same D for every example, so the ratio of the mean
    # bpd to the mean total converts each term's nats into its bits/dim share exactly.
    scale = mean / total if total != 0 else 0.0
    std = np.sqrt(m2 / (n_tot - 1)) if n_tot > 1 else 0.0
    return {
        "bpd": float(mean),
        "bpd_stderr": float(std / np.sqrt(n_tot)),
        "diffusion_bpd": float(diffusion * scale),
        "prior_bpd": float(prior * scale),
        "recon_bpd": float(recon * scale),
        "num_examples": int(round(n_tot)),
    }


def evaluate_elbo(
    terms_fn: Callable, batches: Iterable[dict], *, key, num_draws: int = 1
) -> dict[str, float]:
    """The negative ELBO of a whole split in bits/dim, with its standard error and breakdown.

    Deterministic for a fixed key: batch i, draw d uses fold_in(fold_in(key, i), d). Each
    example's terms are averaged over its num_draws (t, eps) draws first, so the standard
    error is the between-example spread of those averages over sqrt(n). Nothing is fetched
    from the devices until the last batch has been dispatched.

    Args:
      terms_fn: (batch, key) -> dict of per-example [B] arrays with at least 'bpd',
        'diffusion', 'prior', 'recon', 'total' (nats, except bpd); normally jitted, with the
        batch already placed on the devices.
      batches: iterable of batch dicts, each with 'mask' float [B] (1 real, 0 padding).
      key: PRNG key.
      num_draws: Monte-Carlo draws per example.

    Returns:
      {'bpd', 'bpd_stderr', 'diffusion_bpd', 'prior_bpd', 'recon_bpd', 'num_examples'}: means
      over real examples (bits/dim) and the number of real examples.
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}.")
    names = ("bpd", "diffusion", "prior", "recon", "total")
    rows = []
    for i, batch in enumerate(batches):
        k_batch = jax.random.fold_in(key, i)
        acc = None
        for d in range(num_draws):
            terms = terms_fn(batch, jax.random.fold_in(k_batch, d))
            step = {n: terms[n] for n in names}
            acc = step if acc is None else jax.tree.map(jnp.add, acc, step)
        per_draw = jax.tree.map(lambda a: a / num_draws, acc)
        rows.append(_batch_stats(per_draw, batch["mask"]))
    if not rows:
        raise ValueError("evaluate_elbo got no batches.")
    stats = np.asarray(jax.device_get(jnp.stack(rows)), np.float64)
    return _combine(stats)


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
        # Reverse mode: v^T J v = (J^T v) . v and (J^T e_i)_i = J_ii, the same estimates as
        # forward mode, but the U-Nets' GroupNorm (and patches convolution) define only a
        # custom VJP, through which JAX cannot take a JVP.
        f, vjp = jax.vjp(lambda zz: velocity(t, zz), z)
        jv = jax.vmap(lambda v: vjp(v)[0])(tangents).reshape(tangents.shape[0], b, d)
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


@jax.jit
def _masked_moments(values, mask):
    """[count, sum, M2] of the masked entries of a [B] array (M2 about the batch's mean)."""
    real = mask > 0
    n = jnp.sum(real.astype(jnp.float32))
    s = jnp.sum(jnp.where(real, values, 0.0))
    mean = s / jnp.maximum(n, 1.0)
    m2 = jnp.sum(jnp.where(real, jnp.square(values - mean), 0.0))
    return jnp.stack([n, s, m2])


def evaluate_estimate(
    estimate_fn: Callable, batches: Iterable[dict], *, key, num_draws: int = 1
) -> dict[str, float]:
    """Mean bits/dim of any per-example estimator over a split, its standard error, and the
    means of its other per-example terms.

    Keys as in `evaluate_elbo` (batch i, draw d uses fold_in(fold_in(key, i), d)); each
    example's draws are averaged before the spread is taken; statistics are reduced on the
    devices per batch and merged on the host in float64.

    Args:
      estimate_fn: (batch, key) -> dict with 'bpd' [B], optionally other [B] terms, and
        optionally a scalar 'num_steps' (solver steps for the batch); normally jitted.
      batches: iterable of batch dicts with 'mask'.
      key: PRNG key.
      num_draws: Monte-Carlo draws per example.

    Returns:
      {'bpd', 'bpd_stderr', 'num_examples', '<term>' means, 'num_steps_mean',
      'num_steps_max'} (the last two when the estimator reports steps).
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}.")
    moments, sums, steps = [], [], []
    for i, batch in enumerate(batches):
        k_batch = jax.random.fold_in(key, i)
        acc = None
        for d in range(num_draws):
            out = estimate_fn(batch, jax.random.fold_in(k_batch, d))
            if "num_steps" in out:
                steps.append(out.pop("num_steps"))
            acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
        mean = jax.tree.map(lambda a: a / num_draws, acc)
        mask = batch["mask"]
        moments.append(_masked_moments(mean["bpd"], mask))
        sums.append({k: jnp.sum(jnp.where(mask > 0, v, 0.0)) for k, v in mean.items()})
    if not moments:
        raise ValueError("evaluate_estimate got no batches.")
    stats = np.asarray(jax.device_get(jnp.stack(moments)), np.float64)
    n_tot, mean, m2 = _merge_moments(stats)
    std = np.sqrt(m2 / (n_tot - 1)) if n_tot > 1 else 0.0
    result = {
        "bpd": float(mean),
        "bpd_stderr": float(std / np.sqrt(n_tot)),
        "num_examples": int(round(n_tot)),
    }
    totals = jax.device_get(sums)
    for name in totals[0]:
        if name != "bpd":
            result[name] = float(sum(float(t[name]) for t in totals) / n_tot)
    if steps:
        counts = np.asarray(jax.device_get(steps), np.float64)
        result["num_steps_mean"], result["num_steps_max"] = (
            float(counts.mean()),
            float(counts.max()),
        )
    return result


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
