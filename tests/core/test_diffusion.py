"""Tests of vdm.diffusion: the forward process in gamma and the eps/x/v/score conversions.

References are written independently of the library: naive textbook formulas (accurate in
float64 away from the extremes), 50-digit decimal arithmetic where float64 itself would be
in doubt, Bayes' rule for the posterior and autodiff of Gaussian log-densities for scores.
"""

from decimal import Decimal, getcontext

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.core import diffusion, oracles

getcontext().prec = 50


def naive(gamma):
    """alpha^2, sigma^2 the way they are usually written, sigma^2 = 1 - alpha^2."""
    alpha2 = 1.0 / (1.0 + np.exp(gamma))
    return alpha2, 1.0 - alpha2


def naive_transition(gs, gt):
    (a2s, s2s), (a2t, s2t) = naive(gs), naive(gt)
    alpha_ts = np.sqrt(a2t / a2s)
    return alpha_ts, s2t - alpha_ts**2 * s2s


def naive_posterior(x, zt, gs, gt):
    """q(z_s | z_t, x) with the DDPM coefficients written in alphas and sigmas."""
    (a2s, s2s), (_, s2t) = naive(gs), naive(gt)
    alpha_ts, s2ts = naive_transition(gs, gt)
    mean = alpha_ts * s2s / s2t * zt + np.sqrt(a2s) * s2ts / s2t * x
    return mean, s2ts * s2s / s2t


def exact_transition(gs, gt):
    """(alpha_ts, sigma2_ts) in 50-digit arithmetic from float gammas."""
    gs, gt = Decimal(float(gs)), Decimal(float(gt))
    a2s, a2t = 1 / (1 + gs.exp()), 1 / (1 + gt.exp())
    alpha_ts = (a2t / a2s).sqrt()
    return float(alpha_ts), float((1 - a2t) - alpha_ts**2 * (1 - a2s))


def exact_posterior(x, zt, gs, gt):
    """Posterior (mean coefficient on z_t, on x, variance) in 50-digit arithmetic."""
    gs, gt = Decimal(float(gs)), Decimal(float(gt))
    a2s, a2t = 1 / (1 + gs.exp()), 1 / (1 + gt.exp())
    s2s, s2t = 1 - a2s, 1 - a2t
    alpha_ts = (a2t / a2s).sqrt()
    s2ts = s2t - alpha_ts**2 * s2s
    cz, cx = alpha_ts * s2s / s2t, a2s.sqrt() * s2ts / s2t
    mean = float(cz) * np.asarray(zt, np.float64) + float(cx) * np.asarray(x, np.float64)
    return mean, float(s2ts * s2s / s2t)


def gamma_pairs(seed, n=64):
    """Pairs gamma_s < gamma_t spread over [-13.3, 5], gaps from 1e-3 to the full range."""
    # numpy draws: test inputs need no jax dispatch (each eager op compiles on first use).
    rng = np.random.default_rng(seed)
    gs = rng.uniform(-13.3, 4.0, n)
    return gs, np.minimum(gs + 10.0 ** rng.uniform(-3.0, 1.2, n), 5.0)


def normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


def test_alpha_sigma_precise(x64):
    gamma = jnp.array([-13.3, -5.0, 0.0, 5.0, 13.3])
    alpha, sigma = jax.jit(diffusion.alpha_sigma)(gamma)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-15)
    np.testing.assert_allclose(sigma**2 / alpha**2, np.exp(gamma), rtol=1e-14)
    # float32 sigma at gamma_min against 50 digits: sqrt(1 - alpha^2) would be ~1% off.
    a32, s32 = diffusion.alpha_sigma(jnp.float32(-13.3))
    want = float((1 / (1 + (-Decimal(float(np.float32(-13.3)))).exp())).sqrt())
    assert abs(float(s32) / want - 1) < 1e-6
    assert abs(float(np.sqrt(1 - np.float32(a32) ** 2)) / want - 1) > 1e-3


