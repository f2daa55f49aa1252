"""Likelihoods against closed forms: the split ELBO pass, PF-ODE densities and data NLLs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from vdm.core import decoder, diffusion, losses, oracles, schedules
from vdm.sampling import likelihood

SCHEDULE = schedules.fixed_linear(-13.3, 5.0)
MU = np.array([0.5, -0.3, 0.2])
COV = np.array([[0.8, 0.3, 0.0], [0.3, 0.5, -0.2], [0.0, -0.2, 1.1]])


def test_evaluate_elbo_aggregates_real_examples_only():
    rng = np.random.default_rng(0)
    batches = []
    for i in range(3):
        mask = np.ones(8, np.float32)
        if i == 2:
            mask[5:] = 0.0  # padding, whose terms are garbage
        x = rng.normal(size=8).astype(np.float32)
        batches.append({"x": jnp.asarray(x), "mask": jnp.asarray(mask)})

    def terms_fn(batch, key):
        noise = jax.random.uniform(key, batch["x"].shape)
        pad = jnp.where(batch["mask"] > 0, 0.0, jnp.nan)
        total = batch["x"] + noise + pad
        return {"bpd": total / 2.0, "total": total, "diffusion": total - 1.0,
                "prior": jnp.ones_like(total), "recon": jnp.zeros_like(total)}  # fmt: skip

    key = jax.random.key(1)
    out = likelihood.evaluate_elbo(terms_fn, batches, key=key, num_draws=3)
    per_example = []
    for i, b in enumerate(batches):
        draws = [
            terms_fn(b, jax.random.fold_in(jax.random.fold_in(key, i), d))["bpd"] for d in range(3)
        ]
        per_example.append(np.mean(draws, axis=0)[np.asarray(b["mask"]) > 0])
    per_example = np.concatenate(per_example)
    assert out["num_examples"] == 21
    np.testing.assert_allclose(out["bpd"], per_example.mean(), rtol=1e-6)
    np.testing.assert_allclose(out["bpd_stderr"], per_example.std(ddof=1) / np.sqrt(21), rtol=1e-5)
    # The breakdown is in bits/dim and sums to the total.
    parts = out["diffusion_bpd"] + out["prior_bpd"] + out["recon_bpd"]
    np.testing.assert_allclose(parts, out["bpd"], rtol=1e-5)
    np.testing.assert_allclose(out["prior_bpd"], 0.5, rtol=1e-6)
    assert likelihood.evaluate_elbo(terms_fn, batches, key=key, num_draws=3) == out


def _exact_ode_log_prob(z0, mean, cov, g0=-13.3, g1=5.0):
    """log p_ODE(z0) of the exact flow with prior N(0, I) at t=1 (eigenbasis of cov)."""
    a0, s0 = diffusion.alpha_sigma(g0)
    a1, s1 = diffusion.alpha_sigma(g1)
    lam, u = np.linalg.eigh(cov)
    ratio = np.sqrt((a1**2 * lam + s1**2) / (a0**2 * lam + s0**2))
    z1 = a1 * mean + ((z0 - a0 * mean) @ u) * ratio @ u.T
    return np.sum(norm.logpdf(z1) + np.log(ratio), axis=1)


def _gaussian_z0(n, seed):
    rng = np.random.default_rng(seed)
    x = MU + rng.normal(size=(n, 3)) @ np.linalg.cholesky(COV).T
    a0, s0 = diffusion.alpha_sigma(-13.3)
    return np.asarray(a0 * x + s0 * rng.normal(size=(n, 3)), np.float32)


def test_ode_log_prob_exact_trace_matches_gaussian():
    den = oracles.gaussian_eps(MU, COV)
    z0 = _gaussian_z0(128, 2)
    out = likelihood.ode_log_prob(den, SCHEDULE, {}, jnp.asarray(z0), None, trace="exact")
    want = _exact_ode_log_prob(z0, MU, COV)
    np.testing.assert_allclose(out["log_prob"], want, rtol=0.01, atol=0.01)
    assert np.mean(np.abs(np.asarray(out["log_prob"]) - want)) < 1e-3 * np.mean(np.abs(want))


def test_ode_log_prob_hutchinson_is_unbiased():
    den = oracles.gaussian_eps(MU, COV)
    n = 256
    z0 = jnp.asarray(_gaussian_z0(n, 3))
    want = _exact_ode_log_prob(np.asarray(z0), MU, COV)
    for probe, count in (("rademacher", 1), ("gaussian", 2)):
        out = likelihood.ode_log_prob(
            den, SCHEDULE, {}, z0, jax.random.key(4), trace="hutchinson", probe=probe,
            num_probes=count, rtol=1e-4, atol=1e-4,
        )  # fmt: skip
        err = np.asarray(out["log_prob"]) - want
        se = err.std(ddof=1) / np.sqrt(n)
        assert err.std() > 1e-3  # the full covariance makes the estimator really random
        assert abs(err.mean()) < 3 * se


def test_elbo_upper_bounds_ode_nll_on_gaussian_data():
    # gamma_max = 10 makes q(z_1) = N(0, I) to 4e-5, so the ELBO's model (reverse SDE from
    # N(0, I)) and the ODE's model are the same and the ELBO must bound the ODE's NLL.
    schedule = schedules.fixed_linear(-13.3, 10.0)
    var = np.array([0.6, 1.2, 0.3])
    den = oracles.gaussian_eps(MU, var)
    n = 256
    x = jnp.asarray(MU + np.sqrt(var) * np.random.default_rng(5).normal(size=(n, 3)), jnp.float32)
    ode_bpd = {
        deq: np.asarray(
            likelihood.ode_nll(den, schedule, {}, x, jax.random.key(6), vocab_size=None,
                               dequantization=deq, trace="exact", rtol=1e-4, atol=1e-4)["bpd"]
        )
        for deq in ("none", "decoder")
    }  # fmt: skip
    # The ODE's density of x: the exact flow's density of z_0 = alpha_0 x, times alpha_0^D.
    a0, _ = diffusion.alpha_sigma(-13.3)
    log_px = _exact_ode_log_prob(a0 * np.asarray(x), MU, np.diag(var), g1=10.0) + 3 * np.log(a0)
    analytic = -log_px / (3 * np.log(2))
    np.testing.assert_allclose(ode_bpd["none"], analytic, atol=2e-3)
    # With the exact denoiser the one-latent decoder-path bound is tight too.
    np.testing.assert_allclose(ode_bpd["decoder"].mean(), analytic.mean(), atol=0.01)

    def elbo_bpd(timesteps):
        terms = jax.jit(
            lambda b, k: losses.loss_terms(
                den, SCHEDULE, {}, b["x"], k, vocab_size=None, timesteps=timesteps
            )  # fmt: skip
        )
        per = []
        batch = {"x": x, "mask": jnp.ones(n)}
        for d in range(16):  # per-example draws, to pair with the ODE values
            per.append(np.asarray(terms(batch, jax.random.fold_in(jax.random.key(7), d))["bpd"]))
        return np.mean(per, axis=0)

    for timesteps in (0, 20):
        diff = elbo_bpd(timesteps) - ode_bpd["none"]
        se = diff.std(ddof=1) / np.sqrt(n)
        assert diff.mean() > -3 * se
        if timesteps:  # a 20-step discrete ELBO is strictly looser
            assert diff.mean() > 3 * se
        else:  # the continuous ELBO of the exact denoiser is (nearly) tight
            assert diff.mean() < 3 * se + 0.01


def _discretised_gaussian(vocab, mean, sd):
    """Per-dimension probabilities of x in 0..V-1: Gaussian mass of each bin of [-1, 1]."""
    edges = np.linspace(-1.0, 1.0, vocab + 1)
    cdf = norm.cdf(edges[None], mean[:, None], sd[:, None])
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0  # the edge bins absorb the tails
    return np.diff(cdf, axis=1)


def _entropy_bpd(probs):
    return -np.sum(probs * np.log(np.maximum(probs, 1e-300))) / (probs.shape[0] * np.log(2))


def test_uniform_dequantised_nll_matches_entropy():
    vocab, mean, sd = 32, np.array([0.05, -0.1]), np.array([0.28, 0.39])
    probs = _discretised_gaussian(vocab, mean, sd)
    rng = np.random.default_rng(8)
    x = np.stack([rng.choice(vocab, size=512, p=p) for p in probs], axis=1)
    den = oracles.gaussian_eps(mean, sd**2)
    out = likelihood.ode_nll(
        den, SCHEDULE, {}, jnp.asarray(x), jax.random.key(9), vocab_size=vocab,
        dequantization="uniform", trace="exact", rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    bpd = np.asarray(out["bpd"])
    h, se = _entropy_bpd(probs), bpd.std(ddof=1) / np.sqrt(len(bpd))
    # Cross-entropy >= entropy; the Gaussian model of a dequantised Gaussian is near-exact.
    assert h - 3 * se < bpd.mean() < h + 3 * se + 0.02


def test_decoder_path_nll_of_exact_discrete_model_is_entropy():
    """Data on V=8 values per dim; its diffused marginals are a Gaussian mixture with one
    point mass per value pair, so oracles.mixture_eps is the exact model and the decoder
    path must give the data entropy (never below it, and never negative)."""
    vocab = 8
    probs = _discretised_gaussian(vocab, np.array([0.1, -0.2]), np.array([0.4, 0.5]))
    grid = np.stack(np.meshgrid(np.arange(vocab), np.arange(vocab), indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    weights = probs[0][grid[:, 0]] * probs[1][grid[:, 1]]
    centres = np.asarray(decoder.encode(grid, vocab))
    den = oracles.mixture_eps(weights, centres, np.zeros_like(centres))
    rng = np.random.default_rng(10)
    x = grid[rng.choice(len(grid), size=512, p=weights / weights.sum())]
    out = likelihood.ode_nll(
        den, SCHEDULE, {}, jnp.asarray(x), jax.random.key(11), vocab_size=vocab,
        dequantization="decoder", trace="exact", rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    bpd = np.asarray(out["bpd"])
    h, se = _entropy_bpd(probs), bpd.std(ddof=1) / np.sqrt(len(bpd))
    assert abs(bpd.mean() - h) < 3 * se + 0.01
    assert bpd.mean() > 0


def test_ode_log_prob_in_every_time_variable_matches_gaussian():
    """t, log-SNR and EDM's sigma / log sigma (state z / alpha, its change of variables
    included) give the closed-form density; sigma takes fewer adaptive steps here."""
    from vdm.sampling import ode

    den = oracles.gaussian_eps(MU, COV)
    z0 = _gaussian_z0(128, 2)
    want = _exact_ode_log_prob(z0, MU, COV)
    steps = {}
    for time in ode.TIMES:
        out = likelihood.ode_log_prob(
            den, SCHEDULE, {}, jnp.asarray(z0), None, trace="exact", time=time
        )
        err = np.abs(np.asarray(out["log_prob"]) - want)
        assert err.max() < 2e-4 and err.mean() < 5e-5, (time, err.max(), err.mean())
        steps[time] = int(out["num_steps"])
    assert steps["sigma"] < steps["t"], steps  # measured 10 vs 17 at 1e-5


def test_density_tol_bounds_the_log_density_error_the_state_tolerance_misses():
    """At a loose state tolerance the log-density integral, a quadrature on the state's steps,
    is far off; eval.ode.density_tol makes the controller bound its error too (measured on this
    Gaussian at rtol = atol = 1e-3: max error 1.4e-2 bits/dim on 8 steps, 3.1e-3 on 11 with
    density_tol 1e-5)."""
    den = oracles.gaussian_eps(MU, COV)
    z0 = _gaussian_z0(128, 2)
    want = _exact_ode_log_prob(z0, MU, COV)
    errors, steps = {}, {}
    for density_tol in (0.0, 1e-5):
        out = likelihood.ode_log_prob(
            den, SCHEDULE, {}, jnp.asarray(z0), None, trace="exact", rtol=1e-3, atol=1e-3,
            density_tol=density_tol,
        )  # fmt: skip
        bpd_error = np.abs(np.asarray(out["log_prob"]) - want) / (3 * np.log(2.0))
        errors[density_tol], steps[density_tol] = bpd_error.max(), int(out["num_steps"])
    assert errors[1e-5] < 0.3 * errors[0.0], errors
    assert steps[1e-5] > steps[0.0], steps  # the accuracy is bought with steps
    with pytest.raises(ValueError, match="density_tol must be >= 0"):
        likelihood.ode_log_prob(den, SCHEDULE, {}, jnp.asarray(z0), None, density_tol=-1e-5)


def test_bosh3_with_a_pi_controller_reaches_the_gaussian_density():
    """Bosh3 (3 evaluations a step) at a loose state tolerance with a density bound: the
    cheapest setting for the digits model's likelihood at the default's accuracy (README). Here
    measured: 25 steps with the integral controller (0/1), 21 with the PI controller (0.3/0.4),
    max error 2.6e-4 and 3.0e-4 bits/dim; Tsit5 at the same tolerances 2.5e-3."""
    den = oracles.gaussian_eps(MU, COV)
    z0 = _gaussian_z0(128, 2)
    want = _exact_ode_log_prob(z0, MU, COV)
    steps = {}
    for pcoeff, icoeff in ((0.0, 1.0), (0.3, 0.4)):
        out = likelihood.ode_log_prob(
            den, SCHEDULE, {}, jnp.asarray(z0), None, trace="exact", solver="bosh3",
            rtol=1e-3, atol=1e-3, density_tol=1e-4, pcoeff=pcoeff, icoeff=icoeff,
        )  # fmt: skip
        bpd_error = np.abs(np.asarray(out["log_prob"]) - want) / (3 * np.log(2.0))
        assert bpd_error.max() < 1e-3 and bpd_error.mean() < 2e-4, (pcoeff, bpd_error.max())
        steps[pcoeff, icoeff] = int(out["num_steps"])
    # The coefficients reach diffrax's controller: the PI controller takes another step sequence.
    assert steps[0.3, 0.4] != steps[0.0, 1.0], steps
