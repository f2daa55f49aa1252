"""An MLP denoiser for low-dimensional data (2-d toys, small Gaussians).

  [z, Fourier features of z] -> Dense(n_embd)
  n_layers residual blocks of width n_embd: LayerNorm, swish, Dense, + projected conditioning,
  LayerNorm, swish, dropout, zero-initialised Dense, residual add
  LayerNorm, swish, zero-initialised Dense back to D
  (+ the base measure, z_t for eps, with model.base_measure).
The conditioning vector (width n_embd) is the VDM U-Net's: time embedding of 1000 t', the aug
flag and an optional label embedding with a null label. The blocks are identical, so
model.scan builds them with one nn.scan (parameters under "blocks").
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vdm.nets.base_measure import add_base_measure
from vdm.nets.layers import ConditioningEmbed, apply_stack, fourier_features

STACKS = ("blocks",)  # parameter names of the repeated blocks (see layers.stack_params)


class MLPBlock(nn.Module):
    """A residual two-layer block; zero-initialised so that a fresh block is the identity."""

    n_embd: int
    dropout: float
    train: bool
    dtype: Any

    @nn.compact
    def __call__(self, h, cond):
        x = nn.swish(nn.LayerNorm(dtype=self.dtype, name="norm_1")(h))
        x = nn.Dense(self.n_embd, dtype=self.dtype, name="dense_1")(x)
        x = x + nn.Dense(
            self.n_embd,
            use_bias=False,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="cond_proj",
        )(cond)
        x = nn.swish(nn.LayerNorm(dtype=self.dtype, name="norm_2")(x))
        x = nn.Dropout(self.dropout)(x, deterministic=not self.train)
        x = nn.Dense(
            self.n_embd, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="dense_2"
        )(x)
        return h + x, None


class MLPDenoiser(nn.Module):
    """Residual MLP; fields are named as the config.model keys they come from.

    __call__(z [B, D], gamma_t [B] or scalar, cond=None, *, train=False) returns a float32
    prediction [B, D]. cond may hold 'label' (int [B]) and 'aug' (float [B]).
    """

    gamma_min: float
    gamma_max: float
    n_embd: int = 128
    n_layers: int = 4
    dropout: float = 0.0
    fourier_min: int = 6
    fourier_max: int = 7
    num_classes: int = 0
    cond_aug: bool = False
    scan: bool = False
    remat: bool = False
    dtype: str = "float32"
    # The published form eps_hat = out + z_t (see vdm/nets/base_measure.py); the
    # parameterisation picks the base of other predicted quantities.
    base_measure: bool = False
    parameterization: str = "eps"

    @nn.compact
    def __call__(self, z, gamma_t, cond=None, *, train: bool = False):
        if z.ndim != 2:
            raise ValueError(f"The MLP denoiser takes z of shape [B, D], got {z.shape}.")
        dtype = jnp.dtype(self.dtype)
        emb = ConditioningEmbed(
            self.n_embd,
            self.gamma_min,
            self.gamma_max,
            self.num_classes,
            self.cond_aug,
            dtype=dtype,
            name="cond_embed",
        )(gamma_t, cond, z.shape[0])
        h = jnp.concatenate([z, fourier_features(z, self.fourier_min, self.fourier_max)], -1)
        h = nn.Dense(self.n_embd, dtype=dtype, name="dense_in")(h.astype(dtype))
        block_kwargs = dict(n_embd=self.n_embd, dropout=self.dropout, train=train, dtype=dtype)
        h, _ = apply_stack(
            MLPBlock,
            block_kwargs,
            self.n_layers,
            "blocks",
            h,
            None,
            (emb,),
            scan=self.scan,
            remat=self.remat,
        )
        h = nn.swish(nn.LayerNorm(dtype=dtype, name="norm_out")(h))
        out = nn.Dense(
            z.shape[-1], kernel_init=nn.initializers.zeros, dtype=dtype, name="dense_out"
        )(h)
        out = out.astype(jnp.float32)
        if self.base_measure:
            out = add_base_measure(out, z, gamma_t, self.parameterization)
        return out
