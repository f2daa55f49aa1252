"""model.attention=deferred_norm computes the softmax attention's output and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.nets.test_nets import build, inputs, param_shapes, random_params
from vdm.nets import layers
from vdm.nets.layers import AttentionBlock, deferred_norm_attention


def softmax_attention(logits, v):
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def assert_close_tree(got, want, tol=1e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(float(jnp.abs(b).max()), 1.0)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


def test_deferred_norm_matches_softmax_and_its_gradients():
    rng = np.random.default_rng(0)
    # Logits spread over tens of units: exp without the max shift would overflow.
    logits = jnp.asarray(30.0 * rng.standard_normal((2, 3, 16, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 16, 3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 16, 3, 4)), jnp.float32)
    out = deferred_norm_attention(logits, v, jnp.float32)
    np.testing.assert_allclose(out, softmax_attention(logits, v), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda lg, v: jnp.sum(w * jnp.tanh(fn(lg, v)))

    got = jax.grad(loss(lambda lg, v: deferred_norm_attention(lg, v, jnp.float32)), (0, 1))(
        logits, v
    )
    want = jax.grad(loss(softmax_attention), (0, 1))(logits, v)
    assert_close_tree(got, want)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_block_forms_agree_in_output_and_parameter_gradients(num_heads):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    blocks = {
        name: AttentionBlock(num_heads, norm_groups=4, attention=name) for name in layers.ATTENTIONS
    }
    shapes = jax.eval_shape(blocks["softmax"].init, jax.random.key(0), x)["params"]
    # Random (not zero-initialised) output projection, so the attention output matters; larger
    # query/key weights give peaked weights.
    params = random_params(shapes, scale=0.5)

    def loss(block):
        return lambda p, x: jnp.sum(w * block.apply({"params": p}, x))

    results = {
        name: (block.apply({"params": params}, x), jax.grad(loss(block), (0, 1))(params, x))
        for name, block in blocks.items()
    }
    out, grads = results["deferred_norm"]
    want_out, want_grads = results["softmax"]
    assert float(jnp.abs(want_out - x).max()) > 0.1
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    assert_close_tree(grads, want_grads)


@pytest.mark.parametrize("kind", ["vdm_unet", "unet"])
def test_unets_take_the_attention_option(kind):
    z, gamma_t = inputs(kind)
    nets = {a: build(kind, with_attention=True, attention=a) for a in layers.ATTENTIONS}
    shapes = param_shapes(nets["softmax"], z, gamma_t)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(
        lambda s: s.shape, param_shapes(nets["deferred_norm"], z, gamma_t)
    )
    params = random_params(shapes)
    outs = {a: net.apply({"params": params}, z, gamma_t) for a, net in nets.items()}
    np.testing.assert_allclose(outs["deferred_norm"], outs["softmax"], rtol=1e-4, atol=1e-5)


def test_unknown_attention_is_rejected():
    x = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="Unknown attention"):
        AttentionBlock(norm_groups=2, attention="flash").init(jax.random.key(0), x)
