"""Importance-sampled time: the proposals' densities, weights and histogram, and that the ELBO
keeps its expectation under every proposal while a good one lowers its variance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th

from vdm import parallel
from vdm.core import losses, time_proposals
from vdm.data import densities
from vdm.run import evaluate
from vdm.run.setup import KeyStream, build_run

PROBS = jnp.asarray([0.05, 0.4, 0.15, 0.1, 0.3])


@pytest.mark.parametrize("antithetic", [False, True])
def test_samples_follow_the_proposal_and_weights_are_its_inverse_density(antithetic):
    u = losses.sample_times(jax.random.key(0), 20_000, antithetic)
    t, w = time_proposals.sample(PROBS, u)
    assert float(t.min()) >= 0.0 and float(t.max()) < 1.0
    counts = np.bincount(np.floor(np.asarray(t) * 5).astype(int), minlength=5) / t.shape[0]
    np.testing.assert_allclose(counts, PROBS, atol=0.01)
    np.testing.assert_allclose(w, 1.0 / time_proposals.density(PROBS, t), rtol=1e-5)
    # E_q[f / q] = int_0^1 f: for f(t) = 4 t^3 the integral is 1; antithetic u stratify it.
    estimate = float(jnp.mean(4 * t**3 * w))
    assert estimate == pytest.approx(1.0, abs=2e-4 if antithetic else 0.03)


def test_normalise_mixes_in_the_floor_and_survives_an_empty_histogram():
    np.testing.assert_allclose(time_proposals.normalise(jnp.zeros(4), 0.1), 0.25)
    p = time_proposals.normalise(jnp.asarray([0.0, 1.0, 3.0, 0.0]), 0.2)
    np.testing.assert_allclose(p, [0.05, 0.25, 0.65, 0.05], rtol=1e-6)


def test_histogram_update_averages_squares_per_bin_and_keeps_unseen_bins():
    hist = jnp.asarray([0.0, 2.0, 4.0, 0.0])
    t = jnp.asarray([0.1, 0.12, 0.6, 0.62])
    f = jnp.asarray([1.0, 3.0, 2.0, 2.0])
    out = time_proposals.histogram_update(hist, t, f, rate=0.5)
    # Bin 0 first seen: its batch mean of f^2 (5); bin 1 unseen: kept; bin 2: 0.5*4 + 0.5*4.
    np.testing.assert_allclose(out, [5.0, 2.0, 4.0, 0.0])


def test_schedule_proposal_is_uniform_for_a_linear_schedule():
    run = build_run(th.load_config(schedule__type="fixed_linear"))
    params = run.model.init_params(jax.random.key(0))
    probs = run.model.time_probs(params, None, "schedule")
    np.testing.assert_allclose(probs, 1.0 / run.config.loss.time.bins, rtol=1e-5)


def test_bad_proposal_settings_fail_at_assembly():
    with pytest.raises(ValueError, match="Unknown time proposal 'sqrt'"):
        build_run(th.load_config(loss__time__proposal="sqrt"))
    with pytest.raises(ValueError, match="needs continuous time"):
        build_run(th.load_config(loss__time__proposal="adaptive", loss__timesteps=10))


def test_the_elbo_keeps_its_expectation_and_adaptive_times_lower_its_variance():
    # 16-dim Gaussian data and its exact denoiser: the ELBO's Monte-Carlo noise is then the
    # diffusion term's dependence on t. A histogram of per-t squared losses from uniform
    # draws makes the adaptive proposal; its ELBO must agree with the uniform one's and have
    # a clearly smaller standard error on the same examples.
    config = th.load_config(
        data__gaussian__dim=16,
        data__gaussian__num_eval=512,
        data__eval_batch_size=128,
        schedule__type="fixed_linear",
        schedule__gamma_min=-13.3,
    )
    run = build_run(config)
    oracle = th.gaussian_oracle(16)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, network=oracle))
    params = {"model": {}, "schedule": {}}
    x = jnp.asarray(densities.default_gaussian(16).sample(np.random.default_rng(0), 4096)[0])
    terms = run.model.loss_terms(params, {"x": x}, jax.random.key(1), train=False)
    count, sum_sq = time_proposals.histogram_sums(terms["t"], terms["diffusion"], 32)
    hist = sum_sq / jnp.maximum(count, 1.0)

    out = {}
    for proposal in ("uniform", "schedule", "adaptive"):
        r = dataclasses.replace(run, estimators={"elbo": {"proposal": proposal}})
        out[proposal] = evaluate.evaluate(r, params, time_hist=hist)
    uni, ada = out["uniform"], out["adaptive"]
    for proposal, o in out.items():
        se = np.hypot(o["eval/bpd_stderr"], uni["eval/bpd_stderr"])
        assert abs(o["eval/bpd"] - uni["eval/bpd"]) < 3 * se, proposal
    assert ada["eval/bpd_stderr"] < 0.7 * uni["eval/bpd_stderr"], (ada, uni)


@pytest.mark.parametrize("extra", [[], ["--config.optim.accum_steps=2"],
                                   ["--config.schedule.grad=variance"]])  # fmt: skip
def test_adaptive_training_times_from_the_command_line(extra):
    config = th.parse_flags(
        *th.overrides(train__num_steps=30), "--config.loss.time.proposal=adaptive",
        "--config.loss.time.bins=8", *extra,
    )  # fmt: skip
    run = build_run(config)
    assert run.model.objective.time.proposal == "adaptive" and run.model.objective.time.bins == 8
    state, step = run.init_state(), run.compiled_steps()(1)
    key = run.key(KeyStream.TRAIN)
    batches = run.train_batches(0)
    for _ in range(30):
        state, metrics = step(state, parallel.global_batch(next(batches), run.mesh), key)
    assert np.isfinite(float(metrics["train/loss"]))
    hist = np.asarray(state.time_hist)
    assert hist.shape == (8,) and (hist > 0).all()  # 30 x 8 antithetic times visit every bin
    probs = run.model.time_probs(state.params, state.time_hist, "adaptive")
    assert float(probs.max() - probs.min()) > 0.01  # no longer uniform
