"""Samplers and likelihoods in log-SNR time: the schedule's numerical inverse, DPM-Solver++
against the Gaussian oracle's moments, and the PF-ODE in gamma against the ODE in t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_dpm_solver_on_curved_learned_schedule_converges_to_ode():
    """On a strongly curved learned schedule the log-SNR grid needs the numerical inverse;
    DPM-Solver++ 3M then matches an accurate PF-ODE solve per sample."""
    sched, params = _curved()
    key, shape = jax.random.key(2), (256, 3)
    ref = samplers.sample_z0("ode", GAUSS, sched, params, key, shape, steps=10,
                             solver="tsit5", rtol=1e-6, atol=1e-6)  # fmt: skip
    errs = [float(jnp.max(jnp.abs(samplers.sample_z0(
        "dpm_solver", GAUSS, sched, params, key, shape, steps=n, order=3) - ref)))
        for n in (20, 40)]  # fmt: skip
    assert errs[1] < 0.3 * errs[0] and errs[1] < 0.02, errs


def test_ode_in_log_snr_matches_ode_in_t():
    sched, params = _curved()
    key, shape = jax.random.key(3), (256, 3)
    opts = dict(steps=10, solver="tsit5", rtol=1e-5, atol=1e-5)
    in_t = samplers.sample_z0("ode", GAUSS, sched, params, key, shape, **opts)
    in_g = samplers.sample_z0("ode", GAUSS, sched, params, key, shape, time="log_snr", **opts)
    np.testing.assert_allclose(in_g, in_t, atol=2e-3)


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


def test_guidance_and_config_reach_dpm_solver():
    labels = jnp.arange(64) % 2
    cond = {"label": labels}
    sched = schedules.learned_linear()
    params = {"w": jnp.asarray(-20.0), "b": jnp.asarray(-12.5)}

    def run(den, **kw):
        return samplers.sample("dpm_solver", den, sched, params, jax.random.key(3), (64, 2),
                               vocab_size=32, steps=6, order=3, **kw)  # fmt: skip

    uncond = run(MIX)
    np.testing.assert_array_equal(run(MIX, cond=cond, guidance=0.0, num_classes=2), uncond)
    conditional = run(lambda z, g, c: MIX(z, g, {"label": labels}))
    np.testing.assert_array_equal(run(MIX, cond=cond, guidance=1.0), conditional)
    config = base_config()
    assert config.sample.dpm_solver.order == 2 and config.sample.dpm_solver.spacing == "log_snr"
    assert config.sample.ode.time == "t" and config.eval.ode.time == "t"