def test_transition_matches_naive_float64(x64):
    gs, gt = gamma_pairs(0)
    alpha_ts, sigma2_ts = jax.jit(diffusion.transition)(gs, gt)
    want_a, want_s2 = naive_transition(np.asarray(gs), np.asarray(gt))
    np.testing.assert_allclose(alpha_ts, want_a, rtol=1e-12)
    # Naive sigma^2 = 1 - alpha^2 is itself only good to ~1e-10 relative at gamma = -13.3.
    np.testing.assert_allclose(sigma2_ts, want_s2, rtol=1e-7)


def test_posterior_matches_naive_and_bayes_float64(x64):
    gs, gt = gamma_pairs(1, n=32)
    x, zt = normal(2, 32, 3), normal(3, 32, 3)
    mean, var = jax.jit(diffusion.posterior)(x, zt, gs, gt)
    gs_, gt_ = np.asarray(gs)[:, None], np.asarray(gt)[:, None]
    want_mean, want_var = naive_posterior(np.asarray(x), np.asarray(zt), gs_, gt_)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(np.broadcast_to(var, mean.shape)[:, :1], want_var, rtol=1e-7)
    # Bayes: q(z_s | z_t, x) is proportional to q(z_t | z_s) q(z_s | x); multiply Gaussians.
    (alpha_s, sigma_s), (alpha_ts, sigma2_ts) = jax.jit(
        lambda gs, gt: (diffusion.alpha_sigma(gs), diffusion.transition(gs, gt))
    )(gs_, gt_)
    precision = 1 / sigma_s**2 + alpha_ts**2 / sigma2_ts
    bayes_mean = (alpha_s * x / sigma_s**2 + alpha_ts * zt / sigma2_ts) / precision
    np.testing.assert_allclose(var, 1 / precision, rtol=1e-9)
    np.testing.assert_allclose(mean, bayes_mean, rtol=1e-8, atol=1e-12)


def test_float32_accurate_near_gamma_min():
    """Small steps at gamma = -13.3: alpha^2 = 1 - 1.7e-6, where float32 can't subtract."""
    gs = np.full(4, -13.3, np.float32)
    gt = gs + np.float32([1e-3, 1e-2, 0.1, 1.0])
    x = np.float32([[0.3], [-0.7], [0.9], [-0.2]])
    zt = np.float32([[0.31], [-0.69], [0.88], [-0.25]])
    (alpha_ts, sigma2_ts), (mean, var) = jax.jit(
        lambda x, zt, gs, gt: (diffusion.transition(gs, gt), diffusion.posterior(x, zt, gs, gt))
    )(x, zt, gs, gt)
    naive_a, naive_s2 = naive_transition(gs, gt)
    naive_mean, naive_var = naive_posterior(x, zt, gs[:, None], gt[:, None])
    for i in range(4):
        ref_a, ref_s2 = exact_transition(gs[i], gt[i])
        ref_mean, ref_var = exact_posterior(x[i], zt[i], gs[i], gt[i])
        assert abs(float(alpha_ts[i]) / ref_a - 1) < 1e-6
        assert abs(float(sigma2_ts[i]) / ref_s2 - 1) < 1e-5
        assert abs(float(var[i, 0]) / ref_var - 1) < 1e-5
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-6)
        if i < 3:
            # The same quantities the naive way in float32 are wrong by percents or worse;
            # this is what makes the checks above able to fail.
            assert abs(float(naive_s2[i]) / ref_s2 - 1) > 1e-2
            assert abs(float(naive_var[i, 0]) / ref_var - 1) > 1e-2
    del naive_a, naive_mean


def test_composition_gives_marginal(x64):
    """alpha_s alpha_ts = alpha_t and alpha_ts^2 sigma_s^2 + sigma2_ts = sigma_t^2."""
    gs, gt = gamma_pairs(3)
    (alpha_s, sigma_s), (alpha_t, sigma_t), (alpha_ts, sigma2_ts) = jax.jit(
        lambda gs, gt: (
            diffusion.alpha_sigma(gs),
            diffusion.alpha_sigma(gt),
            diffusion.transition(gs, gt),
        )
    )(gs, gt)
    np.testing.assert_allclose(alpha_s * alpha_ts, alpha_t, rtol=1e-14)
    np.testing.assert_allclose(alpha_ts**2 * sigma_s**2 + sigma2_ts, sigma_t**2, rtol=1e-13)


