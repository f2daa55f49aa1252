"""The learned multivariate schedule (vdm/core/multivariate.py) and the ELBO built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.core import losses, schedules
from vdm.core.schedules import Schedule

SHAPE = (4, 4, 2)
G_MIN, G_MAX = -8.0, 5.0


def make(**options):
    return schedules.build_schedule(
        "multivariate", options, gamma_min=G_MIN, gamma_max=G_MAX, data_shape=SHAPE
    )


def monotone(schedule, params):
    g = schedule.gamma(params, jnp.linspace(0.0, 1.0, 257))
    return bool(jnp.all(jnp.diff(g, axis=0) >= 0.0))


@pytest.mark.parametrize("per", ["per_pixel", "per_channel"])
@pytest.mark.parametrize("learn_endpoints", [False, True])
def test_shapes_pinned_endpoints_and_monotone_after_updates(per, learn_endpoints):
    s = make(per=per, learn_endpoints=learn_endpoints)
    params = s.init(jax.random.PRNGKey(0))
    assert s.event_shape == SHAPE
    assert s.gamma(params, jnp.zeros((3,))).shape == (3,) + SHAPE
    expect = SHAPE if per == "per_pixel" else (1, 1, 2)
    assert params["logits"].shape == expect + (9,)
    assert monotone(s, params)
    g0, g1 = schedules.endpoints(s, params)
    np.testing.assert_allclose(g0, G_MIN, atol=1e-5)
    np.testing.assert_allclose(g1, G_MAX, atol=1e-5)
    # Large random updates (as many steps of a big learning rate would make) keep it monotone;
    # pinned endpoints stay where the config puts them.
    key = jax.random.PRNGKey(1)
    moved = jax.tree.map(lambda p: p + 5.0 * jax.random.normal(key, p.shape), params)
    assert monotone(s, moved)
    g0, g1 = schedules.endpoints(s, moved)
    if not learn_endpoints:
        np.testing.assert_allclose(g0, G_MIN, atol=1e-5)
        np.testing.assert_allclose(g1, G_MAX, atol=1e-5)
    else:
        assert float(jnp.std(g1)) > 0.1  # each element has its own endpoint


def _denoise(z, gamma, cond):
    # Depends on the [B] gamma the network is given, so the test sees that it is the right one.
    del cond
    return 0.3 * z + 0.1 * gamma[:, None, None, None]


def test_identical_elements_give_the_scalar_elbo():
    """Per-element gammas all equal to one scalar schedule: the same ELBO terms."""
    mv = make(learn_endpoints=True)
    params = mv.init(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: jnp.broadcast_to(p.reshape(-1, *p.shape[3:])[0], p.shape),
                          params)  # fmt: skip
    scalar = Schedule("one", mv.init, lambda p, t: mv.gamma(p, t)[..., 0, 0, 0])
    x = jax.random.randint(jax.random.PRNGKey(2), (6,) + SHAPE, 0, 17)
    for timesteps in (0, 10):
        kw = dict(vocab_size=17, parameterization="v", timesteps=timesteps)
        a = losses.loss_terms(_denoise, mv, params, x, jax.random.PRNGKey(3), **kw)
        b = losses.loss_terms(_denoise, scalar, params, x, jax.random.PRNGKey(3), **kw)
        for k in ("diffusion", "prior", "recon", "total"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-5, err_msg=k)


def test_gradient_reaches_every_element():
    s = make(learn_endpoints=True)
    params = s.init(jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(2), (8,) + SHAPE, 0, 17)

    def loss(p):
        terms = losses.loss_terms(_denoise, s, p, x, jax.random.PRNGKey(4), vocab_size=17)
        return jnp.mean(terms["total"])

    grads = jax.jit(jax.grad(loss))(params)
    for name, g in grads.items():
        assert g.shape == params[name].shape
        per_element = jnp.abs(g).reshape(*SHAPE, -1).sum(-1)
        assert bool(jnp.all(per_element > 0.0)), name


def test_diffusion_term_weights_each_element_by_its_own_slope():
    s = make()
    params = s.init(jax.random.PRNGKey(5))
    x = jax.random.randint(jax.random.PRNGKey(2), (3,) + SHAPE, 0, 17)
    t = jnp.array([0.2, 0.5, 0.9])
    terms = losses.loss_terms(_denoise, s, params, x, jax.random.PRNGKey(6), vocab_size=17, t=t)
    # By hand: 0.5 sum_i gamma_i'(t) (eps_i - eps_hat_i)^2 with the same draws of eps.
    _, k_eps, _ = jax.random.split(jax.random.PRNGKey(6), 3)
    x_enc = 2.0 * (x + 0.5) / 17 - 1.0
    eps = jax.random.normal(k_eps, x_enc.shape)
    g, slope = schedules.gamma_and_slope(s, params, t)
    z = jnp.sqrt(jax.nn.sigmoid(-g)) * x_enc + jnp.sqrt(jax.nn.sigmoid(g)) * eps
    eps_hat = _denoise(z, schedules.network_gamma(g), None)
    want = 0.5 * jnp.sum(slope * (eps - eps_hat) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(terms["diffusion"], want, rtol=1e-5)
    assert float(jnp.std(slope[0])) > 0.0  # the elements' slopes differ


@pytest.mark.parametrize(
    "kw", [{"schedule_grad": "variance"}, {"loss_type": "weighted", "weighting": "sigmoid"}]
)
def test_unsupported_objectives_are_refused(kw):
    s = make()
    x = jnp.zeros((2,) + SHAPE, jnp.int32)
    with pytest.raises(ValueError, match="multivariate"):
        losses.loss_terms(_denoise, s, s.init(jax.random.PRNGKey(0)), x,
                          jax.random.PRNGKey(1), vocab_size=17, **kw)  # fmt: skip
