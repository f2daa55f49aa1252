"""Blocks shared by the score networks: embeddings, ResNet and attention blocks, block stacks.

Every block computes in a configurable `dtype` while its parameters stay float32. Inputs that
need float32 precision (the time embedding of 1000 t', Fourier features of z at frequencies up
to 2^7 2pi) are computed in float32 before being cast, since bfloat16 keeps only 8 bits of
mantissa and would scramble sin(800 z).

`Conv3x3` is a 3x3, stride-1, SAME convolution with nn.Conv's parameters. With grad="patches"
its backward pass is written out by hand: the input gradient as a convolution with the flipped,
transposed kernel materialised in HWIO layout, the kernel gradient as one matmul over the 9
shifted copies of the input. XLA:CPU otherwise runs the transposed convolutions of the backward
pass in an "01oi" kernel layout that is ~20x slower inside a while loop (so under nn.scan), and
its kernel gradient is slow even outside one (see experiments/bench_scan_compile.py).

A ResnetBlock also takes its input as a tuple of parts whose channel concatenation is the
input (`skip_join="split"` in the U-Nets' up blocks): every layer that reads the input (the
first GroupNorm, conv_1, the 1x1 shortcut) then works on the parts with slices of its own
parameters and sums, so the concatenated tensor, its pad/slice copies and their gradients
are never made. Same parameters, same function to float rounding (`split_ok` says when the
norm's groups allow it).

`apply_stack` runs n identical blocks either unrolled (parameters under `name_0 .. name_{n-1}`)
or with `nn.scan` (one entry `name` whose leaves carry a leading axis of length n); the two
layouts hold the same numbers and `stack_params` / `unstack_params` convert between them.
"""

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from vdm.nets.group_norm import GroupNorm

Dtype = Any
CONV_GRADS = ("xla", "patches")
ATTENTIONS = ("softmax", "deferred_norm")
SKIP_JOINS = ("concat", "split")


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding (Transformer/DDPM style) of t [B]: [B, dim] float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def fourier_features(z, n_min: int, n_max: int):
    """sin/cos(2^n 2pi z) per channel for n in [n_min, n_max], float32 [..., 2 C (n_max-n_min+1)].

    High frequencies let the network resolve the fine, bin-level structure of 8-bit data near
    t = 0. With n_max < n_min there are no features (an empty last axis).
    """
    if n_max < n_min:
        return jnp.zeros(z.shape[:-1] + (0,), jnp.float32)
    freqs = 2.0 * jnp.pi * 2.0 ** jnp.arange(n_min, n_max + 1, dtype=jnp.float32)
    angles = jnp.asarray(z, jnp.float32)[..., None] * freqs
    angles = angles.reshape(z.shape[:-1] + (-1,))
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def concat_channels(a, b):
    """concatenate([a, b], -1), written as the sum of two zero-padded copies.

    The same numbers (adding zero is exact), but XLA:CPU turns the gradient of a last-axis
    concatenate into a slow strided split copy; the padded sum's gradient fuses into its
    consumers instead. Measured: a U-Net up block's forward + backward 15% faster.
    """
    pad = [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, pad + [(0, b.shape[-1])]) + jnp.pad(b, pad + [(a.shape[-1], 0)])


def split_ok(channels: tuple[int, ...], num_groups: int) -> bool:
    """Whether GroupNorm(num_groups) of the concatenation of parts with these channel counts
    never puts one group across two parts (so it can run part by part)."""
    total = sum(channels)
    if total % num_groups:
        return False
    per_group = total // num_groups
    return all(c % per_group == 0 for c in channels)


def join_skip(h, skip, how: str, num_groups: int):
    """An up block's input: concat_channels(h, skip), or the parts (h, skip) for "split"
    where `split_ok`, since both give the same block output."""
    if how not in SKIP_JOINS:
        raise ValueError(f"Unknown skip join {how!r}; use one of {SKIP_JOINS}.")
    if how == "split" and split_ok((h.shape[-1], skip.shape[-1]), num_groups):
        return (h, skip)
    return concat_channels(h, skip)


