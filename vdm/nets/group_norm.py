"""Group normalisation with nn.GroupNorm's parameters and numbers, computed in two stages.

nn.GroupNorm reduces a [B, H, W, G, C/G] view over (H, W, C/G) at once. With the U-Net's 2 to 4
channels per group that reduction's innermost run is 2-4 floats long, which XLA:CPU vectorises
badly (a 32x32x64 batch of 32 took 12.6 ms forward with swish). Here the moments are first
reduced over the spatial axes per (example, channel), along contiguous channels, and only then
combined per group on the tiny [B, C] result (3.5 ms). Left to autodiff, that form's gradient
fused badly inside the whole network, so the backward pass is written out: it needs only two
per-(example, channel) sums. The reduced U-Net's train step went from 3.9-4.2 s to 3.6 s and
its temporaries from 2304 to 1925 MiB (experiments/benchmark.py).

swish(GroupNorm(x)), which every ResNet block computes twice, is also one custom-gradient
function (`swish=True`, model.fused_norm_swish): autodiff of the composition keeps the
normalised values for swish's gradient beside the x this backward pass keeps, a second
activation-sized buffer per norm; the fused backward recomputes them from x and the [B, G]
statistics instead. In float32 the numbers are the composition's; the reduced U-Net's step
temporaries fell from 1631 to 1255 MiB (experiments/results/train_speed_fused_norm.md).

The parameters ('scale' ones, 'bias' zeros, float32, shape [C]) and the statistics (float32,
E[x^2] - E[x]^2 clipped at 0, epsilon 1e-6) are nn.GroupNorm's, so checkpoints and numbers
carry over; the output is cast to `dtype`.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _moments(x, num_groups):
    # Per-(example, group) mean and variance of float32 x [B, ..., C], reduced in two stages.
    batch, channels = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    per_group = (batch, num_groups, channels // num_groups)
    mean = jnp.mean(jnp.mean(x, axis=axes).reshape(per_group), axis=-1)
    sq = jnp.mean(jnp.mean(jnp.square(x), axis=axes).reshape(per_group), axis=-1)
    return mean, jnp.maximum(sq - jnp.square(mean), 0.0)


def _per_channel(s, x_shape, num_groups):
    # [B, G] -> [B, 1, ..., 1, C], each group's value repeated over its channels.
    out = (x_shape[0],) + (1,) * (len(x_shape) - 2) + (x_shape[-1],)
    return jnp.repeat(s, x_shape[-1] // num_groups, axis=-1).reshape(out)


def _statistics(x, num_groups, epsilon):
    mean, var = _moments(x, num_groups)
    return mean, jax.lax.rsqrt(var + epsilon)


def _normalized(x, mean, inv, num_groups):
    return (x - _per_channel(mean, x.shape, num_groups)) * _per_channel(inv, x.shape, num_groups)


def _normalize_fwd(x, scale, bias, num_groups, epsilon):
    mean, inv = _statistics(x, num_groups, epsilon)
    return _normalized(x, mean, inv, num_groups) * scale + bias, (x, scale, mean, inv)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, num_groups, epsilon):
    return _normalize_fwd(x, scale, bias, num_groups, epsilon)[0]


def _affine_grads(xhat, inv, scale, g, num_groups):
    # With xhat = (x - mean) * inv and y = xhat * scale + bias, the gradients from dL/dy = g:
    #   dx = inv * (g scale - mean_group(g scale) - xhat mean_group(g scale xhat)),
    # and every reduction needed is a per-(example, channel) sum of g or of g * xhat.
    axes = tuple(range(1, xhat.ndim - 1))
    sum_g = jnp.sum(g, axis=axes)  # [B, C]
    sum_gx = jnp.sum(g * xhat, axis=axes)
    batch, channels = xhat.shape[0], xhat.shape[-1]
    count = xhat.size // (batch * num_groups)
    per_group = (batch, num_groups, channels // num_groups)
    m1 = jnp.sum((sum_g * scale).reshape(per_group), axis=-1) / count
    m2 = jnp.sum((sum_gx * scale).reshape(per_group), axis=-1) / count
    m1_c = _per_channel(m1, xhat.shape, num_groups)
    m2_c = _per_channel(m2, xhat.shape, num_groups)
    dx = _per_channel(inv, xhat.shape, num_groups) * (g * scale - m1_c - xhat * m2_c)
    return dx, jnp.sum(sum_gx, axis=0), jnp.sum(sum_g, axis=0)


def _normalize_bwd(num_groups, epsilon, residuals, g):
    # No barrier here: this form's output is kept for whatever follows it anyway, and with the
    # barrier kept (vdm/runtime.py item 5) the unfused step needed 1791 MiB instead of 1631.
    del epsilon
    x, scale, mean, inv = residuals
    return _affine_grads(_normalized(x, mean, inv, num_groups), inv, scale, g, num_groups)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _normalize_swish_fwd(x, scale, bias, num_groups, epsilon):
    mean, inv = _statistics(x, num_groups, epsilon)
    y = _normalized(x, mean, inv, num_groups) * scale + bias
    return jax.nn.swish(y), (x, scale, bias, mean, inv)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize_swish(x, scale, bias, num_groups, epsilon):
    return _normalize_swish_fwd(x, scale, bias, num_groups, epsilon)[0]


def _normalize_swish_bwd(num_groups, epsilon, residuals, g):
    # The normalised y is recomputed from x rather than kept: autodiff of swish(GroupNorm(x))
    # keeps y (and GroupNorm keeps x) for every block, a second activation-sized buffer.
    # The barrier keeps XLA from merging this recomputation with the forward pass's identical
    # expression (CSE), which would keep the normalised values alive after all: measured, the
    # reduced U-Net's step temporaries stayed at 1631 MiB without it (1255 MiB with it).
    del epsilon
    x, scale, bias, mean, inv = jax.lax.optimization_barrier(residuals)
    xhat = _normalized(x, mean, inv, num_groups)
    y = xhat * scale + bias
    sig = jax.nn.sigmoid(y)
    g_y = g * sig * (1.0 + y * (1.0 - sig))  # d/dy y sigmoid(y)
    return _affine_grads(xhat, inv, scale, g_y, num_groups)


_normalize_swish.defvjp(_normalize_swish_fwd, _normalize_swish_bwd)


def group_norm(
    x, scale, bias, num_groups: int, epsilon: float = 1e-6, dtype=None, swish: bool = False
):
    """Normalises x [B, ..., C] over its middle axes and each group of C // num_groups channels.

    Args:
      x: input; statistics are computed in float32 whatever its dtype.
      scale, bias: [C] per-channel affine parameters.
      num_groups: number of channel groups (must divide C).
      epsilon: added to the variance.
      dtype: output dtype (x's if None).
      swish: apply swish (in float32, before the cast) in the same custom-gradient function,
        whose backward pass recomputes the normalised values instead of keeping them.

    Returns:
      An array shaped like x.
    """
    channels = x.shape[-1]
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups.")
    fn = _normalize_swish if swish else _normalize
    y = fn(jnp.asarray(x, jnp.float32), scale, bias, num_groups, epsilon)
    return y.astype(dtype or x.dtype)


class GroupNorm(nn.Module):
    """Drop-in for nn.GroupNorm(num_groups, dtype=...) on channels-last inputs; with swish=True
    for swish(nn.GroupNorm(...)(x)), fused (see group_norm)."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = None
    swish: bool = False

    @nn.compact
    def __call__(self, x):
        """x: [B, ..., C], or a tuple of parts whose channel concatenation is the input and
        no group of which spans two parts; then a tuple of the parts' normalised values."""
        parts = x if isinstance(x, tuple) else (x,)
        channels = sum(part.shape[-1] for part in parts)
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        if not isinstance(x, tuple):
            return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype, self.swish)
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels do not split into {self.num_groups} groups.")
        per_group = channels // self.num_groups
        out, start = [], 0
        for part in parts:
            width = part.shape[-1]
            if width % per_group:
                raise ValueError(
                    f"A part of {width} channels splits a group of {per_group} channels."
                )
            s, groups = slice(start, start + width), width // per_group
            out.append(
                group_norm(part, scale[s], bias[s], groups, self.epsilon, self.dtype, self.swish)
            )
            start += width
        return tuple(out)
