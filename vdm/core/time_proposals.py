"""Importance-sampled diffusion time: piecewise-constant proposals over t with exact weights.

The diffusion term is an integral over t in [0, 1]: L = int_0^1 f(t) dt with
f(t) = 0.5 gamma'(t) ||eps - eps_hat(z_t, t)||^2. Drawing t ~ q and weighting f(t) / q(t) keeps
its expectation for any q > 0 and changes only its variance, which is smallest for
q(t) proportional to sqrt(E[f(t)^2]) (Song et al. 2021; Zheng et al. 2023).

A proposal here is K equal bins of t with probabilities p_k: q(t) = K p_k on bin k. It is
sampled by inverting its CDF at uniform u, so the stratification of antithetic u (one shared
offset, (u + i / B) mod 1) carries over to t: importance sampling and antithetic draws combine.

  uniform   p_k = 1 / K: plain uniform t (weight 1).
  schedule  p_k proportional to gamma(t_{k+1}) - gamma(t_k): uniform in log-SNR, from the
            (learned) schedule itself; the same as uniform for a linear schedule.
  adaptive  p_k proportional to sqrt(mean f^2 over the bin), from a histogram of per-t losses
            (`histogram_update`), mixed with uniform by `floor` so no bin starves.
  adaptive_lambda
            Kingma & Gao 2023's adaptive noise schedule: p_k proportional to the running mean
            of the *weighted* diffusion term w(lambda_t) f(t) in the bin. A bin of t is a bin of
            lambda = -gamma(t) (of equal width under a linear schedule), and the density of
            lambda this induces is proportional to E[w(lambda) ||eps - eps_hat||^2], their
            rule. The histogram then records sqrt(w f) (`histogram_values`), so that its mean
            square is the mean of w f.

Everything here is pure: the histogram is state that the caller keeps and passes in.
"""

import jax
import jax.numpy as jnp

PROPOSALS = ("uniform", "schedule", "adaptive", "adaptive_lambda")


def check(proposal: str, bins: int, floor: float) -> None:
    """Raises ValueError naming a bad proposal setting."""
    if proposal not in PROPOSALS:
        raise ValueError(f"Unknown time proposal {proposal!r}; use {'|'.join(PROPOSALS)}.")
    if bins < 1:
        raise ValueError(f"The time proposal needs bins >= 1, got {bins}.")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"The time proposal's floor must be in (0, 1], got {floor}.")


def normalise(weights, floor: float = 1.0):
    """Bin probabilities from non-negative weights, mixed with uniform: (1 - floor) w + floor / K.

    A bin whose weight is zero (never visited) still gets floor / K of the mass.
    """
    weights = jnp.maximum(jnp.asarray(weights, jnp.float32), 0.0)
    k = weights.shape[0]
    total = jnp.sum(weights)
    shaped = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 1.0 / k)
    return (1.0 - floor) * shaped + floor / k


def schedule_bins(gamma_fn, bins: int, floor: float):
    """Bin probabilities proportional to each bin's gamma increment (uniform in log-SNR)."""
    edges = gamma_fn(jnp.linspace(0.0, 1.0, bins + 1))
    return normalise(jax.lax.stop_gradient(jnp.diff(edges)), floor)


def adaptive_bins(mean_sq, floor: float):
    """Bin probabilities proportional to sqrt(mean f^2) of each bin (the variance-optimal q)."""
    return normalise(jnp.sqrt(jnp.maximum(mean_sq, 0.0)), floor)


def weighted_loss_bins(mean_wf, floor: float):
    """Bin probabilities proportional to each bin's mean weighted loss w f (adaptive_lambda)."""
    return normalise(mean_wf, floor)


def histogram_values(proposal: str, f, weight):
    """What the per-t histogram records for `proposal`: its mean square drives the proposal.

    Args:
      proposal: a PROPOSALS name.
      f: [B] unweighted (by importance) diffusion terms, non-negative.
      weight: [B] the loss weighting w(lambda_t) (ones under the ELBO).

    Returns:
      [B]: sqrt(w f) for adaptive_lambda (mean square = mean of w f), f otherwise.
    """
    if proposal == "adaptive_lambda":
        return jnp.sqrt(jnp.maximum(weight * f, 0.0))
    return f


def sample(probs, u):
    """Times t ~ q from uniforms u by the inverse CDF, and their weights 1 / q(t).

    Args:
      probs: [K] bin probabilities (summing to one).
      u: [B] uniforms in [0, 1) (iid or antithetic).

    Returns:
      (t [B] in [0, 1), weight [B] = 1 / (K p_k(t))), neither carrying gradients.
    """
    probs = jax.lax.stop_gradient(probs)
    k = probs.shape[0]
    cdf = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(probs)])
    idx = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, k - 1)
    p = probs[idx]
    within = jnp.clip((u - cdf[idx]) / p, 0.0, 1.0 - 1e-7)
    t = (idx + within) / k
    return t, 1.0 / (k * p)


def density(probs, t):
    """q(t) of the proposal at times t [B]."""
    k = probs.shape[0]
    idx = jnp.clip(jnp.floor(t * k).astype(jnp.int32), 0, k - 1)
    return k * probs[idx]


def histogram_sums(t, values, bins: int, mask=None):
    """Per-bin (count, sum of values^2) of per-example values at times t: [2, K].

    Args:
      t: [B] times.
      values: [B] per-example f(t) (the unweighted diffusion term).
      bins: K.
      mask: optional [B] (1 real, 0 padding).
    """
    idx = jnp.clip(jnp.floor(t * bins).astype(jnp.int32), 0, bins - 1)
    w = jnp.ones_like(values) if mask is None else (mask > 0).astype(values.dtype)
    one_hot = jax.nn.one_hot(idx, bins, dtype=values.dtype) * w[:, None]
    return jnp.stack([jnp.sum(one_hot, 0), one_hot.T @ jnp.square(values)])


def histogram_update(mean_sq, t, values, *, rate: float):
    """Exponential moving average of mean f^2 per bin, updated where the batch has samples.

    Args:
      mean_sq: [K] running mean of f^2 per bin (0 where never seen).
      t, values: [B] times and unweighted per-example diffusion terms of this batch.
      rate: the EMA decay (0.99: a memory of about 100 steps per bin).

    Returns:
      The new [K] running means (no gradient flows into them).
    """
    count, sum_sq = histogram_sums(
        jax.lax.stop_gradient(t), jax.lax.stop_gradient(values), mean_sq.shape[0]
    )
    batch_mean = sum_sq / jnp.maximum(count, 1.0)
    fresh = jnp.where(mean_sq > 0, rate * mean_sq + (1.0 - rate) * batch_mean, batch_mean)
    return jnp.where(count > 0, fresh, mean_sq)