@jax.jit
def _sample_chains(key, x, gs, gt):
    """(z_t from q(z_s|x) then q(z_t|z_s), z_s from q(z_t|x) then q(z_s|z_t,x))."""
    n = 1 << 16
    k1, k2, k3, k4 = jax.random.split(key, 4)
    xb = jnp.broadcast_to(x, (n,) + x.shape)
    gs_b, gt_b = jnp.full((n,), gs), jnp.full((n,), gt)
    z_s = diffusion.q_sample(xb, gs_b, jax.random.normal(k1, xb.shape))
    alpha_ts, sigma2_ts = diffusion.transition(gs, gt)
    z_t = alpha_ts * z_s + jnp.sqrt(sigma2_ts) * jax.random.normal(k2, xb.shape)
    z_t2 = diffusion.q_sample(xb, gt_b, jax.random.normal(k3, xb.shape))
    mean, var = diffusion.posterior(xb, z_t2, gs_b, gt_b)
    z_s2 = mean + jnp.sqrt(var) * jax.random.normal(k4, xb.shape)
    return z_t, z_s2


@pytest.mark.parametrize("gs,gt", [(-13.3, -12.0), (-3.0, 1.0), (2.0, 5.0)])
def test_sampled_chains_have_the_right_marginals(gs, gt):
    """Sampling q(z_s|x) then q(z_t|z_s) gives q(z_t|x); q(z_t|x) then the posterior gives
    q(z_s|x). Mean and variance per coordinate within 4 standard errors."""
    x = jnp.array([1.0, -0.5, 0.0, 2.0])
    z_t, z_s = _sample_chains(jax.random.PRNGKey(4), x, gs, gt)
    n = z_t.shape[0]
    for z, g in ((z_t, gt), (z_s, gs)):
        alpha, sigma = (float(v) for v in diffusion.alpha_sigma(jnp.float32(g)))
        mean_z = (np.mean(z, 0) - alpha * np.asarray(x)) / (sigma / np.sqrt(n))
        # The sample variance of a Gaussian has standard error var * sqrt(2 / n).
        var_z = (np.var(z, 0) - sigma**2) / (sigma**2 * np.sqrt(2 / n))
        assert np.all(np.abs(mean_z) < 4), (g, mean_z)
        assert np.all(np.abs(var_z) < 4), (g, var_z)


def test_posterior_from_eps_is_posterior_at_x_hat(x64):
    gs, gt = gamma_pairs(5, n=16)
    zt, eps_hat = normal(6, 16, 5), normal(7, 16, 5)

    @jax.jit
    def both(eps_hat, zt, gs, gt):
        x_hat = diffusion.x_from_eps(eps_hat, zt, gt)
        return diffusion.posterior_from_eps(eps_hat, zt, gs, gt), diffusion.posterior(
            x_hat, zt, gs, gt
        )

    (mean, var), (want_mean, want_var) = both(eps_hat, zt, gs, gt)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(var, want_var, rtol=1e-14)


