"""Dequantisations for the PF-ODE likelihood: from data x to the ODE's start latent z.

The ODE (vdm.sampling.likelihood.ode_log_prob) gives a density p_ODE(z) of the latent at
t_eps. Each dequantisation here draws z given x and returns the per-example terms, in nats,
that turn -log p_ODE(z) into a bound on (or the value of) -log P(x):

  -log P(x) <= -log p_ODE(z) + dequantization + jacobian          (for one draw; its mean)

with x_enc = e(x) the bin centre in [-1, 1] (vdm.core.decoder.encode), D sub-pixels, V values,
and (alpha, sigma) of gamma(t_eps):

  decoder            z = alpha x_enc + sigma eps, eps ~ N(0, I) (VDM's q(z_0 | x));
                     dequantization = -log p(x | z) + log q(z | x) (VDM's decoder), jacobian = 0.
                     Bits per integer sub-pixel: the decoder is a softmax over the V values.
  uniform            y = x_enc + (2/V)(u - 1/2), u ~ U[0, 1)^D (uniform over x's bin in [-1, 1])
                     and z = alpha y; dequantization = log q(y | x) = D log(V/2) (the bin's
                     volume (2/V)^D: converts the [-1, 1] density to integer units),
                     jacobian = -D log alpha (reading z = alpha y as data y).
  truncated_normal   z = alpha x_enc + sigma eps, eps ~ N(0, I) truncated to the box
                     |eps_i| <= tau = alpha / (sigma V), so that y = z / alpha stays inside x's
                     bin, |y_i - x_enc_i| <= 1/V (Zheng et al. 2023, i-DODE). Its density in
                     y is q(y | x) = (alpha/sigma)^D N(eps; 0, I) / Z^D, Z = erf(tau / sqrt 2);
                     dequantization = log q(y | x) = D log(V/2) + log[(2/V)^D q(y | x)]
                     (the uniform term plus the log-ratio to the uniform density on the bin),
                     jacobian = -D log alpha. Bits per integer sub-pixel, like uniform.
  none               continuous data: z = alpha x, dequantization = 0, jacobian = -D log alpha
                     (the density of x itself, in the data's own units).

The uniform and truncated-normal bounds are Jensen's on P(x) = int_bin p(y) dy with
p(y) = alpha^D p_ODE(alpha y), so -log P(x) of a (sub-)probability mass function: >= 0 in
expectation. With K draws per example, -log (1/K sum_k P(x, z_k) / q(z_k | x)) (importance
weighting, Burda et al. 2016) is a bound as well, and non-increasing in K in expectation.
"""

import math

import jax
import jax.numpy as jnp

from vdm.core import decoder, diffusion
from vdm.sampling.sharded import constrain

DEQUANTIZATIONS = ("decoder", "uniform", "truncated_normal", "none")


def check(dequantization: str, vocab_size: int | None, num_samples: int = 1) -> None:
    """Raises a ValueError naming the problem with a dequantisation and its data."""
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(
            f"Unknown dequantization {dequantization!r}; use {'|'.join(DEQUANTIZATIONS)}."
        )
    if dequantization in ("uniform", "truncated_normal") and vocab_size is None:
        raise ValueError(f"dequantization={dequantization!r} needs discrete data (vocab_size).")
    if dequantization == "none" and vocab_size is not None:
        raise ValueError(
            "dequantization='none' is for continuous data; use decoder|uniform|truncated_normal."
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if dequantization == "none" and num_samples > 1:
        raise ValueError(
            "dequantization='none' draws nothing to importance-weight; use num_samples=1."
        )


def truncation(alpha, sigma, vocab_size: int):
    """tau = alpha / (sigma V): the eps box whose image y = x_enc + (sigma/alpha) eps fills
    x's bin of half-width 1/V in [-1, 1] exactly."""
    return alpha / (sigma * vocab_size)


def dequantize(x, key, *, alpha, sigma, gamma, vocab_size, dequantization, batch_sharding=None):
    """Draws the ODE's start latent z for data x and returns its bound's terms.

    Args:
      x: data [B, ...] (integers in [0, V), or continuous for 'none').
      key: PRNG key for the dequantisation noise.
      alpha, sigma, gamma: [B] schedule values at the ODE's start time t_eps.
      vocab_size: V, or None for continuous data.
      dequantization: decoder|uniform|truncated_normal|none (module docstring).
      batch_sharding: optional sharding of the batch axis.

    Returns:
      (z [B, ...], {'dequantization' [B], 'jacobian' [B]}) with the terms in nats.
    """
    x_enc = decoder.encode(x, vocab_size)
    n, d = x_enc.shape[0], math.prod(x_enc.shape[1:])

    def noise(draw):
        return constrain(draw(key, x_enc.shape, x_enc.dtype), batch_sharding)

    def log_normal(eps):  # log N(eps; 0, I) per example
        flat = jnp.square(eps.reshape(n, -1))
        return -0.5 * jnp.sum(flat, axis=1) - 0.5 * d * math.log(2 * math.pi)

    zero = jnp.zeros((n,), x_enc.dtype)
    if dequantization == "decoder":
        eps = noise(jax.random.normal)
        z = diffusion.q_sample(x_enc, gamma, eps)
        log_q = log_normal(eps) - d * jnp.log(sigma)  # q(z | x) = N(alpha x_enc, sigma^2 I)
        deq = decoder.reconstruction_loss(x, z, gamma, vocab_size) + log_q
        return z, {"dequantization": deq, "jacobian": zero}
    jacobian = -d * jnp.log(alpha)
    if dequantization == "none":
        return diffusion.broadcast(alpha, x_enc) * x_enc, {"dequantization": zero,
                                                           "jacobian": jacobian}  # fmt: skip
    if dequantization == "uniform":
        u = noise(jax.random.uniform)
        y = x_enc + 2.0 / vocab_size * (u - 0.5)
        deq = jnp.full((n,), d * math.log(vocab_size / 2.0), x_enc.dtype)
        return diffusion.broadcast(alpha, y) * y, {"dequantization": deq, "jacobian": jacobian}
    # truncated_normal: the box is per example only through (alpha, sigma), shared by the batch.
    tau = truncation(alpha, sigma, vocab_size)
    tau_b = diffusion.broadcast(tau, x_enc)
    eps = noise(lambda k, s, t: jax.random.truncated_normal(k, -tau_b, tau_b, s, t))
    z = diffusion.broadcast(alpha, x_enc) * x_enc + diffusion.broadcast(sigma, x_enc) * eps
    log_mass = jnp.log(jax.scipy.special.erf(tau / math.sqrt(2.0)))  # log Z, per sub-pixel
    deq = log_normal(eps) + d * (jnp.log(alpha) - jnp.log(sigma) - log_mass)
    return z, {"dequantization": deq, "jacobian": jacobian}
