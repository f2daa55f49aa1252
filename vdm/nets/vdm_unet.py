"""The VDM score network (Kingma et al. 2021): a U-Net without down- or up-sampling.

All blocks run at the input resolution:
  [z, Fourier features of z] -> conv3x3 (n_embd)
  n_layers "down" ResNet blocks, the stem output and every block output kept as skips
  middle: ResNet, attention, ResNet
  n_layers + 1 "up" ResNet blocks, each on concat(h, last unused skip) (1x1 shortcut)
  GroupNorm, swish, zero-initialised conv3x3 back to the input channels.
With with_attention every down/up block is followed by an attention block.

The CIFAR-10 config (n_embd 128, n_layers 32) has 30,578,179 parameters. With
model.base_measure the output is the official code's `conv_out(h) + z` (eps_hat = z_t at
initialisation; vdm/nets/base_measure.py); without it, conv_out(h) alone (0 at initialisation).
The time embedding has model.time_embed_dim channels (128; the official code uses n_embd).

model.skip_join="split" (the default) feeds each up block its carry and skip as two parts
instead of their concatenation (layers.join_skip; same parameters and function): the
reduced U-Net's train step was 4-6% faster (experiments/results/train_speed.md).

model.conv_grad="patches" swaps in a hand-written convolution backward pass that XLA:CPU runs
fast inside nn.scan (see layers.Conv3x3).

Because every down block (and every up block) has the same shapes, model.scan builds each side
with one nn.scan; the up side scans over the skips stacked in reverse order.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vdm.nets.base_measure import add_base_measure
from vdm.nets.layers import (
    AttentionBlock,
    ConditioningEmbed,
    Conv3x3,
    ResnetBlock,
    apply_stack,
    fourier_features,
    join_skip,
    norm_then_swish,
)

STACKS = ("down", "up")  # parameter names of the repeated blocks (see layers.stack_params)


class DownBlock(nn.Module):
    """ResNet block (+ attention); its output is both the carry and a skip."""

    n_embd: int
    dropout: float
    norm_groups: int
    with_attention: bool
    num_heads: int
    train: bool
    conv_grad: str
    dtype: Any
    attention: str
    fused_norm_swish: bool

    @nn.compact
    def __call__(self, h, cond):
        h = ResnetBlock(
            self.n_embd,
            self.dropout,
            self.norm_groups,
            self.train,
            self.conv_grad,
            self.dtype,
            self.fused_norm_swish,
            name="resnet",
        )(h, cond)
        if self.with_attention:
            h = AttentionBlock(
                self.num_heads, self.norm_groups, self.dtype, self.attention, name="attention"
            )(h)
        return h, h


class UpBlock(nn.Module):
    """ResNet block (+ attention) on the concatenation of the carry and one skip."""

    n_embd: int
    dropout: float
    norm_groups: int
    with_attention: bool
    num_heads: int
    train: bool
    conv_grad: str
    dtype: Any
    attention: str
    fused_norm_swish: bool
    skip_join: str

    @nn.compact
    def __call__(self, h, skip, cond):
        h = ResnetBlock(
            self.n_embd,
            self.dropout,
            self.norm_groups,
            self.train,
            self.conv_grad,
            self.dtype,
            self.fused_norm_swish,
            name="resnet",
        )(join_skip(h, skip, self.skip_join, self.norm_groups), cond)
        if self.with_attention:
            h = AttentionBlock(
                self.num_heads, self.norm_groups, self.dtype, self.attention, name="attention"
            )(h)
        return h, None


class VDMUNet(nn.Module):
    """VDM's single-resolution U-Net; fields are named as the config.model keys they come from.

    __call__(z [B, H, W, C], gamma_t [B] or scalar, cond=None, *, train=False) returns a float32
    prediction shaped like z. cond may hold 'label' (int [B]) and 'aug' (float [B]).
    """

    gamma_min: float
    gamma_max: float
    n_embd: int = 128
    n_layers: int = 32
    dropout: float = 0.1
    with_attention: bool = False
    fourier_min: int = 6
    fourier_max: int = 7
    norm_groups: int = 32
    num_heads: int = 1
    num_classes: int = 0
    cond_aug: bool = False
    time_embed_dim: int = 128
    scan: bool = False
    remat: bool = False
    conv_grad: str = "xla"
    dtype: str = "float32"
    attention: str = "softmax"  # softmax|deferred_norm (layers.AttentionBlock)
    skip_join: str = "split"  # concat|split: how up blocks take their skip (layers.join_skip)
    fused_norm_swish: bool = True  # swish(GroupNorm) as one function (vdm/nets/group_norm.py)
    # The published form eps_hat = out + z_t (see vdm/nets/base_measure.py); the
    # parameterisation picks the base of other predicted quantities.
    base_measure: bool = False
    parameterization: str = "eps"

    @nn.compact
    def __call__(self, z, gamma_t, cond=None, *, train: bool = False):
        dtype = jnp.dtype(self.dtype)
        emb = ConditioningEmbed(
            4 * self.n_embd,
            self.gamma_min,
            self.gamma_max,
            self.num_classes,
            self.cond_aug,
            time_embed_dim=self.time_embed_dim,
            dtype=dtype,
            name="cond_embed",
        )(gamma_t, cond, z.shape[0])

        h = jnp.concatenate([z, fourier_features(z, self.fourier_min, self.fourier_max)], -1)
        conv = dict(grad=self.conv_grad, dtype=dtype)
        h = Conv3x3(self.n_embd, **conv, name="conv_in")(h.astype(dtype))

        block_kwargs = dict(
            n_embd=self.n_embd,
            dropout=self.dropout,
            norm_groups=self.norm_groups,
            with_attention=self.with_attention,
            num_heads=self.num_heads,
            train=train,
            conv_grad=self.conv_grad,
            dtype=dtype,
            attention=self.attention,
            fused_norm_swish=self.fused_norm_swish,
        )
        stack = dict(shared=(emb,), scan=self.scan, remat=self.remat)
        h_in = h
        h, down_out = apply_stack(DownBlock, block_kwargs, self.n_layers, "down", h, None, **stack)
        if self.scan:
            skips = jnp.concatenate([h_in[None], down_out], axis=0)[::-1]
        else:
            skips = [h_in, *down_out][::-1]

        res = dict(
            dropout=self.dropout,
            norm_groups=self.norm_groups,
            train=train,
            conv_grad=self.conv_grad,
            dtype=dtype,
            fused_norm_swish=self.fused_norm_swish,
        )
        h = ResnetBlock(name="mid_resnet_1", **res)(h, emb)
        h = AttentionBlock(
            self.num_heads, self.norm_groups, dtype, self.attention, name="mid_attention"
        )(h)
        h = ResnetBlock(name="mid_resnet_2", **res)(h, emb)

        up_kwargs = dict(block_kwargs, skip_join=self.skip_join)
        h, _ = apply_stack(UpBlock, up_kwargs, self.n_layers + 1, "up", h, skips, **stack)

        h = norm_then_swish(self.norm_groups, dtype, self.fused_norm_swish, "norm_out", h)
        out = Conv3x3(z.shape[-1], nn.initializers.zeros, **conv, name="conv_out")(h)
        out = out.astype(jnp.float32)
        if self.base_measure:
            out = add_base_measure(out, z, gamma_t, self.parameterization)
        return out
