"""Tests of vdm.schedules: endpoints, monotonicity, the forward-mode slope and the formulas.

Every schedule must start at gamma_min and end at gamma_max (pinned learned_net to the last
bit, even under jit), learned schedules must be monotone for any parameter value, and
gamma_and_slope must be the true derivative because it weights the continuous-time loss.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.core import schedules

G_MIN, G_MAX = -13.3, 5.0
N_FEATURES = 32  # small net: these tests are about structure, not width


def make(name, gamma_min=G_MIN, gamma_max=G_MAX):
    """Builds a schedule by test id; learned_net comes pinned or free."""
    if name == "learned_net_pinned":
        return schedules.learned_net(gamma_min, gamma_max, N_FEATURES, pin_endpoints=True)
    if name == "learned_net":
        return schedules.learned_net(gamma_min, gamma_max, N_FEATURES, pin_endpoints=False)
    return schedules.SCHEDULES[name](gamma_min, gamma_max)


def random_net_params(seed, scale, n=N_FEATURES):
    """Learned-net parameters far from init, with negative kernels on purpose: monotonicity
    must come from the absolute values inside the schedule, not from positive draws."""
    # numpy draws: test inputs need no jax dispatch (each eager op compiles on first use).
    rng = np.random.default_rng(seed)
    return {
        "l1_w": 18.3 * rng.standard_normal(),
        "l1_b": 3.0 * rng.standard_normal(),
        "l2_w": scale * rng.standard_normal(n),
        "l2_b": scale * rng.standard_normal(n),
        "l3_w": 10.0 * scale * n * rng.standard_normal(n),
    }


ALL = ["fixed_linear", "learned_linear", "learned_net", "learned_net_pinned", "cosine", "ddpm"]


@pytest.mark.parametrize("name", ALL)
def test_endpoints_at_init(name):
    for ends in [(G_MIN, G_MAX), (-10.0, 8.0)]:
        schedule = make(name, *ends)
        params = schedule.init(jax.random.PRNGKey(0))
        g = np.asarray(jax.jit(schedule.gamma)(params, jnp.array([0.0, 1.0])))
        assert g.dtype == np.float32
        want = np.float32(ends)
        # float32 rounding of t-space constants is amplified by d gamma / d u at the ends:
        # a few ulps, except the cosine near gamma = 8 (d gamma / d u ~ 170 there). The free
        # net's sigmoid branch adds sum|l3| (2 sigmoid(|l2|) - 1) / n ~ 1e-5 at t = 1.
        atol = {"learned_net": 1e-4, "cosine": 2e-5}.get(name, 4 * np.spacing(np.float32(13.3)))
        np.testing.assert_allclose(g, want, rtol=0, atol=atol)
        g0, g1 = schedules.endpoints(schedule, params)
        np.testing.assert_allclose([g0, g1], want, rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["fixed_linear", "learned_net_pinned"])
def test_exact_endpoints(name):
    """Pinned endpoints are bit-exact whatever the batch shape, eagerly and under jit."""
    schedule = make(name)
    jitted = jax.jit(schedule.gamma)
    for batch in [2, 7, 1000]:
        t = jnp.linspace(0.0, 1.0, batch)
        for seed, scale in [(0, 0.01), (1, 1.0), (2, 5.0)]:
            params = schedule.init(jax.random.PRNGKey(seed))
            if name == "learned_net_pinned":
                params = random_net_params(seed, scale)
            # Eager dispatch compiles every op per shape: check it on one batch size only.
            for fn in (schedule.gamma, jitted) if batch == 7 else (jitted,):
                g = np.asarray(fn(params, t))
                assert g[0] == np.float32(G_MIN), (batch, seed, g[0])
                assert g[-1] == np.float32(G_MAX), (batch, seed, g[-1])


def test_pinned_snap_keeps_the_derivative(x64):
    """The exact-endpoint snap must not zero the slope at t = 0, 1 (the loss weight)."""
    schedule = make("learned_net_pinned")
    params = random_net_params(3, 1.0)
    _, slope = jax.jit(schedules.gamma_and_slope, static_argnums=0)(
        schedule, params, jnp.array([0.0, 1.0])
    )
    # One-sided differences (gamma lives on [0, 1]) from the points 0, h, 1 - h, 1.
    h = 1e-7
    g = jax.jit(schedule.gamma)(params, jnp.array([0.0, h, 1.0 - h, 1.0]))
    fd = jnp.array([g[1] - g[0], g[3] - g[2]]) / h
    assert np.all(np.asarray(slope) > 0)
    np.testing.assert_allclose(slope, fd, rtol=1e-5)


@pytest.mark.parametrize("name", ["learned_linear", "learned_net", "learned_net_pinned"])
def test_learned_schedules_monotone_for_random_params(name, x64):
    schedule = make(name)
    fn = jax.jit(lambda p, t: schedules.gamma_and_slope(schedule, p, t))
    t = jnp.linspace(0.0, 1.0, 4001)
    for scale in [0.01, 1.0, 10.0]:
        for seed in range(4):
            if name == "learned_linear":
                # Negative w on purpose: the |w| in the schedule keeps it increasing.
                w = -5.0 * scale * np.random.default_rng(seed).standard_normal() ** 2
                params = {"w": w, "b": 1.0}
            else:
                params = random_net_params(seed, scale)
            g, slope = fn(params, t)
            assert np.all(np.diff(np.asarray(g)) >= 0), (seed, scale)
            assert np.all(np.asarray(slope) >= 0), (seed, scale)


@pytest.mark.parametrize("name", ALL)
def test_slope_matches_finite_differences(name, x64):
    """gamma_and_slope against central differences in float64, learned ones off init."""
    schedule = make(name)
    params = schedule.init(jax.random.PRNGKey(0))
    if name.startswith("learned_net"):
        params = random_net_params(4, 1.0)
    elif name == "learned_linear":
        params = {"w": jnp.asarray(-7.5), "b": jnp.asarray(-2.0)}
    t = jnp.linspace(0.01, 0.99, 99)
    h = 1e-6

    @jax.jit
    def slope_and_fd(params):
        g, slope = schedules.gamma_and_slope(schedule, params, t)
        fd = (schedule.gamma(params, t + h) - schedule.gamma(params, t - h)) / (2 * h)
        return g, slope, fd, schedule.gamma(params, t)

    g, slope, fd, direct = slope_and_fd(params)
    assert g.dtype == slope.dtype == jnp.float64
    # Truncation h^2 gamma''' / 6 (steepest: ddpm/cosine near t = 0.01, about 1e-6) and
    # round-off 1e-16 |gamma| / h (about 1e-9) are both far below 1e-7 of the slope.
    np.testing.assert_allclose(slope, fd, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(g, direct, rtol=1e-14, atol=1e-14)


def test_cosine_is_the_cosine_schedule(x64):
    """alpha^2 = sigmoid(-gamma) must equal cos^2(pi u / 2) with u affine in t."""
    schedule = make("cosine")
    t = jnp.linspace(0.0, 1.0, 101)
    alpha2 = jax.nn.sigmoid(-schedule.gamma({}, t))
    u0 = 2 / math.pi * math.atan(math.exp(G_MIN / 2))
    u1 = 2 / math.pi * math.atan(math.exp(G_MAX / 2))
    np.testing.assert_allclose(alpha2, np.cos(np.pi / 2 * (u0 + (u1 - u0) * t)) ** 2, rtol=1e-12)


def test_ddpm_has_linear_beta(x64):
    """-log alpha^2 = int beta: its t-derivative (beta) is beta_min at 0 and linear in t."""
    schedule = make("ddpm")

    def neg_log_alpha2(t):
        return -jax.nn.log_sigmoid(-schedule.gamma({}, t))

    beta = jax.jit(jax.vmap(jax.grad(neg_log_alpha2)))(jnp.linspace(0.0, 1.0, 11))
    np.testing.assert_allclose(beta[0], 0.1, rtol=1e-9)
    np.testing.assert_allclose(np.diff(beta, 2), 0.0, atol=1e-9)
    assert beta[-1] > beta[0]


def test_learned_net_init_matches_published_structure():
    schedule = schedules.learned_net(n_features=1024)
    params = schedule.init(jax.random.PRNGKey(0))
    assert float(params["l1_w"]) == pytest.approx(18.3)
    assert float(params["l1_b"]) == pytest.approx(-13.3)
    for name in ("l2_w", "l3_w"):
        assert params[name].shape == (1024,)
        assert 0.008 < float(jnp.std(params[name])) < 0.012
    np.testing.assert_array_equal(params["l2_b"], 0.0)


@jax.jit
def _all_at_quarter(t):
    """Every schedule's (gamma, slope) at t [3, 5] and gamma at the scalar 0.25."""
    out = {}
    for name in ALL:
        schedule = make(name)
        params = schedule.init(jax.random.PRNGKey(0))
        out[name] = (
            *schedules.gamma_and_slope(schedule, params, t),
            schedule.gamma(params, 0.25),
        )
    return out


