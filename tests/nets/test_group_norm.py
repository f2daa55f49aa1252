"""vdm.nets.group_norm matches nn.GroupNorm: same parameters, outputs and gradients.

Checked on 4-D (images) and 3-D inputs, 1 to 8 channels per group, float32 and bfloat16, and a
non-divisible channel count is refused by name. The fused swish(GroupNorm) (swish=True) is
the composition in values and in gradients with respect to x, scale and bias, whole or in parts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm.nets.group_norm import GroupNorm


@pytest.mark.parametrize(
    "shape,groups", [((4, 8, 8, 64), 32), ((3, 5, 6, 16), 16), ((2, 10, 32), 4)]
)
def test_matches_flax_group_norm(shape, groups):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)
    ours, ref = GroupNorm(groups), nn.GroupNorm(groups)
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, params
    )
    # A trained-looking affine part, so the gradients with respect to it are not trivial.
    params = {
        "params": {
            "scale": 1 + 0.3 * jax.random.normal(jax.random.key(2), (shape[-1],)),
            "bias": 0.2 * jax.random.normal(jax.random.key(3), (shape[-1],)),
        }
    }
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=2e-5)
    g = jax.random.normal(jax.random.key(4), shape)
    grad = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * g), (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(ref)), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-4)


def test_bfloat16_output_and_float32_statistics():
    x = 100.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 8))  # large mean: needs f32
    ours = GroupNorm(4, dtype=jnp.bfloat16)
    params = ours.init(jax.random.key(1), x)
    y = ours.apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = nn.GroupNorm(4).apply(params, x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.05)


def test_channels_must_split_into_groups():
    with pytest.raises(ValueError, match="12 channels do not split into 8 groups"):
        GroupNorm(8).init(jax.random.key(0), jnp.ones((1, 2, 2, 12)))


def test_parts_are_normalised_as_their_concatenation():
    # model.skip_join=split: GroupNorm of (h, skip) part by part, groups never straddling.
    a = 1.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    b = -2.0 + 3.0 * jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
    norm = GroupNorm(6)
    params = norm.init(jax.random.key(2), jnp.concatenate([a, b], -1))
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), params)
    whole = norm.apply(params, jnp.concatenate([a, b], -1))
    parts = norm.apply(params, (a, b))
    np.testing.assert_allclose(jnp.concatenate(parts, -1), whole, atol=1e-6)
    with pytest.raises(ValueError, match="splits a group of 4 channels"):
        GroupNorm(6).init(jax.random.key(0), (a[..., :6], jnp.concatenate([a, b[..., :10]], -1)))


def _affine(channels, seed):
    # A trained-looking affine part: swish's curvature then matters on both sides of 0.
    return {
        "params": {
            "scale": 1 + 0.5 * jax.random.normal(jax.random.key(seed), (channels,)),
            "bias": 0.7 * jax.random.normal(jax.random.key(seed + 1), (channels,)),
        }
    }


@pytest.mark.parametrize("parts", [False, True])
def test_fused_swish_is_swish_of_the_norm_with_the_same_gradients(parts):
    x = 2.0 + 3.0 * jax.random.normal(jax.random.key(0), (3, 6, 6, 32))
    inputs = (x[..., :8], x[..., 8:]) if parts else x
    params = _affine(32, 1)
    g = jax.random.normal(jax.random.key(4), x.shape)

    def fused(p, inputs):
        y = GroupNorm(8, swish=True).apply(p, inputs)
        return jnp.concatenate(y, -1) if parts else y

    def composed(p, inputs):
        y = GroupNorm(8).apply(p, inputs)
        return jnp.concatenate([nn.swish(a) for a in y], -1) if parts else nn.swish(y)

    np.testing.assert_allclose(fused(params, inputs), composed(params, inputs), atol=1e-6)
    # sin(.) * g: a cotangent that is not constant, so every term of the backward pass counts.
    grad = lambda f: jax.grad(lambda p, i: jnp.sum(jnp.sin(f(p, i)) * g), (0, 1))(params, inputs)
    ours, ref = jax.tree.leaves(grad(fused)), jax.tree.leaves(grad(composed))
    assert len(ours) == len(ref) == (4 if parts else 3)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_fused_swish_keeps_one_activation_for_the_backward_pass():
    # What the fusion is for: autodiff of the composition saves the normalised values beside
    # x; the fused form saves x and the [B, G] statistics only.
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
    params = _affine(32, 1)

    def saved_bytes(swish_fused):
        def f(x):
            if swish_fused:
                return GroupNorm(8, swish=True).apply(params, x)
            return nn.swish(GroupNorm(8).apply(params, x))

        _, vjp = jax.vjp(f, x)
        return sum(a.nbytes for a in jax.tree.leaves(vjp) if a.size >= x.size)

    assert saved_bytes(True) == x.nbytes
    assert saved_bytes(False) >= 2 * x.nbytes


def test_fused_swish_in_bfloat16():
    x = 1.0 + jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    params = _affine(8, 1)
    y = GroupNorm(4, dtype=jnp.bfloat16, swish=True).apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = nn.swish(GroupNorm(4).apply(params, x.astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.03)
