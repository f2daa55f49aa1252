"""PF-ODE likelihoods of discrete data under each dequantisation, against closed forms.

The data are integers in 0..V-1 per dimension whose underlying continuous density in [-1, 1]
is a diagonal Gaussian N(MEAN, VAR), and the model is that Gaussian's exact denoiser. Its
PF-ODE maps the diffused marginal at t_eps linearly onto the marginal at t = 1, so with the
N(0, I) prior the model density p_ODE(z) at t_eps is itself Gaussian, known per dimension:
z_1 = a_1 mu + r (z - a_0 mu), r = sqrt((a_1^2 v + s_1^2) / (a_0^2 v + s_0^2)). Every term of
every bound, its expectation over the dequantisation noise, and the exact -log P(x) of the
model's bin masses then have closed forms.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf, logsumexp
from scipy.stats import norm

from vdm import estimators
from vdm.core import diffusion, oracles, schedules
from vdm.sampling import dequantization as dequantization_lib
from vdm.sampling import likelihood

G0, G1 = -13.3, 5.0
SCHEDULE = schedules.fixed_linear(G0, G1)
MEAN, VAR = np.array([0.1, -0.25]), np.array([0.12, 0.3])
VOCAB, N = 8, 128
DEQ = {"trace": "exact", "rtol": 1e-5, "atol": 1e-5}


def _data(seed, vocab=VOCAB, n=N):
    edges = np.linspace(-1.0, 1.0, vocab + 1)
    rng = np.random.default_rng(seed)
    y = MEAN + np.sqrt(VAR) * rng.normal(size=(n, 2))
    return np.clip(np.searchsorted(edges, y) - 1, 0, vocab - 1)


class Flow:
    """The exact flow's Gaussian p_ODE at gamma(t_eps) = g0, per dimension."""

    def __init__(self, g0):
        self.a0, self.s0 = (float(v) for v in diffusion.alpha_sigma(g0))
        a1, s1 = (float(v) for v in diffusion.alpha_sigma(G1))
        self.a1 = a1
        self.r = np.sqrt((a1**2 * VAR + s1**2) / (self.a0**2 * VAR + self.s0**2))
        # z = a0 mu + (z_1 - a1 mu) / r with z_1 ~ N(0, I): mean and sd of p_ODE in z.
        self.mean, self.sd = (self.a0 - a1 / self.r) * MEAN, 1.0 / self.r

    def z1(self, z):
        return self.a1 * MEAN + self.r * (z - self.a0 * MEAN)

    def neg_log_prob(self, z):
        return -np.sum(norm.logpdf(self.z1(z)) + np.log(self.r), axis=-1)

    def expected_neg_log_prob(self, centre, var):
        """E[-log p_ODE(z)] for z with mean centre [B, D] and per-dim variance var."""
        m1 = self.a1 * MEAN + self.r * (centre - self.a0 * MEAN)
        sq = m1**2 + self.r**2 * var
        return np.sum(0.5 * sq + 0.5 * math.log(2 * math.pi) - np.log(self.r), axis=-1)

    def bin_nll(self, x, vocab):
        """-log P(x), P(x) = int over x's bin of p(y) dy, y = z / a0 (p_ODE read as data)."""
        lo, hi = 2.0 * x / vocab - 1.0, 2.0 * (x + 1) / vocab - 1.0
        m, s = self.mean / self.a0, self.sd / self.a0
        mass = norm.cdf((hi - m) / s) - norm.cdf((lo - m) / s)
        return -np.sum(np.log(mass), axis=-1)

    def decoder_nll(self, x, vocab, g0):
        """-log int p(x | z) p_ODE(z) dz of VDM's softmax decoder, by quadrature per dim."""
        centres = (2.0 * (np.arange(vocab) + 0.5) / vocab - 1.0)[:, None]
        total = np.zeros(len(x))
        for i in range(x.shape[1]):
            z = np.linspace(self.mean[i] - 9 * self.sd[i], self.mean[i] + 9 * self.sd[i], 40001)
            logits = -0.5 * (z / self.a0 - centres) ** 2 * math.exp(-g0)  # [V, grid]
            log_dec = logits - logsumexp(logits, axis=0)
            log_pz = norm.logpdf(z, self.mean[i], self.sd[i])
            log_p = logsumexp(log_dec[x[:, i]] + log_pz, axis=1) + math.log(z[1] - z[0])
            total -= log_p
        return total


