"""Tests of vdm.core.losses against closed forms for Gaussian data (the decoder's own tests,
vdm.core.decoder, are in test_decoder.py).

For x ~ N(mu, diag(s^2)) and z = alpha x + sigma eps (alpha^2 = sigmoid(-gamma), sigma^2 =
sigmoid(gamma)), z is Gaussian with variance alpha^2 s^2 + sigma^2 per coordinate and
Cov(eps, z) = sigma, so E[eps | z] = sigma (z - alpha mu) / (alpha^2 s^2 + sigma^2) and its
mean squared error is the Gaussian conditional variance
    m(gamma) = 1 - sigma^2 / (alpha^2 s^2 + sigma^2) = s^2 / (s^2 + e^gamma)   per coordinate.
The continuous loss is L = 0.5 gamma'(t) ||eps - eps_hat||^2 with t ~ U(0, 1), so
    E[L] = 0.5 int_0^1 gamma'(t) M(gamma(t)) dt = 0.5 int_{gamma_0}^{gamma_1} M(g) dg,
M = sum of m over coordinates: a change of variables that erases the schedule's shape (the
paper's invariance), and with M above the integral is elementary,
    0.5 sum_d [(g1 - g0) - log((s_d^2 + e^g1) / (s_d^2 + e^g0))].
The tests check that formula by quadrature (not by trusting vdm.oracles), then check the
library's Monte-Carlo losses against it within 3 standard errors. The same change of
variables holds for any denoiser that is a function of (z, gamma), e.g. a fixed linear map
eps_hat = A z + b, whose M(gamma) is again Gaussian algebra (see `linear_map_mse`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.core import diffusion, losses, oracles, schedules

MU = np.array([0.5, -1.0, 0.0, 2.0])
VAR = np.array([0.01, 0.25, 1.0, 4.0])
G0, G1 = -13.3, 5.0
DIM = 4
# A fixed, deliberately poor linear denoiser eps_hat = A z + b (it ignores gamma).
A_LIN = 0.3 * np.eye(DIM) + 0.1 * np.random.default_rng(0).standard_normal((DIM, DIM))
B_LIN = np.array([0.1, -0.2, 0.0, 0.05])


def oracle():
    return oracles.gaussian_eps(jnp.asarray(MU), jnp.asarray(VAR))


def linear_map(z, gamma, cond=None):
    del gamma, cond
    return z @ jnp.asarray(A_LIN, z.dtype).T + jnp.asarray(B_LIN, z.dtype)


def np_alpha2_sigma2(gamma):
    gamma = np.asarray(gamma, np.float64)
    return 1 / (1 + np.exp(gamma)), 1 / (1 + np.exp(-gamma))


def oracle_mse(gamma):
    """E||eps - E[eps | z_gamma]||^2 from the Gaussian conditional variance, [n]."""
    a2, s2 = np_alpha2_sigma2(np.asarray(gamma)[..., None])
    return np.sum(1 - s2 / (a2 * VAR + s2), axis=-1)


def linear_map_mse(gamma):
    """E||eps - A z - b||^2: eps - A z - b = (I - sigma A) eps - alpha A x - b, x, eps indep."""
    out = []
    for g in np.atleast_1d(gamma):
        a2, s2 = np_alpha2_sigma2(g)
        a, s = math.sqrt(a2), math.sqrt(s2)
        resid = np.eye(DIM) - s * A_LIN
        out.append(
            np.sum(resid**2)
            + a2 * np.sum((A_LIN * np.sqrt(VAR)) ** 2)
            + np.sum((a * A_LIN @ MU + B_LIN) ** 2)
        )
    return np.array(out)


def gauss_legendre(a, b, n):
    x, w = np.polynomial.legendre.leggauss(n)
    return (a + b) / 2 + (b - a) / 2 * x, (b - a) / 2 * w


def quad_gamma(mse, g0=G0, g1=G1):
    """0.5 int_{g0}^{g1} mse(g) dg; the integrands are smooth, so 4 x 50 nodes are exact."""
    edges = np.linspace(g0, g1, 5)
    return sum(
        0.5 * np.sum(w * mse(x)) for x, w in map(gauss_legendre, edges[:-1], edges[1:], [50] * 4)
    )


def t_rule():
    """Composite Gauss-Legendre nodes/weights on [0, 1], refined geometrically towards t = 0,
    where cosine and ddpm put steep spikes in gamma'(t) (widths ~1e-3 and ~2e-5)."""
    edges = [0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.4, 1.0]
    parts = [gauss_legendre(a, b, 12) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def random_learned_net():
    """A pinned learned_net far from linear: steep sigmoids that switch inside (0, 0.45)
    and dominate the linear part, with kernels of both signs (used through |.|)."""
    schedule = schedules.learned_net(G0, G1, n_features=32, pin_endpoints=True)
    rng = np.random.default_rng(1)
    l2_w = 10.0 + 10.0 * np.abs(rng.standard_normal(32))
    params = {
        "l1_w": np.float32(18.3),
        "l1_b": np.float32(-13.3),
        "l2_w": l2_w * rng.choice([-1.0, 1.0], 32),
        "l2_b": -l2_w * rng.uniform(0.05, 0.45, 32),
        "l3_w": 30.0 * 32 * rng.standard_normal(32),
    }
    return schedule, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)


