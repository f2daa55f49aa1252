"""The decoder p(x | z_0): discretised for integer data, Gaussian for continuous data.

Integer data x in {0, ..., V-1} (V = vocab_size; 256 for 8-bit images, 17 for the digits) is
embedded at bin centres e(x) = 2 (x + 0.5) / V - 1 in (-1, 1). The discretised decoder has no
parameters: each value v scores -0.5 ((z_0 / alpha_0 - e(v)) / (sigma_0 / alpha_0))^2 and a
softmax over v normalises, independently per sub-pixel. Continuous data uses the Gaussian
p(x | z_0) = N(z_0 / alpha_0, (sigma_0 / alpha_0)^2), sigma_0 / alpha_0 = exp(gamma_0 / 2).
"""

import chex
import jax
import jax.numpy as jnp

from vdm.core.diffusion import alpha_sigma, broadcast


def encode(x, vocab_size: int | None):
    """Maps integer data to bin centres in (-1, 1); continuous data (vocab None) passes."""
    if vocab_size is None:
        return jnp.asarray(x)
    return 2.0 * (jnp.asarray(x).astype(jnp.result_type(float)) + 0.5) / vocab_size - 1.0


def _logits(z_0, gamma_0, centres, *, every_value: bool):
    # Unnormalised log-probabilities: of every value (centres [V]; result z_0.shape + (V,)),
    # or of one value per sub-pixel (centres shaped like z_0).
    g0 = broadcast(gamma_0, z_0)
    alpha_0, _ = alpha_sigma(g0)
    z_scaled, inv_stdev = z_0 / alpha_0, jnp.exp(-0.5 * g0)
    if every_value:
        z_scaled, inv_stdev = z_scaled[..., None], inv_stdev[..., None]
    return -0.5 * jnp.square((z_scaled - centres) * inv_stdev)


def log_probs(z_0, gamma_0, vocab_size: int):
    """Per-sub-pixel log p(x = v | z_0) for every v: shape z_0.shape + (vocab_size,)."""
    chex.assert_type(z_0, float)
    centres = encode(jnp.arange(vocab_size), vocab_size).astype(z_0.dtype)
    return jax.nn.log_softmax(_logits(z_0, gamma_0, centres, every_value=True), axis=-1)


def reconstruction_loss(x, z_0, gamma_0, vocab_size: int | None):
    """-log p(x | z_0) in nats per example, summed over all sub-pixels.

    Args:
      x: integer data [B, ...] (vocab_size given) or continuous data (vocab_size None).
      z_0: latent at t = 0, same shape, from q(z_0 | x).
      gamma_0: gamma(0), scalar or [B].
      vocab_size: number of discrete values, or None for the Gaussian decoder.

    Returns:
      [B] negative log-likelihoods.
    """
    chex.assert_equal_shape([x, z_0])
    axes = tuple(range(1, z_0.ndim))
    if vocab_size is None:
        g0 = broadcast(gamma_0, z_0)
        alpha_0, _ = alpha_sigma(g0)
        resid = jnp.asarray(x, z_0.dtype) - z_0 / alpha_0
        nll = 0.5 * (jnp.square(resid) * jnp.exp(-g0) + g0 + jnp.log(2.0 * jnp.pi))
        return jnp.sum(nll, axis=axes)
    # -log p(x | z_0) = logsumexp_v logit_v - logit_x: the data's own logit is computed
    # directly, so no [..., V] log-softmax or one-hot array is ever stored.
    chex.assert_type(z_0, float)
    centres = encode(jnp.arange(vocab_size), vocab_size).astype(z_0.dtype)
    normaliser = jax.nn.logsumexp(_logits(z_0, gamma_0, centres, every_value=True), axis=-1)
    own = _logits(z_0, gamma_0, encode(x, vocab_size).astype(z_0.dtype), every_value=False)
    return jnp.sum(normaliser - own, axis=axes)


def decode(z_0, gamma_0, vocab_size: int | None, key=None):
    """Turns z_0 into data: the decoder's mode (key None) or a sample from it.

    Returns:
      int32 values in [0, vocab_size) for discrete data; z_0 / alpha_0 (mode) or a Gaussian
      draw for continuous data.
    """
    if vocab_size is None:
        g0 = broadcast(gamma_0, z_0)
        alpha_0, _ = alpha_sigma(g0)
        mean = z_0 / alpha_0
        if key is None:
            return mean
        return mean + jnp.exp(0.5 * g0) * jax.random.normal(key, z_0.shape, z_0.dtype)
    lp = log_probs(z_0, gamma_0, vocab_size)
    if key is None:
        return jnp.argmax(lp, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, lp, axis=-1).astype(jnp.int32)
