"""A multi-resolution U-Net (DDPM / ADM style) for larger images such as ImageNet 64x64.

Level i runs at resolution H / 2^i with n_embd * channel_mult[i] channels:
  [z, Fourier features] -> conv3x3 (n_embd)
  per level: num_res_blocks ResNet blocks (attention after each where the resolution is in
  attn_resolutions), then a stride-2 conv3x3 except on the last level; every output is a skip
  middle: ResNet, attention, ResNet
  per level, coarsest first: num_res_blocks + 1 ResNet blocks each on concat(h, skip)
  (+ attention), then nearest-neighbour 2x upsampling and a conv3x3 except on level 0
  GroupNorm, swish, zero-initialised conv3x3
  (+ the base measure, z_t for eps, with model.base_measure).
The conditioning (time, aug flag, label) and the ResNet/attention blocks are those of the VDM
U-Net (vdm.nets.layers). H and W must be divisible by 2^(len(channel_mult) - 1).

The blocks differ in width from level to level, so there is no scanned variant; model.remat
rematerialises every ResNet and attention block.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm.nets.base_measure import add_base_measure
from vdm.nets.layers import (
    AttentionBlock,
    ConditioningEmbed,
    Conv3x3,
    ResnetBlock,
    fourier_features,
    join_skip,
    norm_then_swish,
)


class Downsample(nn.Module):
    """Halves the resolution with a stride-2 conv3x3."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour, then a conv3x3 to smooth the blocky result."""

    conv_grad: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        x = jax.image.resize(x, (batch, 2 * height, 2 * width, channels), "nearest")
        return Conv3x3(channels, grad=self.conv_grad, dtype=self.dtype, name="conv")(x)


class UNet(nn.Module):
    """Multi-resolution U-Net; fields are named as the config.model keys they come from.

    __call__(z [B, H, W, C], gamma_t [B] or scalar, cond=None, *, train=False) returns a float32
    prediction shaped like z. cond may hold 'label' (int [B]) and 'aug' (float [B]).
    """

    gamma_min: float
    gamma_max: float
    n_embd: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    fourier_min: int = 6
    fourier_max: int = 7
    norm_groups: int = 32
    num_classes: int = 0
    cond_aug: bool = False
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
        levels = len(self.channel_mult)
        if z.shape[1] % 2 ** (levels - 1) or z.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"Image size {z.shape[1:3]} not divisible by 2^{levels - 1}.")
        emb = ConditioningEmbed(
            4 * self.n_embd,
            self.gamma_min,
            self.gamma_max,
            self.num_classes,
            self.cond_aug,
            dtype=dtype,
            name="cond_embed",
        )(gamma_t, cond, z.shape[0])
        resnet_cls = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        attention_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        res = dict(
            dropout=self.dropout,
            norm_groups=self.norm_groups,
            train=train,
            conv_grad=self.conv_grad,
            dtype=dtype,
            fused_norm_swish=self.fused_norm_swish,
        )
        conv = dict(grad=self.conv_grad, dtype=dtype)

        def resnet(h, out_ch, name):
            return resnet_cls(out_ch, name=name, **res)(h, emb)

        def maybe_attention(h, name):
            if h.shape[1] not in self.attn_resolutions:
                return h
            return attention_cls(
                self.num_heads, self.norm_groups, dtype, self.attention, name=name
            )(h)

        h = jnp.concatenate([z, fourier_features(z, self.fourier_min, self.fourier_max)], -1)
        h = Conv3x3(self.n_embd, **conv, name="conv_in")(h.astype(dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = resnet(h, self.n_embd * mult, f"down_{level}_resnet_{i}")
                h = maybe_attention(h, f"down_{level}_attention_{i}")
                skips.append(h)
            if level < levels - 1:
                h = Downsample(dtype, name=f"down_{level}_downsample")(h)
                skips.append(h)

        h = resnet(h, None, "mid_resnet_1")
        h = attention_cls(
            self.num_heads, self.norm_groups, dtype, self.attention, name="mid_attention"
        )(h)
        h = resnet(h, None, "mid_resnet_2")

        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = join_skip(h, skips.pop(), self.skip_join, self.norm_groups)
                h = resnet(h, self.n_embd * self.channel_mult[level], f"up_{level}_resnet_{i}")
                h = maybe_attention(h, f"up_{level}_attention_{i}")
            if level > 0:
                h = Upsample(self.conv_grad, dtype, name=f"up_{level}_upsample")(h)
        assert not skips, "every skip is consumed exactly once"

        h = norm_then_swish(self.norm_groups, dtype, self.fused_norm_swish, "norm_out", h)
        out = Conv3x3(z.shape[-1], nn.initializers.zeros, **conv, name="conv_out")(h)
        out = out.astype(jnp.float32)
        if self.base_measure:
            out = add_base_measure(out, z, gamma_t, self.parameterization)
        return out