def schedule_and_params(name):
    if name == "learned_net":
        return random_learned_net()
    schedule = schedules.SCHEDULES[name](G0, G1)
    return schedule, schedule.init(jax.random.PRNGKey(0))


def gaussian_data(key, n, dtype=jnp.float32):
    return jnp.asarray(MU, dtype) + jnp.sqrt(jnp.asarray(VAR, dtype)) * jax.random.normal(
        key, (n, DIM), dtype
    )


def mean_and_se(samples):
    samples = np.asarray(samples, np.float64)
    return samples.mean(), samples.std(ddof=1) / math.sqrt(samples.size)


# ---------------------------------------------------------------------------- closed form


def test_closed_form_matches_quadrature(x64):
    """vdm.oracles' closed form against independent quadrature of the conditional variance."""
    for g0, g1 in [(G0, G1), (-5.0, 5.0), (-2.0, 10.0)]:
        got = float(oracles.gaussian_diffusion_loss(jnp.asarray(VAR), g0, g1))
        assert got == pytest.approx(quad_gamma(oracle_mse, g0, g1), rel=1e-10)
    # The two forms of the conditional variance agree (the docstring's algebra).
    g = np.linspace(-13.3, 5.0, 7)
    np.testing.assert_allclose(
        oracle_mse(g), np.sum(VAR / (VAR + np.exp(g)[:, None]), -1), rtol=1e-12
    )


# ------------------------------------------------------------------------------ invariance

T_NODES, T_WEIGHTS = t_rule()
REPS = 512  # noise draws per quadrature node
INVARIANCE_SCHEDULES = ("fixed_linear", "cosine", "ddpm", "learned_net")


def both_denoisers(n):
    """The oracle on the first n examples and the linear map on the rest: one loss_terms
    call then serves both (examples are independent), halving what has to be compiled."""

    def denoise(z, gamma, cond=None):
        first = (jnp.arange(z.shape[0]) < n)[:, None]
        return jnp.where(first, oracle()(z, gamma, cond), linear_map(z, gamma, cond))

    return denoise


N_UNIFORM = 1 << 16


