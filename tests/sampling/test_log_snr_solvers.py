"""Samplers and likelihoods in log-SNR time: the schedule's numerical inverse, DPM-Solver++
and UniPC against the Gaussian oracle (moments, convergence order, W2 of 1000-step ancestral
at <= 20 network evaluations), and the PF-ODE in gamma against the ODE in t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import gaussian_oracle
from tests.sampling.test_samplers import GAUSS, MIX, MU, SCHEDULE, VAR, _check_moments
from vdm.config_defaults import base_config
from vdm.core import schedules
from vdm.core.schedule_inverse import inverse_gamma
from vdm.sampling import likelihood, samplers


def _curved():
    sched = schedules.learned_net(-13.3, 10.0, n_features=8, pin_endpoints=True)
    params = sched.init(jax.random.key(1))
    return sched, dict(params, l2_w=params["l2_w"] * 400.0, l3_w=jnp.full((8,), 4000.0))


def test_inverse_gamma_of_learned_schedule_under_jit():
    sched, params = _curved()
    t = jnp.linspace(0.0, 1.0, 33)
    back = jax.jit(lambda p, g: inverse_gamma(sched, p, g))(params, sched.gamma(params, t))
    np.testing.assert_allclose(back, t, atol=2e-6)
    with pytest.raises(ValueError, match="iters"):
        inverse_gamma(sched, params, 0.0, iters=0)


# (options, steps, relative variance allowance): measured at 20000 samples, D = 3 (EDM's
# rho-spacing over-disperses by about 0.08 at 20 steps on this schedule).
CASES = [
    ({"order": 2}, 20, 0.03),
    ({"order": 3}, 20, 0.03),
    ({"order": 2, "spacing": "edm"}, 20, 0.1),
    ({"order": 3, "spacing": "t"}, 20, 0.03),
]


@pytest.mark.parametrize("opts,steps,var_bias", CASES)
def test_dpm_solver_matches_gaussian_moments(opts, steps, var_bias):
    x = samplers.sample("dpm_solver", GAUSS, SCHEDULE, {}, jax.random.key(0), (20_000, 3),
                        vocab_size=None, steps=steps, **opts)  # fmt: skip
    _check_moments(x, MU, VAR, var_bias, 0.01)


# Measured variance biases at 20 steps: 2 (bh2) 0.034, 3 0.009, 2 with edm spacing 0.08; 2 with
# bh1 0.08 (so bh2 is the default).
UNIPC_CASES = [
    ({"order": 2}, 20, 0.05),
    ({"order": 3}, 20, 0.03),
    ({"order": 2, "spacing": "edm"}, 20, 0.1),
    ({"order": 3, "variant": "bh1", "spacing": "t"}, 20, 0.03),
]


@pytest.mark.parametrize("opts,steps,var_bias", UNIPC_CASES)
def test_unipc_matches_gaussian_moments(opts, steps, var_bias):
    x = samplers.sample("unipc", GAUSS, SCHEDULE, {}, jax.random.key(0), (20_000, 3),
                        vocab_size=None, steps=steps, **opts)  # fmt: skip
    _check_moments(x, MU, VAR, var_bias, 0.01)


# Measured rates of the per-sample error against a tolerance-1e-7 ODE solve, 40 -> 80 steps:
# UniPC 2: 3.1 (bh1), 3.0 (bh2); UniPC 3: 2.9; DPM-Solver++ 2M: 2.0 (the corrector adds one
# order at no extra network evaluation).
@pytest.mark.parametrize("name,opts,rate", [
    ("dpm_solver", {"order": 2}, 1.8),
    ("unipc", {"order": 1}, 1.8),
    ("unipc", {"order": 2}, 2.7),
    ("unipc", {"order": 2, "variant": "bh2"}, 2.7),
    ("unipc", {"order": 3}, 2.7),
])  # fmt: skip
def test_convergence_order_against_an_accurate_ode_solve(name, opts, rate):
    key, shape = jax.random.key(2), (512, 3)
    ref = samplers.sample_z0("ode", GAUSS, SCHEDULE, {}, key, shape, steps=10,
                             solver="tsit5", rtol=1e-7, atol=1e-7)  # fmt: skip
    errs = [float(jnp.sqrt(jnp.mean((samplers.sample_z0(
        name, GAUSS, SCHEDULE, {}, key, shape, steps=n, **opts) - ref) ** 2)))
        for n in (40, 80)]  # fmt: skip
    assert np.log2(errs[0] / errs[1]) > rate, errs


# A 1000-step ancestral reference: 15 s at -O0 against 9 s at -O1.
@pytest.mark.run_bound
def test_log_snr_solvers_reach_1000_step_ancestral_w2_within_20_evaluations():
    """The issue's proof: W2 of the fitted Gaussian (D = 8, 16384 samples) within two
    exact-sample standard deviations of 1000-step ancestral's, network evaluations counted as
    they run (experiments/gaussian_oracle.py's measure at a smaller size).

    Measured (this seed): ancestral-1000 0.0277, band 0.0044; DPM-Solver++ 3M 0.052 at 15
    NFE, 0.0292 at 20; UniPC 3 0.0260 at 15, 0.0262 at 20; 2M 0.0376 and UniPC 2 0.0304 at 20.
    """
    dims, shape = 8, (16384, 8)
    mu, q, lam, denoise = gaussian_oracle.problem(dims)
    target = (mu, (q * np.sqrt(lam)) @ q.T, (q * lam) @ q.T)
    rng = np.random.default_rng(1)
    exact = [gaussian_oracle.w2_gaussian(mu + rng.normal(size=shape) * np.sqrt(lam) @ q.T,
                                        *target) for _ in range(8)]  # fmt: skip
    band = 2 * float(np.std(exact, ddof=1))

    def w2(name, steps, **opts):
        x = samplers.sample(name, denoise, gaussian_oracle.SCHEDULE, {}, jax.random.key(5),
                            shape, vocab_size=None, steps=steps, **opts)  # fmt: skip
        return gaussian_oracle.w2_gaussian(x, *target)

    ref = w2("ancestral", 1000)
    for name, steps in (("dpm_solver", 20), ("unipc", 15)):
        nfe = gaussian_oracle.count_nfe(denoise, name, {"order": 3}, steps, (64, dims))
        assert nfe == steps, (name, nfe)
        assert w2(name, steps, order=3) <= ref + band, (name, ref, band)


def test_dpm_solver_on_curved_learned_schedule_converges_to_ode():
    """On a strongly curved learned schedule the log-SNR grid needs the numerical inverse;
    DPM-Solver++ 3M then matches an accurate PF-ODE solve per sample."""
    sched, params = _curved()
    key, shape = jax.random.key(2), (256, 3)
    ref = samplers.sample_z0("ode", GAUSS, sched, params, key, shape, steps=10,
                             solver="tsit5", rtol=1e-6, atol=1e-6)  # fmt: skip
    for name in ("dpm_solver", "unipc"):
        errs = [float(jnp.max(jnp.abs(samplers.sample_z0(
            name, GAUSS, sched, params, key, shape, steps=n, order=3) - ref)))
            for n in (20, 40)]  # fmt: skip
        assert errs[1] < 0.3 * errs[0] and errs[1] < 0.02, (name, errs)


def test_ode_in_log_snr_matches_ode_in_t():
    sched, params = _curved()
    key, shape = jax.random.key(3), (256, 3)
    opts = dict(steps=10, solver="tsit5", rtol=1e-5, atol=1e-5)
    in_t = samplers.sample_z0("ode", GAUSS, sched, params, key, shape, **opts)
    for time in ("log_snr", "sigma", "log_sigma"):
        other = samplers.sample_z0("ode", GAUSS, sched, params, key, shape, time=time, **opts)
        np.testing.assert_allclose(other, in_t, atol=2e-3, err_msg=time)


def test_ode_log_prob_in_log_snr_matches_t():
    z0 = jax.random.normal(jax.random.key(4), (64, 2)) * 0.7
    outs = {
        time: likelihood.ode_log_prob(MIX, schedules.fixed_linear(-13.3, 5.0), {}, z0, None,
                                      trace="exact", time=time, rtol=1e-5, atol=1e-5)
        for time in ("t", "log_snr")
    }  # fmt: skip
    np.testing.assert_allclose(outs["log_snr"]["log_prob"], outs["t"]["log_prob"], atol=2e-3)
    with pytest.raises(ValueError, match="Unknown ODE time"):
        likelihood.ode_log_prob(MIX, SCHEDULE, {}, z0, None, trace="exact", time="lambda")


@pytest.mark.parametrize("name", ["dpm_solver", "unipc"])
def test_guidance_and_config_reach_log_snr_solvers(name):
    labels = jnp.arange(64) % 2
    cond = {"label": labels}
    sched = schedules.learned_linear()
    params = {"w": jnp.asarray(-20.0), "b": jnp.asarray(-12.5)}

    def run(den, **kw):
        return samplers.sample(name, den, sched, params, jax.random.key(3), (64, 2),
                               vocab_size=32, steps=6, order=3, **kw)  # fmt: skip

    uncond = run(MIX)
    np.testing.assert_array_equal(run(MIX, cond=cond, guidance=0.0, num_classes=2), uncond)
    conditional = run(lambda z, g, c: MIX(z, g, {"label": labels}))
    np.testing.assert_array_equal(run(MIX, cond=cond, guidance=1.0), conditional)
    config = base_config()
    assert config.sample[name].order == 2 and config.sample[name].spacing == "log_snr"
    assert config.sample.unipc.variant == "bh2"
    assert config.sample.ode.time == "t" and config.eval.ode.time == "t"