def test_gamma_broadcasts_over_any_shape():
    for name, (g, slope, scalar) in _all_at_quarter(jnp.full((3, 5), 0.25)).items():
        assert g.shape == slope.shape == (3, 5), name
        assert scalar.shape == (), name
        np.testing.assert_allclose(g, scalar, rtol=1e-6)


def test_build_schedule_by_name():
    for kind in schedules.SCHEDULES:
        opts = {"pin_endpoints": True} if kind == "learned_net" else {}
        schedule = schedules.build_schedule(
            kind, opts, gamma_min=-10.0, gamma_max=6.0, data_shape=(3,)
        )
        params = schedule.init(jax.random.PRNGKey(0))
        g0, g1 = jax.jit(schedules.endpoints, static_argnums=0)(schedule, params)
        # A multivariate schedule has one endpoint per element (data_shape reaches it only).
        np.testing.assert_allclose([jnp.max(g0), jnp.min(g1)], [-10.0, 6.0], atol=1e-4)
    net = schedules.build_schedule("learned_net", {"n_features": 8}, gamma_min=-1.0, gamma_max=1.0)
    assert net.init(jax.random.PRNGKey(0))["l2_w"].shape == (8,)
    with pytest.raises(ValueError, match="Unknown schedule"):
        schedules.build_schedule("nope", gamma_min=0.0, gamma_max=1.0)
    with pytest.raises(ValueError, match="unknown options n_feature"):
        schedules.build_schedule("learned_net", {"n_feature": 8}, gamma_min=0.0, gamma_max=1.0)