@functools.cache
def invariance_estimates():
    """For every schedule and both denoisers: uniform-t samples of L and per-node samples at
    the t-rule's nodes, from one loss_terms call per schedule; gamma, gamma' at the nodes;
    and, for the fixed linear schedule, L with times from the library's own sampler."""
    specs = {name: schedule_and_params(name) for name in INVARIANCE_SCHEDULES}
    n_nodes = len(T_NODES) * REPS

    @jax.jit
    def run(all_params, key):
        out = {}
        k_t, k_x, key = jax.random.split(key, 3)
        t_nodes = jnp.repeat(jnp.asarray(T_NODES, jnp.float32), REPS)
        # iid uniform times, the same draw as loss_terms(antithetic=False) would make.
        t_uniform = jax.random.uniform(k_t, (N_UNIFORM,))
        t = jnp.concatenate([t_uniform, t_nodes] * 2)
        x = gaussian_data(k_x, t.size)
        n = N_UNIFORM + n_nodes
        for name, (schedule, _) in specs.items():
            key, k_loss = jax.random.split(key)
            params = all_params[name]
            loss = losses.loss_terms(
                both_denoisers(n), schedule, params, x, k_loss, vocab_size=None, t=t
            )["diffusion"]
            for denoiser, part in (("oracle", loss[:n]), ("linear", loss[n:])):
                out[name, denoiser] = (
                    part[:N_UNIFORM],
                    part[N_UNIFORM:].reshape(len(T_NODES), REPS),
                )
            out[name, "gamma_and_slope"] = schedules.gamma_and_slope(
                schedule, params, jnp.asarray(T_NODES, jnp.float32)
            )
        k_x, k_loss = jax.random.split(key)
        out["fixed_linear", "sampler"] = losses.loss_terms(
            oracle(),
            specs["fixed_linear"][0],
            {},
            gaussian_data(k_x, N_UNIFORM),
            k_loss,
            vocab_size=None,
            antithetic=False,
        )["diffusion"]
        return out

    out = run({name: p for name, (_, p) in specs.items()}, jax.random.PRNGKey(1))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def test_mc_continuous_loss_matches_closed_form():
    """Times from the library's sampler, fixed linear schedule, exact denoiser."""
    exact = quad_gamma(oracle_mse)
    mean, se = mean_and_se(invariance_estimates()["fixed_linear", "sampler"])
    assert abs(mean - exact) < 3 * se, (mean, exact, se)
    # 3 standard errors must be a tight test: ~1% of the loss.
    assert se < 0.005 * exact


@pytest.mark.parametrize("name", INVARIANCE_SCHEDULES)
def test_invariance_to_schedule_shape(name):
    """Same endpoints, same expected loss, for the optimal and for a poor denoiser.

    Three checks per schedule: (1) the change of variables itself, deterministically:
    sum_k w_k 0.5 gamma'(t_k) M(gamma(t_k)) over the t-rule equals the gamma integral;
    (2) the library's loss at iid uniform times within 3 standard errors;
    (3) the library's loss at the t-rule's nodes, averaged over the noise at each node and
    integrated with the rule: tight (< 1% standard error) for every schedule.
    """
    est = invariance_estimates()
    g_nodes, slope_nodes = est[name, "gamma_and_slope"]
    if name == "learned_net":
        # The random net must really be a different shape, else the test proves nothing.
        assert np.max(np.abs(g_nodes - (G0 + (G1 - G0) * T_NODES))) > 2.0
    for denoiser, mse in (("oracle", oracle_mse), ("linear", linear_map_mse)):
        exact = quad_gamma(mse)
        ruled = np.sum(T_WEIGHTS * 0.5 * slope_nodes * mse(g_nodes))
        assert ruled == pytest.approx(exact, rel=2e-4), denoiser
        uniform, nodes = est[name, denoiser]
        if name != "ddpm":
            # ddpm's gamma' is ~6e4 for t < 2e-5 (it starts at alpha^2 = 1 - 1.7e-6 with
            # beta = 0.1): the uniform-t estimator's variance lives in events too rare for
            # 65536 draws to show, so its sample standard error is unreliable. (3) covers
            # ddpm instead.
            mean, se = mean_and_se(uniform)
            assert abs(mean - exact) < 3 * se, (denoiser, mean, exact, se)
        mean = np.sum(T_WEIGHTS * nodes.mean(1))
        se = math.sqrt(np.sum(T_WEIGHTS**2 * nodes.var(1, ddof=1) / REPS))
        assert abs(mean - exact) < 3 * se, (denoiser, mean, exact, se)
        assert se < 0.01 * exact
    # The poor denoiser costs more: the optimum is not an artefact of the estimator.
    assert quad_gamma(linear_map_mse) > quad_gamma(oracle_mse) + 5