def _nll(x, dequantization, key=0, t_eps=0.0, num_samples=1, vocab=VOCAB):
    den = oracles.gaussian_eps(MEAN, VAR)
    out = likelihood.ode_nll(
        den, SCHEDULE, {}, jnp.asarray(x), jax.random.key(key), vocab_size=vocab,
        dequantization=dequantization, t_eps=t_eps, num_samples=num_samples, **DEQ,
    )  # fmt: skip
    return jax.tree.map(np.asarray, out)


def _bits(nats):
    return nats / (2 * math.log(2.0))


def _tn_variance(tau):
    """Var of N(0, 1) truncated to [-tau, tau]."""
    return 1.0 - 2.0 * tau * norm.pdf(tau) / erf(tau / math.sqrt(2.0))


# t_eps = 0.42 puts gamma near -5.6, where the truncation box is tau ~ 2: it really truncates.
@pytest.mark.parametrize(("dequantization", "t_eps"), [("uniform", 0.0), ("truncated_normal", 0.0),
                                                       ("truncated_normal", 0.42)])  # fmt: skip
def test_every_term_matches_its_closed_form_and_the_bound_its_expectation(dequantization, t_eps):
    x = _data(1)
    g0 = G0 + (G1 - G0) * t_eps
    flow = Flow(g0)
    out = _nll(x, dequantization, key=2, t_eps=t_eps)
    z = out["z_start"][0]
    y, centre = z / flow.a0, 2.0 * (x + 0.5) / VOCAB - 1.0
    # The dequantised point stays inside x's bin.
    assert np.all(np.abs(y - centre) <= 1.0 / VOCAB + 1e-6)
    tau = flow.a0 / (flow.s0 * VOCAB)
    if dequantization == "uniform":
        log_q = np.full(N, 2 * math.log(VOCAB / 2.0))
        var = (2.0 / VOCAB) ** 2 / 12.0 * flow.a0**2
        expected_log_q = log_q
    else:
        eps = (z - flow.a0 * centre) / flow.s0
        log_mass = math.log(erf(tau / math.sqrt(2.0)))
        const = 2 * (math.log(flow.a0 / flow.s0) - log_mass)
        log_q = np.sum(norm.logpdf(eps), axis=1) + const
        var = flow.s0**2 * _tn_variance(tau)
        expected_log_q = -math.log(2 * math.pi) - _tn_variance(tau) + const
    # Per draw, term by term (solver tolerance).
    z1 = flow.z1(z)
    np.testing.assert_allclose(out["prior_bpd"], _bits(-np.sum(norm.logpdf(z1), 1)), atol=2e-3)
    np.testing.assert_allclose(out["divergence_bpd"], _bits(-np.sum(np.log(flow.r))), atol=2e-3)
    np.testing.assert_allclose(out["jacobian_bpd"], _bits(-2 * math.log(flow.a0)), atol=1e-5)
    np.testing.assert_allclose(out["dequantization_bpd"], _bits(log_q), atol=1e-3)
    np.testing.assert_allclose(out["importance_bpd"], 0.0, atol=1e-6)
    parts = sum(out[k] for k in ("prior_bpd", "divergence_bpd", "dequantization_bpd",
                                 "jacobian_bpd", "importance_bpd"))  # fmt: skip
    np.testing.assert_allclose(parts, out["bpd"], atol=1e-5)
    # In expectation over the noise: the closed-form Jensen bound, above the exact -log P(x).
    bound = _bits(
        flow.expected_neg_log_prob(flow.a0 * centre, var) - 2 * math.log(flow.a0) + expected_log_q
    )
    diff = out["bpd"] - bound
    assert abs(diff.mean()) < 3 * diff.std(ddof=1) / math.sqrt(N) + 2e-3
    exact = _bits(flow.bin_nll(x, VOCAB))
    assert np.all(bound >= exact - 1e-9)
    assert out["bpd"].mean() > 0  # a bound on -log of a probability mass


