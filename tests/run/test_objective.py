"""What trains the schedule, and how evaluation draws its times, driven from the config.

Every run here is a config (tests/train_helpers TINY, 16-d Gaussian data) assembled by
build_run, with its network swapped for the exact denoiser of the data (vdm.core.oracles), so
the schedule is the only thing that can learn and every figure has a known reference:

  - the learned schedule's endpoints follow the same path under loss.type=elbo, simple and
    weighted (the schedule is trained by the ELBO whatever trains the network);
  - with schedule.grad=variance the train step gives the shape the gradient of
    mean((L_diffusion in bits/dim)^2), the unit the loss is optimised in;
  - schedule.grad=variance is refused in discrete time when the run is assembled;
  - the variance rule lowers the ELBO estimator's variance for a learned_net schedule;
  - evaluation's standard error matches the spread of repeated evaluations (independent
    times within an eval batch).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_helpers as th
from scipy import stats

from vdm import estimators
from vdm.core import oracles
from vdm.core.schedules import Schedule
from vdm.data import densities
from vdm.run.setup import KeyStream, build_run
from vdm.run.state import create_state
from vdm.run.step import make_train_step
from vdm.sampling import likelihood

DIM = 16
DIST = densities.default_gaussian(DIM)
MEAN, CHOL = jnp.asarray(DIST.mean), jnp.asarray(np.linalg.cholesky(DIST.cov))


class Oracle(nn.Module):
    """The exact eps-denoiser of the data as a network (one unused weight, so the optimiser
    and EMA see a model subtree like any network's)."""

    @nn.compact
    def __call__(self, z, gamma, cond=None, train: bool = False):
        del cond, train
        self.param("unused", nn.initializers.zeros, ())
        return oracles.gaussian_eps(DIST.mean, DIST.cov)(z, gamma)


def oracle_run(**extra):
    """build_run of TINY on the 16-d Gaussian, Adam without warm-up, the exact denoiser."""
    config = th.load_config(
        data__gaussian__dim=DIM, optim__name="adam", optim__warmup_steps=0, **extra
    )
    run = build_run(config)
    return dataclasses.replace(run, model=dataclasses.replace(run.model, network=Oracle()))


def gaussian_batch(key, n):
    return MEAN + jax.random.normal(key, (n, DIM)) @ CHOL.T


def train(run, steps: int, batch: int):
    """`steps` of the run's own train step on fresh data; returns the final parameters."""
    step = run.train_step()
    key = run.key(KeyStream.TRAIN)

    @jax.jit
    def go(state):
        def body(state, k):
            state, _ = step(state, {"x": gaussian_batch(k, batch)}, key)
            return state, None

        keys = jax.random.split(jax.random.key(9), steps)
        return jax.lax.scan(body, state, keys)[0]

    return go(create_state(run.model, run.optimizer, run.key(KeyStream.INIT))).params


def test_schedule_follows_the_elbo_under_every_training_loss():
    """With only the schedule to learn, elbo, simple and weighted runs are the same run.

    On the old code the eps-MSE pulled both endpoints up (gamma_1 5 -> 10.4 here) and the
    sigmoid weighting pulled gamma_0 down, while the ELBO run moved them elsewhere.
    """
    ends = {}
    for loss, weighting in (("elbo", "none"), ("simple", "none"), ("weighted", "sigmoid")):
        run = oracle_run(
            schedule__type="learned_linear",
            loss__type=loss,
            loss__weighting=weighting,
            optim__learning_rate=1e-2,
        )
        ends[loss] = np.array([float(g) for g in run.model.endpoints(train(run, 150, 64))])
    # The ELBO run did move the endpoints (so agreement is not trivial) ...
    assert np.max(np.abs(ends["elbo"] - [-13.3, 5.0])) > 1.0, ends
    # ... and the other losses moved them identically, to float32 round-off.
    for loss in ("simple", "weighted"):
        np.testing.assert_allclose(ends[loss], ends["elbo"], atol=1e-3, err_msg=loss)


def bent_schedule():
    """gamma = G0 + (G1 - G0) (t + a t (1 - t)), a = 0.9 tanh(p): fixed endpoints, one shape
    parameter, so the whole schedule gradient is the variance rule's."""
    g0, g1 = -13.3, 5.0

    def gamma(params, t):
        a = 0.9 * jnp.tanh(params["p"])
        return g0 + (g1 - g0) * (t + a * t * (1.0 - t))

    return Schedule("bent", lambda key: {"p": jnp.asarray(0.4)}, gamma)


def test_variance_rule_in_the_train_step_is_the_gradient_of_the_squared_bpd():
    """SGD(1) through make_train_step moves the shape by -grad mean(L_diffusion_bpd^2).

    The reference is plain jax.grad of the squared diffusion loss in bits/dim with the same
    (t, eps) draw; the old code was (D ln 2) = 11.1 times larger.
    """
    run = oracle_run(schedule__grad="variance")
    model = dataclasses.replace(run.model, schedule=bent_schedule())
    step = make_train_step(model, optax.sgd(1.0), lr_fn=lambda s: 1.0)
    key = run.key(KeyStream.TRAIN)
    batch = {"x": gaussian_batch(jax.random.key(3), 64)}
    state = create_state(model, optax.sgd(1.0), jax.random.key(0))
    new, _ = jax.jit(step)(state, batch, key)
    moved = float(state.params["schedule"]["p"] - new.params["schedule"]["p"])

    plain = dataclasses.replace(
        model, objective=dataclasses.replace(model.objective, schedule_grad="elbo")
    )

    def mean_sq_bpd(sched):
        params = dict(state.params, schedule=sched)
        terms = plain.loss_terms(params, batch, jax.random.fold_in(key, 0), train=True)
        return jnp.mean((terms["diffusion"] / (DIM * math.log(2.0))) ** 2)

    want = float(jax.jit(jax.grad(mean_sq_bpd))(state.params["schedule"])["p"])
    assert abs(want) > 1e-3, want
    np.testing.assert_allclose(moved, want, rtol=1e-4)


def test_variance_rule_is_refused_in_discrete_time():
    with pytest.raises(ValueError, match="continuous time.*loss.timesteps"):
        build_run(th.load_config(schedule__grad="variance", loss__timesteps=10))
    # Either alone is fine, and so is the rule with a non-ELBO loss.
    build_run(th.load_config(loss__timesteps=10))
    build_run(th.load_config(schedule__grad="variance", loss__type="simple"))


def diffusion_variance(model, params, n=1 << 14):
    """Per-example variance of the diffusion loss (nats^2) at a fixed key, with its s.e."""

    @jax.jit
    def moments(params):
        kx, kl = jax.random.split(jax.random.key(7))
        loss = model.loss_terms(params, {"x": gaussian_batch(kx, n)}, kl, train=False)
        d = loss["diffusion"]
        var = d.var()
        # Var of a sample variance is (mu_4 - var^2) / n.
        return var, jnp.sqrt((jnp.mean((d - d.mean()) ** 4) - var**2) / n)

    return [float(v) for v in moments(params)]


def test_variance_rule_lowers_the_elbo_estimators_variance():
    """learned_net trained 200 steps by each rule: the variance rule cuts the estimator's
    variance well beyond its error; the ELBO rule (zero-mean interior gradient) does not."""
    out = {}
    for grad in ("elbo", "variance"):
        run = oracle_run(
            schedule__type="learned_net",
            schedule__grad=grad,
            schedule__learned_net__n_features=16,
            optim__learning_rate=3e-2,
        )
        init = create_state(run.model, run.optimizer, run.key(KeyStream.INIT)).params
        out["before"] = diffusion_variance(run.model, init)
        out[grad] = diffusion_variance(run.model, train(run, 200, 128))
    (v0, se0), (v1, se1) = out["before"], out["variance"]
    assert v1 < 0.75 * v0 and v0 - v1 > 4 * math.hypot(se0, se1), out
    assert v1 < 0.75 * out["elbo"][0], out


def test_eval_standard_error_matches_the_spread_of_repeated_evaluations():
    """40 evaluations, each of a fresh 1024-example split with its own key: the standard
    deviation of their means must match the reported standard error.

    Each evaluation is an iid draw of the estimator, so (R - 1) s^2 / se^2 is chi^2(R - 1)
    (the mean of 1024 examples is Gaussian to a good approximation and se varies by about 2%
    between repeats); the bounds are its 0.05% and 99.95% quantiles. Antithetic times within
    each eval batch (the old behaviour) make the means less spread than the s.e. claims.
    """
    run = oracle_run(schedule__type="fixed_linear")
    params = {"model": {"unused": jnp.zeros(())}, "schedule": {}}
    terms = jax.jit(lambda b, k: estimators.elbo(run.model, params, b, k))
    reps, batches, size = 40, 4, 256
    means, ses = [], []
    for r in range(reps):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(11), r), batches)
        split = [{"x": gaussian_batch(k, size), "mask": jnp.ones((size,))} for k in keys]
        out = likelihood.evaluate_estimate(
            terms, split, key=jax.random.fold_in(jax.random.key(12), r)
        )
        means.append(out["bpd"])
        ses.append(out["bpd_stderr"])
    ratio_sq = np.var(means, ddof=1) / np.mean(np.square(ses))
    low, high = stats.chi2.ppf([0.0005, 0.9995], reps - 1) / (reps - 1)
    assert low < ratio_sq < high, (ratio_sq, low, high)
