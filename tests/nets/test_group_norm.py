"""vdm.nets.group_norm matches nn.GroupNorm: same parameters, outputs and gradients.

Checked on 4-D (images) and 3-D inputs, 1 to 8 channels per group, float32 and bfloat16, and a
non-divisible channel count is refused by name.
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