@pytest.mark.parametrize("parameterization", diffusion.PARAMETERIZATIONS)
def test_conversions_round_trip(parameterization, x64):
    gamma = np.linspace(-13.3, 5.0, 32)
    z, eps = normal(8, 32, 6), normal(9, 32, 6)

    @jax.jit
    def round_trips(eps, z, gamma):
        pred = diffusion.from_eps(eps, z, gamma, parameterization)
        back = diffusion.to_eps(pred, z, gamma, parameterization)
        # And the other way round, from a prediction that is not a converted eps.
        other = diffusion.from_eps(
            diffusion.to_eps(eps, z, gamma, parameterization), z, gamma, parameterization
        )
        return back, other

    back, other = round_trips(eps, z, gamma)
    # x undoes z - sigma eps, which at sigma = 1.3e-3 costs a factor 1/sigma of round-off.
    np.testing.assert_allclose(back, eps, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(other, eps, rtol=1e-10, atol=1e-10)


def test_conversions_round_trip_float32_mid_range():
    gamma = np.linspace(-4.0, 4.0, 32, dtype=np.float32)
    z, eps = normal(10, 32, 6).astype(np.float32), normal(11, 32, 6).astype(np.float32)

    @jax.jit
    def round_trips(eps, z, gamma):
        return {
            p: diffusion.to_eps(diffusion.from_eps(eps, z, gamma, p), z, gamma, p)
            for p in diffusion.PARAMETERIZATIONS
        }

    for back in round_trips(eps, z, gamma).values():
        assert back.dtype == jnp.float32
        np.testing.assert_allclose(back, eps, rtol=1e-5, atol=2e-5)


def test_conversions_match_definitions(x64):
    """With the true noise: x-pred is x, v = alpha eps - sigma x, score = grad log q(z|x)."""
    gamma = np.linspace(-13.3, 5.0, 16)
    x, eps = normal(12, 16, 4), normal(13, 16, 4)

    @jax.jit
    def compute(x, eps, gamma):
        z = diffusion.q_sample(x, gamma, eps)
        alpha, sigma = diffusion.alpha_sigma(gamma[:, None])

        def log_q(z):
            return jnp.sum(-0.5 * ((z - alpha * x) / sigma) ** 2 - jnp.log(sigma))

        preds = {p: diffusion.from_eps(eps, z, gamma, p) for p in diffusion.PARAMETERIZATIONS}
        want = {"eps": eps, "x": x, "v": alpha * eps - sigma * x, "score": jax.grad(log_q)(z)}
        return z, alpha * x + sigma * eps, diffusion.x_from_eps(eps, z, gamma), preds, want

    z, z_want, x_hat, preds, want = compute(x, eps, gamma)
    np.testing.assert_allclose(z, z_want, rtol=1e-15)
    np.testing.assert_allclose(x_hat, x, rtol=1e-9, atol=1e-9)
    for p in diffusion.PARAMETERIZATIONS:
        np.testing.assert_allclose(preds[p], want[p], rtol=1e-9, atol=1e-12, err_msg=p)


def test_oracle_score_is_marginal_score(x64):
    """Tweedie: -E[eps | z] / sigma is the score of the diffused marginal q(z_t)."""
    mean, var = jnp.array([0.5, -1.0, 2.0]), jnp.array([0.01, 1.0, 4.0])
    gamma = np.linspace(-13.3, 5.0, 8)
    z = 2 * normal(14, 8, 3)

    @jax.jit
    def scores(z, gamma):
        alpha, sigma = diffusion.alpha_sigma(gamma[:, None])

        def log_q(z):
            v = alpha**2 * var + sigma**2
            return jnp.sum(-0.5 * (z - alpha * mean) ** 2 / v - 0.5 * jnp.log(v))

        eps_hat = oracles.gaussian_eps(mean, var)(z, gamma)
        return diffusion.from_eps(eps_hat, z, gamma, "score"), jax.grad(log_q)(z)

    score, want = scores(z, gamma)
    np.testing.assert_allclose(score, want, rtol=1e-10)


def test_shape_checks_catch_mismatches():
    x = jnp.zeros((4, 3))
    with pytest.raises(AssertionError):
        diffusion.q_sample(x, jnp.zeros(4), jnp.zeros((4, 1)))
    with pytest.raises(AssertionError):
        diffusion.to_eps(jnp.zeros((4, 1)), x, jnp.zeros(4), "x")
    with pytest.raises(AssertionError):
        diffusion.q_sample(x, jnp.zeros(5), x)
    with pytest.raises(ValueError, match="parameterization"):
        diffusion.to_eps(x, x, jnp.zeros(4), "y")
    with pytest.raises(ValueError, match="parameterization"):
        diffusion.from_eps(x, x, jnp.zeros(4), "y")
    # A scalar gamma and a per-example one both broadcast over any trailing shape.
    z = diffusion.q_sample(jnp.ones((2, 3, 4)), jnp.float32(0.0), jnp.ones((2, 3, 4)))
    chex.assert_shape(z, (2, 3, 4))
    np.testing.assert_allclose(z, 2 * np.sqrt(0.5), rtol=1e-6)