def _channel_slices(parts):
    # (offset, width) of each part along the concatenated channel axis.
    offsets, total = [], 0
    for part in parts:
        offsets.append((total, part.shape[-1]))
        total += part.shape[-1]
    return offsets, total


def _conv3x3(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@jax.custom_vjp
def conv3x3_patches_grad(x, kernel):
    """3x3 SAME convolution (NHWC, HWIO) whose VJP avoids XLA:CPU's slow transposed convs."""
    return _conv3x3(x, kernel)


def _conv3x3_fwd(x, kernel):
    return _conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, grad_out):
    x, kernel = residuals
    # Stride 1 and symmetric padding: the input gradient is the convolution with the kernel
    # flipped in space and with in/out swapped; the copy fixes its layout to plain HWIO.
    grad_x = _conv3x3(grad_out, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=-1
    )
    grad_kernel = jnp.einsum("bhwk,bhwo->ko", patches, grad_out, preferred_element_type=jnp.float32)
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


conv3x3_patches_grad.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
    """3x3 stride-1 SAME convolution with nn.Conv's parameters ('kernel' HWIO, 'bias').

    grad: "xla" leaves the backward pass to XLA; "patches" uses `conv3x3_patches_grad`. Both
    compute the same function with the same parameter tree, so checkpoints move freely.
    """

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    grad: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: [B, H, W, C], or a tuple of parts whose channel concatenation is the input."""
        if self.grad not in CONV_GRADS:
            raise ValueError(f"Unknown conv grad {self.grad!r}; use one of {CONV_GRADS}.")
        parts = x if isinstance(x, tuple) else (x,)
        slices, channels = _channel_slices(parts)
        kernel_shape = (3, 3, channels, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        kernel, bias = promote_dtype(kernel, bias, dtype=self.dtype)
        conv = conv3x3_patches_grad if self.grad == "patches" else _conv3x3
        out = None
        for part, (start, width) in zip(parts, slices, strict=True):
            (part,) = promote_dtype(part, dtype=self.dtype)
            y = conv(part, kernel[:, :, start : start + width])
            out = y if out is None else out + y
        return out + bias


class ConditioningEmbed(nn.Module):
    """The conditioning vector [B, features] that every block receives.

    VDM: sinusoidal embedding of 1000 t' with t' = (gamma_t - gamma_min)/(gamma_max - gamma_min),
    concatenated with the scalar augmentation flag (always present as an input so that the
    parameter count does not depend on cond_aug; 0 unless cond_aug and cond['aug'] is given),
    then Dense + swish twice. With num_classes > 0 a label embedding with num_classes + 1 rows is
    added; a missing label means the last row, the null label used for classifier-free guidance.
    Labels given to a model built with num_classes = 0 are ignored.
    """

    features: int
    gamma_min: float
    gamma_max: float
    num_classes: int = 0
    cond_aug: bool = False
    time_embed_dim: int = 128
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, gamma_t, cond, batch: int):
        gamma_t = jnp.asarray(gamma_t, jnp.float32)
        gamma_t = jnp.broadcast_to(gamma_t.reshape(-1) if gamma_t.ndim else gamma_t, (batch,))
        t = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
        cond = cond or {}
        aug = cond.get("aug") if self.cond_aug else None
        aug = jnp.zeros((batch,)) if aug is None else jnp.asarray(aug, jnp.float32)
        aug = jnp.broadcast_to(aug.reshape(-1) if aug.ndim else aug, (batch,))
        h = jnp.concatenate([timestep_embedding(1000.0 * t, self.time_embed_dim), aug[:, None]], -1)
        h = h.astype(self.dtype)
        h = nn.swish(nn.Dense(self.features, dtype=self.dtype, name="dense_0")(h))
        h = nn.swish(nn.Dense(self.features, dtype=self.dtype, name="dense_1")(h))
        if self.num_classes > 0:
            label = cond.get("label")
            if label is None:
                label = jnp.full((batch,), self.num_classes, jnp.int32)
            embed = nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype, name="label")
            h = h + embed(jnp.asarray(label, jnp.int32).reshape(batch))
        return h


def norm_then_swish(norm_groups: int, dtype, fused: bool, name: str, x):
    """swish(GroupNorm(x)) inside the calling module's compact scope, as one fused function
    or (fused=False) as the two steps autodiff differentiates; same parameters, same numbers.
    x may be a tuple of parts (then a tuple of results)."""
    h = GroupNorm(norm_groups, dtype=dtype, swish=fused, name=name)(x)
    if fused:
        return h
    return tuple(map(nn.swish, h)) if isinstance(h, tuple) else nn.swish(h)


class ResnetBlock(nn.Module):
    """GroupNorm, swish, conv3x3, + projected conditioning, GroupNorm, swish, dropout, conv3x3.

    The conditioning projection (bias-free) and the second conv are zero-initialised, so a fresh
    block is the identity on its (possibly 1x1-projected) input, which keeps deep stacks stable.
    """

    out_ch: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32
    train: bool = False
    conv_grad: str = "xla"
    dtype: Dtype = jnp.float32
    fused_norm_swish: bool = True  # swish(GroupNorm) as one function (vdm/nets/group_norm.py)

    @nn.compact
    def __call__(self, x, cond):
        """x: [B, H, W, C], or a tuple of parts whose channel concatenation is the input."""
        in_ch = _channel_slices(x)[1] if isinstance(x, tuple) else x.shape[-1]
        out_ch = self.out_ch or in_ch
        conv = dict(grad=self.conv_grad, dtype=self.dtype)
        norm_swish = partial(norm_then_swish, self.norm_groups, self.dtype, self.fused_norm_swish)
        h = norm_swish("norm_1", x)
        h = Conv3x3(out_ch, **conv, name="conv_1")(h)
        proj = nn.Dense(
            out_ch,
            use_bias=False,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="cond_proj",
        )(cond)
        h = h + proj[:, None, None, :]
        h = norm_swish("norm_2", h)
        h = nn.Dropout(self.dropout)(h, deterministic=not self.train)
        h = Conv3x3(out_ch, nn.initializers.zeros, **conv, name="conv_2")(h)
        if isinstance(x, tuple) and in_ch != out_ch:
            x = PartsDense(out_ch, dtype=self.dtype, name="shortcut")(x)
        elif isinstance(x, tuple):
            x = concat_channels(*x)  # the identity shortcut needs the concatenation after all
        elif in_ch != out_ch:
            x = nn.Dense(out_ch, dtype=self.dtype, name="shortcut")(x)
        return x + h


class PartsDense(nn.Module):
    """nn.Dense (same parameters and initialisers) of the channel concatenation of parts,
    computed as the sum of each part times its rows of the kernel."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, parts):
        slices, channels = _channel_slices(parts)
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (channels, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        kernel, bias = promote_dtype(kernel, bias, dtype=self.dtype)
        out = None
        for part, (start, width) in zip(parts, slices, strict=True):
            (part,) = promote_dtype(part, dtype=self.dtype)
            y = jnp.dot(part, kernel[start : start + width])
            out = y if out is None else out + y
        return out + bias


def deferred_norm_attention(logits, v, dtype):
    """softmax(logits) @ v with the normalisation applied after the value matmul.

    p = exp(l - stop_gradient(max_k l)), out = (p @ v) / sum_k p. The same function as the
    softmax form (the max is only a shift, constant for the gradient), but the division and its
    gradient run on the [B, q, h, d] output rather than on the [B, h, q, k] weights.

    Args:
      logits: float32 [B, h, q, k] (already scaled).
      v: [B, k, h, d] values.
      dtype: dtype of the value matmul's inputs.

    Returns:
      [B, q, h, d] in `dtype`.
    """
    shift = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - shift)
    denom = jnp.sum(p, axis=-1)  # [B, h, q]
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(dtype), v, preferred_element_type=jnp.float32)
    return (out / denom.transpose(0, 2, 1)[..., None]).astype(dtype)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, residual, zero-initialised output projection.

    attention: "softmax" normalises the weights before the value matmul (the published form);
    "deferred_norm" divides the output by the row sums after it (`deferred_norm_attention`,
    the same function to float rounding, with the same parameters).
    """

    num_heads: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    attention: str = "softmax"

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Unknown attention {self.attention!r}; use one of {ATTENTIONS}.")
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads.")
        head_dim = channels // self.num_heads
        h = GroupNorm(self.norm_groups, dtype=self.dtype, name="norm")(x)
        h = h.reshape(batch, height * width, channels)
        qkv = [
            nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=n)(h)
            for n in ("query", "key", "value")
        ]
        q, k, v = qkv
        # Softmax in float32: bf16 logits over 1024+ positions lose the small weights.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        if self.attention == "deferred_norm":
            out = deferred_norm_attention(logits, v, self.dtype)
        else:
            weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = nn.DenseGeneral(
            channels,
            axis=(-2, -1),
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="proj_out",
        )(out)
        return x + out.reshape(x.shape)


def apply_stack(
    block_cls,
    block_kwargs: dict,
    n: int,
    name: str,
    carry,
    xs,
    shared: tuple,
    *,
    scan: bool,
    remat: bool,
):
    """Runs n blocks, `carry, y_i = block_i(carry, [xs[i],] *shared)`, unrolled or scanned.

    Must be called inside a compact method; the blocks become children of that module.

    Args:
      block_cls: linen Module class whose __call__ returns (new carry, per-block output or None).
      block_kwargs: its constructor fields (the same for every block).
      n: number of blocks.
      name: parameter name: `name_i` per block unrolled, `name` (stacked on axis 0) scanned.
      carry: the running activation.
      xs: per-block inputs (an array stacked on axis 0, or a sequence), or None for none.
      shared: inputs given unchanged to every block (the conditioning vector).
      scan: use nn.scan (compile time flat in n) instead of a Python loop.
      remat: rematerialise each block in the backward pass.

    Returns:
      (carry, ys): ys is the per-block outputs stacked on axis 0 when scanned, a list unrolled.
    """
    if remat:
        # Inside scan, CSE cannot merge the recomputation with the forward pass, so the
        # protective barriers are unnecessary and only slow things down.
        block_cls = nn.remat(block_cls, prevent_cse=not scan)
    per_block = () if xs is None else (xs,)
    if scan:
        stack = nn.scan(
            block_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0,) * len(per_block) + (nn.broadcast,) * len(shared),
            length=n,
        )(name=name, **block_kwargs)
        if xs is not None and not isinstance(xs, jax.Array):
            per_block = (jnp.stack(list(xs)),)
        return stack(carry, *per_block, *shared)
    ys = []
    for i in range(n):
        block = block_cls(name=f"{name}_{i}", **block_kwargs)
        carry, y = block(carry, *(x[i] for x in per_block), *shared)
        ys.append(y)
    return carry, ys


def stack_params(params: dict, name: str) -> dict:
    """Unrolled layout (`name_0`, `name_1`, ...) -> scanned layout (`name`, leading axis n)."""
    params = dict(params)
    blocks = []
    while f"{name}_{len(blocks)}" in params:
        blocks.append(params.pop(f"{name}_{len(blocks)}"))
    if not blocks:
        raise KeyError(f"No unrolled blocks named {name}_0, {name}_1, ... in the parameters.")
    params[name] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    return params


def unstack_params(params: dict, name: str) -> dict:
    """Scanned layout (`name`, leading axis n) -> unrolled layout (`name_0`, `name_1`, ...)."""
    params = dict(params)
    stacked = params.pop(name)
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        params[f"{name}_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return params
