"""Tests of the variance-minimising schedule gradient (vdm.variance_grad, schedule_grad=...).

The claim: with schedule_grad="variance", the schedule's shape gets the gradient of
E[L_diffusion^2] while its endpoints and the denoiser get ordinary ELBO gradients, all in the
unit the train step optimises (bits/dim: the objective is mean(train) / (D ln 2) and the shape
gets grad mean((L_diffusion / (D ln 2))^2)). The
reference is built without the custom VJP: the schedule is split into an "end" copy of its
parameters, which only sets gamma(0) and gamma(1), and a "shape" copy, which only sets the
normalised curve (gamma - gamma(0)) / (gamma(1) - gamma(0)); ordinary autodiff of the ELBO in
the first copy plus autodiff of E[L^2] in the second is what the rewired gradient must equal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdm.core import losses, oracles, schedules
from vdm.core.variance_grad import frozen_closure, variance_gradient

MU = jnp.array([0.5, -1.0, 0.0, 2.0])
VAR = jnp.array([0.01, 0.25, 1.0, 4.0])
G0, G1 = -13.3, 5.0


def test_rewiring_on_a_toy_function():
    """L_i = a h_i^2 + c h_i with c closed over: h gets 2 L dL/dh; a and c get dL."""

    def total(h, a, c):
        return jnp.sum(variance_gradient(lambda h, a: a * h**2 + c * h, h, a))

    h, a, c = jnp.array([0.5, -1.0, 2.0]), jnp.float32(1.5), jnp.float32(-0.7)
    dh, da, dc = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(h, a, c)
    loss = a * h**2 + c * h
    np.testing.assert_allclose(dh, 2 * loss * (2 * a * h + c), rtol=1e-6)
    np.testing.assert_allclose(da, jnp.sum(h**2), rtol=1e-6)
    np.testing.assert_allclose(dc, jnp.sum(h), rtol=1e-6)
    # The forward value is untouched, and a pytree h works leaf by leaf.
    np.testing.assert_allclose(variance_gradient(lambda h, a: a * h**2 + c * h, h, a), loss)

    def pair(hs):
        return jnp.sum(variance_gradient(lambda hs: hs[0] * hs[1], hs))

    d0, d1 = jax.grad(pair)((h, 2 * h))
    np.testing.assert_allclose(d0, 2 * (2 * h**2) * 2 * h, rtol=1e-6)
    np.testing.assert_allclose(d1, 2 * (2 * h**2) * h, rtol=1e-6)


def test_scale_gives_the_gradient_of_the_squared_loss_in_that_unit():
    """Objective mean(L) / s: h gets grad mean((L / s)^2), a gets grad mean(L / s)."""
    h, a, scale = jnp.array([0.5, -1.0, 2.0]), jnp.float32(1.5), 7.0

    def objective(h, a):
        return jnp.mean(variance_gradient(lambda h, a: a * h**2 + h, h, a, scale=scale)) / scale

    dh, da = jax.grad(objective, argnums=(0, 1))(h, a)
    want_dh = jax.grad(lambda h: jnp.mean(((a * h**2 + h) / scale) ** 2))(h)
    np.testing.assert_allclose(dh, want_dh, rtol=1e-6)
    np.testing.assert_allclose(da, jnp.mean(h**2) / scale, rtol=1e-6)


def test_frozen_closure_differentiates_only_the_arguments():
    c = jnp.float32(3.0)
    grads = jax.grad(lambda x, c: frozen_closure(lambda y: c * y**2)(x), argnums=(0, 1))
    dx, dc = grads(jnp.float32(2.0), c)
    assert float(dx) == 12.0 and float(dc) == 0.0


def linear_denoiser(den_params):
    """eps_hat = W z + b, its parameters closed over (as a network's are)."""

    def denoise(z, gamma, cond=None):
        del cond
        return z @ den_params["w"].T + den_params["b"] + 0.01 * gamma[:, None]

    return denoise


def split(schedule):
    """The schedule with separate parameter copies for its endpoints and for its shape."""

    def gamma(params, t):
        g0, g1 = schedules.endpoints(schedule, params["end"])
        f0, f1 = schedules.endpoints(schedule, params["shape"])
        shape = (schedule.gamma(params["shape"], t) - f0) / (f1 - f0)
        return g0 + (g1 - g0) * shape

    return schedules.Schedule(schedule.name + "_split", lambda key: {}, gamma)


def random_net(pin, seed):
    schedule = schedules.learned_net(G0, G1, n_features=8, pin_endpoints=pin)
    rng = np.random.default_rng(seed)
    params = {
        "l1_w": 15.0 + rng.standard_normal(),
        "l1_b": -13.0 + rng.standard_normal(),
        "l2_w": 3.0 * rng.standard_normal(8),
        "l2_b": rng.standard_normal(8),
        "l3_w": 80.0 * rng.standard_normal(8),
    }
    return schedule, jax.tree.map(jnp.asarray, params)


CASES = {
    "learned_net_pinned": lambda: random_net(True, 0),
    "learned_net_free": lambda: random_net(False, 1),
    "learned_linear": lambda: (
        schedules.learned_linear(G0, G1),
        {"w": jnp.asarray(-17.0), "b": jnp.asarray(-12.5)},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_variance_gradient_matches_split_reference(case, x64):
    schedule, params = CASES[case]()
    rng = np.random.default_rng(2)
    den = {
        "w": jnp.asarray(0.3 * rng.standard_normal((4, 4))),
        "b": jnp.asarray([0.1, 0.0, -0.1, 0.2]),
    }
    x = MU + jnp.sqrt(VAR) * jnp.asarray(rng.standard_normal((32, 4)))
    key = jax.random.PRNGKey(3)

    def terms(sched, p, den, grad, timesteps):
        return losses.loss_terms(
            linear_denoiser(den),
            sched,
            p,
            x,
            key,
            vocab_size=None,
            timesteps=timesteps,
            schedule_grad=grad,
        )

    unit = x.shape[1] * np.log(2.0)  # nats per example -> bits/dim, as in vdm.run.step

    @jax.jit
    def all_grads(params, den):
        out = {}
        # Continuous time only: the rule is refused with timesteps > 0.
        for timesteps in (0,):

            def rewired(p, d, timesteps=timesteps):
                values = terms(schedule, p, d, "variance", timesteps)
                return values["train"].mean() / unit, values

            (_, v_var), (g_var, g_den) = jax.value_and_grad(rewired, (0, 1), has_aux=True)(
                params, den
            )

            # The reference: one forward pass of the split schedule, two backward passes.
            def moments(both, d, timesteps=timesteps):
                values = terms(split(schedule), both, d, "elbo", timesteps)
                bpd_sq = jnp.mean((values["diffusion"] / unit) ** 2)
                return (values["train"].mean() / unit, bpd_sq), values

            both = {"end": params, "shape": params}
            _, vjp, v_elbo = jax.vjp(moments, both, den, has_aux=True)
            one, zero = jnp.ones(()), jnp.zeros(())
            g_elbo, g_den_elbo = vjp((one, zero))
            g_sq, _ = vjp((zero, one))
            out[timesteps] = (v_var, v_elbo, g_var, g_den, g_elbo, g_den_elbo, g_sq)
        return out

    for timesteps, outputs in all_grads(params, den).items():
        v_var, v_elbo, g_var, g_den, g_elbo, g_den_elbo, g_sq = outputs
        msg = f"{case}, T={timesteps}"
        # Same forward values: only the gradient is rewired.
        for name in ("diffusion", "total", "train"):
            np.testing.assert_allclose(v_var[name], v_elbo[name], rtol=1e-12, err_msg=msg)
        # Endpoints: ELBO gradient through the "end" copy; shape: E[L^2] through "shape".
        for name in params:
            want = g_elbo["end"][name] + g_sq["shape"][name]
            np.testing.assert_allclose(g_var[name], want, rtol=1e-8, atol=1e-10, err_msg=msg)
        # The denoiser's gradient is the ELBO's.
        for name in den:
            np.testing.assert_allclose(g_den[name], g_den_elbo[name], rtol=1e-10, err_msg=msg)
        endpoint_grad = max(np.max(np.abs(g_elbo["end"][name])) for name in params)
        if case == "learned_net_pinned":
            # Fixed endpoints: the whole schedule gradient is plain autodiff of E[L^2].
            assert endpoint_grad < 1e-10, msg
            for name in params:
                full = g_sq["end"][name] + g_sq["shape"][name]
                np.testing.assert_allclose(g_var[name], full, rtol=1e-8, atol=1e-10, err_msg=msg)
        else:
            # Free endpoints get their (non-zero) ELBO gradients through the rewiring.
            assert endpoint_grad > 1e-3, msg
        if case == "learned_linear":
            # Its shape is t whatever (w, b) are: the variance gradient is the ELBO gradient.
            for name in params:
                full = g_elbo["end"][name] + g_elbo["shape"][name]
                np.testing.assert_allclose(g_var[name], full, rtol=1e-9, err_msg=msg)


def test_jit_grad_with_images_labels_and_closures():
    """Integer data, integer conditioning and closed-over parameters under jit(grad)."""
    schedule = schedules.learned_net(n_features=8, pin_endpoints=True)
    params = schedule.init(jax.random.PRNGKey(4))
    x = jnp.asarray(np.random.default_rng(5).integers(0, 256, (8, 4, 4, 3)))
    cond = {"label": jnp.arange(8) % 3}
    net = {"scale": jnp.float32(0.5), "embed": jnp.ones((3,)) * 0.1}

    def loss(params, net):
        def denoise(z, gamma, cond):
            shift = net["embed"][cond["label"]] * gamma
            return net["scale"] * z + shift[:, None, None, None]

        return losses.loss_terms(
            denoise,
            schedule,
            params,
            x,
            jax.random.PRNGKey(6),
            vocab_size=256,
            cond=cond,
            schedule_grad="variance",
        )["train"].mean()

    g_sched, g_net = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, net)
    for leaf in jax.tree.leaves((g_sched, g_net)):
        assert np.all(np.isfinite(leaf))
    assert abs(float(g_net["scale"])) > 0 and np.max(np.abs(g_sched["l3_w"])) > 0


# ----------------------------------------------------------------------------- training

N_EVAL = 1 << 16


def exact_loss():
    return float(oracles.gaussian_diffusion_loss(VAR, G0, G1))


def make_eval(schedule):
    @jax.jit
    def evaluate(params, key):
        """Per-example losses with iid times: mean, variance and their standard errors."""
        kx, kl = jax.random.split(key)
        x = MU + jnp.sqrt(VAR) * jax.random.normal(kx, (N_EVAL, 4))
        loss = losses.loss_terms(
            oracles.gaussian_eps(MU, VAR),
            schedule,
            params,
            x,
            kl,
            vocab_size=None,
            antithetic=False,
        )["diffusion"]
        mean, var = loss.mean(), loss.var()
        # Var of a sample variance is (mu_4 - var^2) / n.
        var_se = jnp.sqrt((jnp.mean((loss - mean) ** 4) - var**2) / N_EVAL)
        return mean, jnp.sqrt(var / N_EVAL), var, var_se

    return evaluate


def train_variance(schedule, params, steps, learning_rate, batch=256, seed=0):
    """Adam on the variance gradient with the exact denoiser; returns the new params."""
    opt = optax.adam(learning_rate)
    denoise = oracles.gaussian_eps(MU, VAR)

    def loss(params, key):
        kx, kl = jax.random.split(key)
        x = MU + jnp.sqrt(VAR) * jax.random.normal(kx, (batch, 4))
        return losses.loss_terms(
            denoise, schedule, params, x, kl, vocab_size=None, schedule_grad="variance"
        )["train"].mean()

    @jax.jit
    def run(params, key):
        def step(carry, key):
            params, state = carry
            updates, state = opt.update(jax.grad(loss)(params, key), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(
            step, (params, opt.init(params)), jax.random.split(key, steps)
        )
        return params

    return run(params, jax.random.PRNGKey(seed))


def test_variance_training_lowers_variance_keeps_mean():
    schedule = schedules.learned_net(G0, G1, n_features=32, pin_endpoints=True)
    params = schedule.init(jax.random.PRNGKey(0))
    evaluate = make_eval(schedule)
    eval_key = jax.random.PRNGKey(7)  # common random numbers before and after
    mean0, se0, var0, var_se0 = (float(v) for v in evaluate(params, eval_key))
    trained = train_variance(schedule, params, steps=300, learning_rate=0.05)
    mean1, se1, var1, var_se1 = (float(v) for v in evaluate(trained, eval_key))
    exact = exact_loss()
    # The ELBO does not move (endpoints pinned; invariance) ...
    assert abs(mean0 - exact) < 3 * se0, (mean0, exact, se0)
    assert abs(mean1 - exact) < 3 * se1, (mean1, exact, se1)
    # ... while the variance falls by more than 20%, well outside its own error.
    assert var1 < 0.8 * var0, (var0, var1)
    assert var0 - var1 > 3 * np.hypot(var_se0, var_se1)
    g0, g1 = schedules.endpoints(schedule, trained)
    assert float(g0) == np.float32(G0) and float(g1) == np.float32(G1)
