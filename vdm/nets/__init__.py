"""Score networks: `build_network(config.model, gamma_min=..., gamma_max=...)`.

Every model is a linen Module called as `model.apply(variables, z, gamma_t, cond, train=...)`
with z [B, H, W, C] (U-Nets) or [B, D] (MLP), gamma_t [B] or a scalar, and cond None or a dict
with optional 'label' (int32 [B]; num_classes is the null label) and 'aug' (float32 [B]). It
returns a float32 array shaped like z; dropout draws from the 'dropout' rng when train=True.
With model.base_measure every network adds the fixed base of vdm/nets/base_measure.py to its
output (eps_hat = out + z_t for eps-prediction, the published form).

Models built with model.scan keep their repeated blocks stacked on a leading axis;
`to_scanned_params` and `to_unrolled_params` convert a parameter tree between the two layouts
(for loading a checkpoint into the other variant, and for testing that both compute the same).
"""

import dataclasses
import math

import flax.linen as nn
import jax

from vdm import runtime
from vdm.nets import mlp, unet, vdm_unet
from vdm.nets.base_measure import check_base_measure
from vdm.nets.layers import stack_params, unstack_params

runtime.unroll_threefry()  # dropout's masks: same bits, faster (VDM_THREEFRY_UNROLLED=0: off)

MODELS: dict[str, type[nn.Module]] = {
    "vdm_unet": vdm_unet.VDMUNet,
    "unet": unet.UNet,
    "mlp": mlp.MLPDenoiser,
}

# Names of the scannable block stacks in each model's parameter tree.
SCANNED_STACKS: dict[str, tuple[str, ...]] = {
    "vdm_unet": vdm_unet.STACKS,
    "unet": (),
    "mlp": mlp.STACKS,
}

COMPUTE_DTYPES = ("float32", "bfloat16")


def build_network(model_config, *, gamma_min: float, gamma_max: float) -> nn.Module:
    """Builds the score network that `model_config.type` names.

    Each model class declares its fields under the same names as the config.model keys, so
    every key a model declares is taken from the config and other keys are ignored.

    Args:
      model_config: the `config.model` ConfigDict (see vdm/config_defaults.py).
      gamma_min: gamma(0) of the schedule; with gamma_max it maps gamma_t to t' in [0, 1].
      gamma_max: gamma(1) of the schedule.

    Returns:
      An unbound linen Module (initialise with `model.init(key, z, gamma_t, cond)`).
    """
    kind = model_config.type
    if kind not in MODELS:
        raise ValueError(f"Unknown model type {kind!r}; use one of {sorted(MODELS)}.")
    if model_config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown model dtype {model_config.dtype!r}; use {COMPUTE_DTYPES}.")
    if model_config.get("scan", False) and not SCANNED_STACKS[kind]:
        raise ValueError(f"Model type {kind!r} has no identical blocks to scan; set scan=False.")
    if model_config.get("base_measure", False):
        check_base_measure(model_config.get("parameterization", "eps"))
    cls = MODELS[kind]
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in ("parent", "name", "gamma_min", "gamma_max"):
            continue
        if field.name in model_config:
            value = model_config[field.name]
            # Module fields must be hashable; overrides from the command line give lists.
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(gamma_min=float(gamma_min), gamma_max=float(gamma_max), **kwargs)


def to_scanned_params(params: dict, model_type: str) -> dict:
    """Unrolled parameter tree (blocks `down_0`, `down_1`, ...) -> the scanned layout.

    Args:
      params: the 'params' collection of a model built with scan=False.
      model_type: config.model.type of that model.

    Returns:
      The same numbers, each block stack merged into one entry with a leading block axis.
    """
    for name in SCANNED_STACKS[model_type]:
        params = stack_params(params, name)
    return params


def to_unrolled_params(params: dict, model_type: str) -> dict:
    """Scanned parameter tree -> the unrolled layout; inverse of `to_scanned_params`."""
    for name in SCANNED_STACKS[model_type]:
        params = unstack_params(params, name)
    return params


def count_params(params) -> int:
    """Number of scalars in a parameter tree of arrays or jax.ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