# ---------------------------------------------------------------------------- discrete time


FINEST = 2**13


@functools.cache
def fine_grid(name):
    """gamma on the T = 8192 grid in float64; coarser grids (T = 2^k) are nested in it."""
    schedule = schedules.SCHEDULES[name](G0, G1)
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        g = jax.jit(schedule.gamma)({}, jnp.linspace(0.0, 1.0, FINEST + 1))
        return np.asarray(g, np.float64)
    finally:
        jax.config.update("jax_enable_x64", previous)


def expected_discrete(name, timesteps, mse):
    """Exact E[L_T] = 0.5 sum_i expm1(g_i - g_{i-1}) M(g_i), one term per grid step (each
    step has probability 1/T and its loss carries a factor T)."""
    g = fine_grid(name)[:: FINEST // timesteps]
    return 0.5 * np.sum(np.expm1(g[1:] - g[:-1]) * mse(g[1:]))


@pytest.mark.parametrize("name", ["fixed_linear", "cosine"])
def test_discrete_loss_decreases_to_continuous(name):
    """With exact expectations: L_T falls as T doubles, stays above L_inf, and meets it.

    The per-step term is (SNR_s - SNR_t) times the x-error at t, and the x-error grows as
    SNR falls, so each step over-estimates its slice of the integral; refining the grid
    (doubling T nests the old grid) can only shrink the over-estimate.
    """
    for mse in (oracle_mse, linear_map_mse):
        cont = quad_gamma(mse)
        values = [expected_discrete(name, 2**k, mse) for k in range(14)]
        assert all(v > cont for v in values)
        assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True))
        # The gap shrinks like 1/T (halves with each doubling once T resolves the schedule's
        # steepest part), so it goes to zero; at T = 8192 it is a few percent at most.
        gaps = np.array(values) - cont
        assert 0.45 < gaps[-1] / gaps[-2] <= 0.5
        assert gaps[-1] < 0.03 * cont


@jax.jit
def _discrete_losses(key):
    """Losses at mid-step times for T = 2 and 1024 (every step, repeated), with the
    returned gamma_t; and T = 16 with times from the library's sampler."""
    schedule = schedules.fixed_linear(G0, G1)
    out = {}
    for timesteps, reps in ((2, 16384), (1024, 64)):
        key, k1, k2 = jax.random.split(key, 3)
        steps = jnp.arange(1, timesteps + 1)
        mid = jnp.repeat((steps - 0.5) / timesteps, reps)
        terms = losses.loss_terms(
            oracle(),
            schedule,
            {},
            gaussian_data(k1, mid.size),
            k2,
            vocab_size=None,
            timesteps=timesteps,
            t=mid,
        )
        out[timesteps] = (
            terms["diffusion"].reshape(timesteps, reps),
            terms["gamma_t"].reshape(timesteps, reps),
        )
    key, k1, k2 = jax.random.split(key, 3)
    sampled = losses.loss_terms(
        oracle(), schedule, {}, gaussian_data(k1, 1 << 16), k2, vocab_size=None, timesteps=16
    )
    return out, (sampled["diffusion"], sampled["gamma_t"])