def test_importance_weighting_tightens_towards_the_exact_nll():
    # At t_eps = 0.42 (tau ~ 2) the truncated normal is far from the model's density over the
    # bin, so the one-draw bound is loose (~0.27 bits/dim) and K = 16 draws close most of it.
    x, t_eps = _data(3), 0.42
    g0 = G0 + (G1 - G0) * t_eps
    exact = _bits(Flow(g0).bin_nll(x, VOCAB))
    gaps = {}
    for k in (1, 16):
        out = _nll(x, "truncated_normal", key=4, t_eps=t_eps, num_samples=k)
        assert out["z_start"].shape == (k, N, 2)
        parts = sum(out[n] for n in ("prior_bpd", "divergence_bpd", "dequantization_bpd",
                                     "jacobian_bpd", "importance_bpd"))  # fmt: skip
        np.testing.assert_allclose(parts, out["bpd"], atol=1e-5)
        assert np.all(out["importance_bpd"] <= 1e-6)
        gaps[k] = out["bpd"] - exact
    se = gaps[1].std(ddof=1) / math.sqrt(N)
    assert gaps[16].mean() > -3 * se  # still a bound
    paired = gaps[1] - gaps[16]
    assert paired.mean() > 3 * paired.std(ddof=1) / math.sqrt(N)
    assert gaps[16].mean() < 0.5 * gaps[1].mean()


@pytest.mark.parametrize(("dequantization", "t_eps"), [("uniform", 0.0), ("truncated_normal", 0.42),
                                                       ("truncated_normal", 0.5)])  # fmt: skip
def test_importance_weights_average_to_the_bin_mass(dequantization, t_eps):
    """E_q[p(y) / q(y | x)] = P(x): the dequantisation's density and the Jacobian are
    normalised, checked without the ODE (the exact flow's p_ODE) by many draws per example."""
    x, m = _data(8, n=4), 20000
    g = jnp.full((4 * m,), G0 + (G1 - G0) * t_eps)
    alpha, sigma = diffusion.alpha_sigma(g)
    z, terms = dequantization_lib.dequantize(
        jnp.asarray(np.tile(x, (m, 1))), jax.random.key(9), alpha=alpha, sigma=sigma, gamma=g,
        vocab_size=VOCAB, dequantization=dequantization,
    )  # fmt: skip
    flow = Flow(float(g[0]))
    nll = flow.neg_log_prob(np.asarray(z, np.float64))
    nll = nll + np.asarray(terms["dequantization"]) + np.asarray(terms["jacobian"])
    log_w = -nll.reshape(m, 4)
    estimate = logsumexp(log_w, axis=0) - math.log(m)
    w = np.exp(log_w - estimate)
    rel_se = w.std(axis=0) / math.sqrt(m)  # of the mean weight, relative to it
    np.testing.assert_array_less(np.abs(estimate + flow.bin_nll(x, VOCAB)), 4 * rel_se + 1e-3)


def test_decoder_bound_is_above_the_decoder_models_exact_nll():
    x = _data(5, n=64)
    flow = Flow(G0)
    exact = _bits(flow.decoder_nll(x, VOCAB, G0))
    for k in (1, 4):
        out = _nll(x, "decoder", key=6, num_samples=k)
        diff = out["bpd"] - exact
        assert diff.mean() > -3 * diff.std(ddof=1) / math.sqrt(len(x))
        np.testing.assert_allclose(out["jacobian_bpd"], 0.0)
    # The decoder model's P(x) is a probability over the V^D values: positive bits.
    assert np.all(exact > 0)


def test_bad_dequantization_options_fail_naming_the_problem():
    x = jnp.asarray(_data(7, n=4))
    den = oracles.gaussian_eps(MEAN, VAR)
    with pytest.raises(ValueError, match="Unknown dequantization 'tn'"):
        likelihood.ode_nll(den, SCHEDULE, {}, x, jax.random.key(0), vocab_size=VOCAB,
                           dequantization="tn")  # fmt: skip
    with pytest.raises(ValueError, match="truncated_normal.*needs discrete data"):
        likelihood.ode_nll(den, SCHEDULE, {}, x * 0.1, jax.random.key(0), vocab_size=None,
                           dequantization="truncated_normal")  # fmt: skip
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        likelihood.ode_nll(den, SCHEDULE, {}, x, jax.random.key(0), vocab_size=VOCAB,
                           num_samples=0)  # fmt: skip


def test_accounting_states_units_and_dequantisation_in_one_line():
    line = estimators.accounting("uniform", 256)
    assert line.startswith("bits per 8-bit sub-pixel (V=256), uniform dequantisation")
    assert "D log(V/2)" in line and "\n" not in line
    assert "truncated-normal" in estimators.accounting("truncated_normal", 256, 4)
    assert "K=4" in estimators.accounting("decoder", 17, 4)
    assert "continuous" in estimators.accounting("none", None)
    with pytest.raises(ValueError, match="'none' is for continuous data"):
        estimators.accounting("none", 256)
