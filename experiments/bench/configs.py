"""The benchmark's built-in configs and its named variants.

As a config file (`--config=experiments/bench/configs.py`, the benchmark's default) this module
gives the reduced VDM U-Net of the CPU target: 64 channels, 8 blocks per side, 32x32x3, batch
32, on CIFAR-10-shaped random data. It imports only the vdm package, so config_flags can load it
by path.
"""

import ml_collections

from vdm.config_defaults import base_config, finalize

# Named config variants: each is a set of dotted-key overrides applied on top of the config.
VARIANTS = {
    "f32": {},
    "patches": {"model.conv_grad": "patches"},
    "bf16": {"model.dtype": "bfloat16"},
    "scan": {"model.scan": True},
    "scan_patches": {"model.scan": True, "model.conv_grad": "patches"},
    "remat": {"model.remat": True},
    "scan_remat": {"model.scan": True, "model.remat": True},
    "steps4": {"train.steps_per_call": 4},
    "deferred": {"model.attention": "deferred_norm"},
    "bf16_deferred": {"model.dtype": "bfloat16", "model.attention": "deferred_norm"},
}


def get_config(arg=None) -> ml_collections.ConfigDict:
    """The reduced VDM U-Net on CIFAR-10-shaped random data (no dataset is read).

    Args:
      arg: the config file's `:arg` (unused).

    Returns:
      The locked config.
    """
    del arg
    c = base_config()
    c.data.name = "cifar10"
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.model.update(type="vdm_unet", n_embd=64, n_layers=8, dropout=0.1)
    return finalize(c)


def depth_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 paper network (128 channels, batch 128) for the compile-vs-depth sweep."""
    c = get_config()
    c.data.batch_size = 128
    c.model.n_embd = 128
    c.model.n_layers = 32
    return c


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of a locked config with dotted-key overrides applied.

    Args:
      config: the config; left unchanged.
      overrides: {"model.scan": True, ...}.

    Returns:
      The overridden copy (still locked: an unknown key raises a KeyError, a value of the wrong
      type a TypeError).
    """
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict(overrides)
    return config
