"""Which loss trains what (vdm.core.losses.loss_terms): under loss_type simple or weighted the
network gets the gradient of that loss, and the learned schedule gets exactly the ELBO's
gradient (or, with schedule_grad=variance, exactly the variance rule's), as under
loss_type=elbo with the same key.

The denoiser is affine in z with a gamma term and its parameters closed over, as a network's
are, so the schedule's gradient runs through the prediction (via z_t and gamma_t) too: a
version that merely stopped the prediction's gradient would fail here.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.core import losses, schedules

MU = jnp.array([0.5, -1.0, 0.0, 2.0])
VAR = jnp.array([0.01, 0.25, 1.0, 4.0])


def affine_denoiser(den):
    def denoise(z, gamma, cond=None):
        del cond
        return z @ den["w"].T + den["b"] + 0.05 * jnp.tanh(gamma)[:, None] * den["c"]

    return denoise


def learned_net():
    schedule = schedules.learned_net(-13.3, 5.0, n_features=8)
    rng = np.random.default_rng(0)
    params = {
        "l1_w": 16.0,
        "l1_b": -12.0,
        "l2_w": 3.0 * rng.standard_normal(8),
        "l2_b": rng.standard_normal(8),
        "l3_w": 60.0 * rng.standard_normal(8),
    }
    return schedule, jax.tree.map(jnp.asarray, params)


SCHEDULES = {
    "learned_linear": lambda: (
        schedules.learned_linear(),
        {"w": jnp.asarray(17.0), "b": jnp.asarray(-12.5)},
    ),
    "learned_net": learned_net,
}
LOSSES = (("simple", "none"), ("weighted", "none"), ("weighted", "sigmoid"))
SETTINGS = [(0, "elbo"), (0, "variance"), (10, "elbo")]  # (timesteps, schedule_grad)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_gets_the_elbo_gradient_under_every_loss(name, x64):
    schedule, params = SCHEDULES[name]()
    rng = np.random.default_rng(1)
    den = {
        "w": jnp.asarray(0.3 * rng.standard_normal((4, 4))),
        "b": jnp.asarray(0.1 * rng.standard_normal(4)),
        "c": jnp.asarray(rng.standard_normal(4)),
    }
    x = MU + jnp.sqrt(VAR) * jnp.asarray(rng.standard_normal((32, 4)))
    key = jax.random.PRNGKey(2)

    def objective(p, d, loss_type, weighting, timesteps, grad):
        terms = losses.loss_terms(
            affine_denoiser(d),
            schedule,
            p,
            x,
            key,
            vocab_size=None,
            timesteps=timesteps,
            loss_type=loss_type,
            weighting=weighting,
            schedule_grad=grad,
        )
        return terms["train"].mean(), terms

    @jax.jit
    def gradients():
        out = {}
        for (timesteps, grad), (loss_type, weighting) in itertools.product(
            SETTINGS, LOSSES + (("elbo", "none"),)
        ):
            args = (loss_type, weighting, timesteps, grad)
            (_, terms), g = jax.value_and_grad(objective, (0, 1), has_aux=True)(params, den, *args)
            # The network's gradient with the schedule held fixed: that of the loss alone.
            g_fixed = jax.grad(lambda d, args=args: objective(params_sg(), d, *args)[0])(den)
            out[timesteps, grad, loss_type, weighting] = (g, g_fixed, terms)
        return out

    def params_sg():
        return jax.tree.map(jax.lax.stop_gradient, params)

    out = gradients()
    for timesteps, grad in SETTINGS:
        (g_elbo_sched, g_elbo_net), _, elbo_terms = out[timesteps, grad, "elbo", "none"]
        assert max(np.max(np.abs(v)) for v in jax.tree.leaves(g_elbo_sched)) > 1e-3
        for loss_type, weighting in LOSSES:
            (g_sched, g_net), g_fixed, terms = out[timesteps, grad, loss_type, weighting]
            msg = f"{name} T={timesteps} {grad} {loss_type}/{weighting}"
            for leaf in g_sched:
                np.testing.assert_allclose(
                    g_sched[leaf], g_elbo_sched[leaf], rtol=1e-9, atol=1e-12, err_msg=msg
                )
            for leaf in den:
                np.testing.assert_allclose(g_net[leaf], g_fixed[leaf], rtol=1e-10, err_msg=msg)
            # The network is trained by its own loss, not the ELBO ("weighted/none" is the
            # ELBO's diffusion weighting, so its network gradient is the ELBO's).
            differs = max(float(np.max(np.abs(g_net[k] - g_elbo_net[k]))) for k in den)
            assert (differs < 1e-9) == (weighting == "none" and loss_type == "weighted"), msg
            # Values are untouched: the reported ELBO is the same whatever trains.
            np.testing.assert_allclose(terms["total"], elbo_terms["total"], rtol=1e-12)