def test_mc_discrete_loss_matches_exact_expectation():
    per_step, (sampled, sampled_gamma) = _discrete_losses(jax.random.PRNGKey(2))
    for timesteps, (loss, gamma_t) in per_step.items():
        # Any time inside ((i-1)/T, i/T] is step i, evaluated at gamma(i/T).
        grid = fine_grid("fixed_linear")[:: FINEST // timesteps]
        np.testing.assert_allclose(gamma_t, np.repeat(grid[1:, None], loss.shape[1], 1), atol=1e-5)
        exact = expected_discrete("fixed_linear", timesteps, oracle_mse)
        loss = np.asarray(loss, np.float64)
        mean = loss.mean(1).mean()
        se = math.sqrt(np.sum(loss.var(1, ddof=1) / loss.shape[1])) / timesteps
        assert abs(mean - exact) < 3 * se, (timesteps, mean, exact, se)
        assert se < 0.01 * exact
    # The sampler's times land on the 16 grid points, each about equally often.
    grid = fine_grid("fixed_linear")[:: FINEST // 16][1:]
    hits = np.abs(np.asarray(sampled_gamma)[:, None] - grid).argmin(1)
    assert np.allclose(np.asarray(sampled_gamma), grid[hits], atol=1e-5)
    np.testing.assert_allclose(np.bincount(hits, minlength=16) / len(hits), 1 / 16, rtol=0.1)
    mean, se = mean_and_se(sampled)
    exact = expected_discrete("fixed_linear", 16, oracle_mse)
    assert abs(mean - exact) < 3 * se, (mean, exact, se)
    # And T = 16 is measurably worse than continuous time.
    assert mean - 3 * se > quad_gamma(oracle_mse)


# ------------------------------------------------------------- parameterisations and jit


def converted(parameterization):
    """The oracle, re-expressed as a prediction of another kind."""

    def denoise(z, gamma, cond=None):
        eps_hat = oracle()(z, gamma, cond)
        return diffusion.from_eps(eps_hat, z, gamma, parameterization)

    return denoise


def _all_parameterizations(key, t, timesteps_list):
    schedule = schedules.fixed_linear(G0, G1)
    x = gaussian_data(key, t.shape[0], t.dtype)
    return {
        (p, timesteps): losses.loss_terms(
            converted(p),
            schedule,
            {},
            x,
            key,
            vocab_size=None,
            parameterization=p,
            t=t,
            timesteps=timesteps,
        )["diffusion"]
        for p in diffusion.PARAMETERIZATIONS
        for timesteps in timesteps_list
    }


def test_parameterizations_give_the_same_loss(x64):
    """The oracle converted to x/v/score predictions gives the eps loss, to float64 round-off,
    in continuous and discrete time."""
    t = jnp.linspace(0.0, 1.0, 257)
    out = jax.jit(_all_parameterizations, static_argnums=2)(jax.random.PRNGKey(3), t, (0, 20))
    for (p, timesteps), loss in out.items():
        np.testing.assert_allclose(loss, out["eps", timesteps], rtol=1e-9, atol=1e-9, err_msg=p)


def test_parameterizations_agree_in_float32():
    t = jnp.linspace(0.0, 1.0, 257)
    out = jax.jit(_all_parameterizations, static_argnums=2)(jax.random.PRNGKey(3), t, (0,))
    for (p, _), loss in out.items():
        # x-prediction hands back eps as (z - alpha x) / sigma: float32 round-off of z times
        # 1/sigma (770 at gamma_min) against an error of order one.
        np.testing.assert_allclose(loss, out["eps", 0], rtol=1e-3, atol=1e-4, err_msg=p)


COMBINATIONS = (  # (timesteps, loss_type, weighting, schedule_grad)
    (0, "elbo", "none", "elbo"),
    (10, "elbo", "none", "elbo"),
    (0, "elbo", "none", "variance"),
    (0, "simple", "none", "variance"),
    (0, "weighted", "sigmoid", "variance"),
    (0, "simple", "none", "elbo"),
    (10, "simple", "none", "elbo"),
    (0, "weighted", "none", "elbo"),
    (0, "weighted", "sigmoid", "elbo"),
    (10, "weighted", "sigmoid", "elbo"),
)


@jax.jit
def _every_combination(key):
    """Loss types, weightings, time discretisations and schedule gradients under one jit
    (the parameterisations are covered, jitted, by the tests above)."""
    schedule = schedules.learned_linear(G0, G1)
    params = schedule.init(key)
    x = gaussian_data(key, 16)
    return {
        combo: losses.loss_terms(
            oracle(),
            schedule,
            params,
            x,
            key,
            vocab_size=None,
            timesteps=combo[0],
            loss_type=combo[1],
            weighting=combo[2],
            schedule_grad=combo[3],
        )
        for combo in COMBINATIONS
    }


def test_everything_jits_and_loss_types_follow_their_definitions():
    out = _every_combination(jax.random.PRNGKey(4))
    for (timesteps, loss_type, weighting, grad), terms in out.items():
        for name, value in terms.items():
            assert value.shape == (16,), name
            assert np.all(np.isfinite(value)), (name, timesteps, loss_type, grad)
        # The ELBO is the same whatever is trained.
        np.testing.assert_allclose(
            terms["total"], out[timesteps, *COMBINATIONS[0][1:]]["total"], rtol=1e-6
        )
        np.testing.assert_allclose(
            terms["total"], terms["diffusion"] + terms["prior"] + terms["recon"], rtol=1e-6
        )
        np.testing.assert_allclose(terms["bpd"], terms["total"] / (DIM * math.log(2)), rtol=1e-6)
        rest = terms["prior"] + terms["recon"]
        if loss_type == "elbo":
            want = terms["total"]
        elif loss_type == "simple":
            # Per-dimension eps MSE, recovered from the ELBO's diffusion term, whose weight
            # is 0.5 gamma' = 0.5 (G1 - G0) or 0.5 T expm1((G1 - G0) / T) for this schedule.
            weight = 0.5 * (timesteps * math.expm1((G1 - G0) / timesteps) if timesteps else G1 - G0)
            want = terms["diffusion"] / weight / DIM
        else:
            weight = losses.WEIGHTINGS[weighting](terms["gamma_t"])
            want = weight * terms["diffusion"] + rest
        np.testing.assert_allclose(terms["train"], want, rtol=1e-5, err_msg=str(loss_type))
    sigmoid = out[0, "weighted", "sigmoid", "elbo"]
    assert np.any(np.abs(sigmoid["train"] - sigmoid["total"]) > 1.0)


def test_bad_options_raise():
    schedule = schedules.fixed_linear()
    x = jnp.zeros((2, DIM))
    key = jax.random.PRNGKey(0)
    for kwargs, match in (
        ({"loss_type": "mse"}, "loss type"),
        ({"loss_type": "weighted", "weighting": "nope"}, "weighting"),
        ({"schedule_grad": "nope"}, "schedule_grad"),
        ({"schedule_grad": "variance", "timesteps": 10}, "continuous time"),
        ({"timesteps": -1}, "timesteps"),
    ):
        with pytest.raises(ValueError, match=match):
            losses.loss_terms(oracle(), schedule, {}, x, key, vocab_size=None, **kwargs)
    with pytest.raises(AssertionError):
        # A denoiser returning the wrong shape must not broadcast into a wrong loss.
        jax.eval_shape(
            lambda: losses.loss_terms(
                lambda z, g, c: z[:, :1], schedule, {}, x, key, vocab_size=None
            )
        )
    with pytest.raises(ValueError):
        jax.eval_shape(
            lambda: losses.loss_terms(
                oracle(), schedule, {}, x, key, vocab_size=None, t=jnp.ones(3)
            )
        )


def test_sample_times():
    n = 1000
    t = np.asarray(
        jax.jit(losses.sample_times, static_argnums=(1, 2))(jax.random.PRNGKey(5), n, True)
    )
    assert np.all((t >= 0) & (t < 1))
    # Antithetic: exactly one time in each stratum [i/n, (i+1)/n).
    np.testing.assert_array_equal(np.sort(np.floor(t * n)), np.arange(n))
    t = np.asarray(
        jax.jit(losses.sample_times, static_argnums=(1, 2))(jax.random.PRNGKey(5), n, False)
    )
    assert np.all((t >= 0) & (t < 1))
    assert len(np.unique(np.floor(t * n))) < 0.7 * n  # iid times collide in strata


# ------------------------------------------------------------------------------ float64


def test_float32_matches_float64(monkeypatch):
    """The same losses in both precisions, with identical noise, agree to float32 precision.

    float64 normals are drawn from other bits than float32 ones, so for the float64 run
    jax.random.normal is patched to return the float32 draws, upcast. The absolute floor
    is the float32 grain of z_0 itself: at gamma_0 = -13.3, z_0 / alpha_0 rounds to 5e-5 of
    the decoder's noise scale, which moves each sub-pixel's log-likelihood by ~1e-4 nats.
    """
    schedule = schedules.learned_net(G0, G1, n_features=16, pin_endpoints=True)
    params = schedule.init(jax.random.PRNGKey(6))
    t = np.linspace(0.0, 1.0, 65, dtype=np.float32)
    x_cont = np.asarray(gaussian_data(jax.random.PRNGKey(7), 65))
    x_int = np.random.default_rng(8).integers(0, 256, (65, 2, 2, 3))

    def image_denoiser(z, gamma, cond=None):
        return 0.5 * z + 0.1 * gamma[:, None, None, None]

    def run(dtype):
        p = jax.tree.map(lambda v: jnp.asarray(v, dtype), params)
        key, tt = jax.random.PRNGKey(9), jnp.asarray(t, dtype)
        x = jnp.asarray(x_cont, dtype)
        return {
            "continuous": losses.loss_terms(oracle(), schedule, p, x, key, vocab_size=None, t=tt),
            "discrete_time": losses.loss_terms(
                oracle(), schedule, p, x, key, vocab_size=None, t=tt, timesteps=100
            ),
            "images": losses.loss_terms(
                image_denoiser, schedule, p, x_int, key, vocab_size=256, t=tt
            ),
        }

    lo = jax.jit(run, static_argnums=0)(jnp.float32)
    normal = jax.random.normal
    monkeypatch.setattr(
        jax.random,
        "normal",
        lambda key, shape=(), dtype=float: normal(key, shape, jnp.float32).astype(dtype),
    )
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        hi = jax.jit(run, static_argnums=0)(jnp.float64)
    finally:
        jax.config.update("jax_enable_x64", previous)
    for case in lo:
        for term in lo[case]:
            a, b = lo[case][term], hi[case][term]
            assert a.dtype == jnp.float32 and b.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=3e-5, atol=5e-4, err_msg=f"{case} {term}")


# ---------------------------------------------------------------------------------- prior


def test_prior_loss_matches_naive_kl(x64):
    """KL(N(alpha x, sigma^2) || N(0, 1)) = log(1 / sigma) + (sigma^2 + alpha^2 x^2 - 1) / 2."""
    rng = np.random.default_rng(17)
    x = rng.uniform(-1, 1, (16, 6))
    g1 = np.linspace(-3.0, 10.0, 16)
    got = jax.jit(losses.prior_loss)(x, g1)
    a2, s2 = np_alpha2_sigma2(g1[:, None])
    want = np.sum(-0.5 * np.log(s2) + 0.5 * (s2 + a2 * x**2 - 1), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # float32 at gamma_1 = 15 (KL ~ 1e-7 per dimension, where sigma^2 - 1 cancels): still
    # accurate to float32 precision, relative.
    g1 = np.full(16, 15.0)
    got32 = np.asarray(jax.jit(losses.prior_loss)(x.astype(np.float32), g1.astype(np.float32)))
    a2, s2 = np_alpha2_sigma2(g1[:, None])
    want = np.sum(0.5 * (a2 * (x.astype(np.float32) ** 2 - 1) - np.log(s2)), axis=1)
    np.testing.assert_allclose(got32, want, rtol=1e-4)
