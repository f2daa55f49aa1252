"""Tests of vdm.core.decoder: bin encoding, the decoder's probabilities, the reconstruction
loss -log p(x | z_0) and decoding z_0 back to data.

References are closed forms: logistic for two values, the Gaussian density for continuous
data, exact recovery at low noise and the uniform limit at high noise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.core import decoder, diffusion


def test_encode_bin_centres():
    e = np.asarray(decoder.encode(jnp.arange(256), 256))
    np.testing.assert_allclose(e[[0, 255]], [-255 / 256, 255 / 256], rtol=1e-7)
    np.testing.assert_allclose(np.diff(e), 2 / 256, rtol=1e-5)
    x = jnp.array([[0.25, -3.0]])
    assert decoder.encode(x, None) is not None
    np.testing.assert_array_equal(decoder.encode(x, None), x)


DECODER_CASES = (  # (vocab size, shape of z_0): odd sizes and channel counts on purpose
    (2, (8, 1)),
    (17, (8, 3)),
    (256, (8, 2, 2, 5)),
    (7, (8, 4, 4, 1)),
)


@jax.jit
def _decoder_probs(key):
    out = {}
    gamma = jnp.linspace(-13.3, 10.0, 8)  # per example, from sharp to uninformative
    for vocab, shape in DECODER_CASES:
        key, k1 = jax.random.split(key)
        out[str((vocab, shape))] = decoder.log_probs(2 * jax.random.normal(k1, shape), gamma, vocab)
    out["scalar_gamma"] = decoder.log_probs(jnp.zeros((8, 3)), jnp.float32(-13.3), 256)
    return out


def test_decoder_probabilities_sum_to_one():
    out = _decoder_probs(jax.random.PRNGKey(10))
    for vocab, shape in DECODER_CASES:
        lp = np.asarray(out[str((vocab, shape))], np.float64)
        assert lp.shape == shape + (vocab,)
        assert np.all(np.isfinite(lp))
        np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    lp = np.asarray(out["scalar_gamma"], np.float64)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    # z_0 = 0 lies between the two middle bins: half the mass each.
    np.testing.assert_allclose(np.exp(lp[..., 127:129]), 0.5, rtol=1e-5)


@jax.jit
def _recon_by_gamma0(key, x):
    eps = jax.random.normal(key, x.shape)
    out = []
    for g0 in (-25.0, -20.0, -13.3, -8.0, -4.0, 0.0, 4.0, 12.0):
        z0 = diffusion.q_sample(decoder.encode(x, 256), jnp.full((x.shape[0],), g0), eps)
        out.append(decoder.reconstruction_loss(x, z0, g0, 256))
    return jnp.stack(out)


def test_reconstruction_loss_limits():
    x = jnp.asarray(np.random.default_rng(11).integers(0, 256, (512, 3)))
    recon = np.asarray(_recon_by_gamma0(jax.random.PRNGKey(12), x), np.float64).mean(1)
    # Common noise across gamma_0 makes the sample means as monotone as the expectation.
    assert np.all(np.diff(recon) >= 0) and np.all(np.diff(recon[1:]) > 0), recon
    assert recon[0] < 1e-6  # gamma_0 -> -inf: z_0 pins x down exactly
    # gamma_0 = -13.3: bins 2/256 wide against noise exp(-6.65) = 1.3e-3 (3 sigma to the
    # next centre): a small but non-zero cost.
    assert 1e-3 < recon[2] < 0.1
    # gamma_0 high: z_0 says nothing, every value is equally likely.
    assert recon[-1] == pytest.approx(3 * math.log(256), rel=0.01)


def test_reconstruction_loss_binary_closed_form(x64):
    """V = 2 is logistic: -log p(x | z) = softplus(l_other - l_x), from the logits alone."""
    rng = np.random.default_rng(13)
    x = rng.integers(0, 2, (64, 3))
    g0 = rng.uniform(-6.0, 3.0, 64)
    z0 = rng.standard_normal((64, 3))
    got = jax.jit(decoder.reconstruction_loss, static_argnums=3)(x, jnp.asarray(z0), g0, 2)
    alpha = np.sqrt(1 / (1 + np.exp(g0)))[:, None]
    y, s2 = z0 / alpha, np.exp(g0)[:, None]
    e_x, e_o = np.where(x == 1, 0.5, -0.5), np.where(x == 1, -0.5, 0.5)
    diff = -0.5 * ((y - e_o) ** 2 - (y - e_x) ** 2) / s2
    # log_softmax is accurate in absolute terms (1e-16), which is what a loss needs.
    np.testing.assert_allclose(got, np.logaddexp(0, diff).sum(1), rtol=1e-10, atol=1e-14)


def test_gaussian_decoder_closed_form(x64):
    """Continuous data: z_0 / alpha_0 = x + exp(gamma_0 / 2) eps, so
    -log p(x | z_0) = 0.5 sum(eps^2 + gamma_0 + log 2 pi) exactly."""
    rng = np.random.default_rng(14)
    x, eps = rng.standard_normal((32, 4)), rng.standard_normal((32, 4))
    g0 = rng.uniform(-13.3, 2.0, 32)
    z0 = diffusion.q_sample(jnp.asarray(x), g0, jnp.asarray(eps))
    got = jax.jit(decoder.reconstruction_loss, static_argnums=3)(x, z0, g0, None)
    want = 0.5 * np.sum(eps**2 + g0[:, None] + np.log(2 * np.pi), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    mode = decoder.decode(z0, g0, None)
    np.testing.assert_allclose(mode, x + np.exp(g0 / 2)[:, None] * eps, rtol=1e-9, atol=1e-12)


def test_decode_recovers_data_at_low_noise():
    x = jnp.asarray(np.random.default_rng(15).integers(0, 17, (64, 2, 2, 3)))

    @jax.jit
    def roundtrip(key):
        z0 = diffusion.q_sample(
            decoder.encode(x, 17), jnp.full((64,), -20.0), jax.random.normal(key, x.shape)
        )
        return decoder.decode(z0, -20.0, 17), decoder.decode(z0, -20.0, 17, key=key)

    mode, sample = roundtrip(jax.random.PRNGKey(16))
    assert mode.dtype == sample.dtype == jnp.int32
    np.testing.assert_array_equal(mode, x)
    np.testing.assert_array_equal(sample, x)
