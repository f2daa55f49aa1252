"""Optimisers (a registry: adamw, adam, lamb, sgd) with linear warm-up, a weight-decay mask,
clipping, and the EMA of the parameters.

The parameter tree is `{'model': ..., 'schedule': ...}`. Weight decay only touches the
network's weight matrices and embeddings: biases, normalisation scales and every noise-schedule
parameter are spared, since decaying the schedule would pull gamma_min/gamma_max towards zero
and decaying norms fights their role (the published code decays all but biases).
"""

import jax
import jax.numpy as jnp
import optax

from vdm.registry import Registry

# Leaf names that are never decayed even when they are matrices.
_NO_DECAY_NAMES = ("bias", "scale")


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then constant.

    Args:
      learning_rate: the peak (and final) learning rate.
      warmup_steps: length of the linear warm-up; <= 0 for none.

    Returns:
      An optax schedule mapping the update count to a learning rate.
    """
    warmup = int(warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup), optax.constant_schedule(learning_rate)],
        [warmup],
    )


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return names


def weight_decay_mask(params):
    """True for leaves that get weight decay: network kernels/embeddings (ndim >= 2) only.

    Args:
      params: the `{'model': ..., 'schedule': ...}` parameter tree (or its shapes).

    Returns:
      A tree of bools with the structure of `params`.
    """

    def decide(path, leaf):
        names = _path_names(path)
        if not names or names[0] != "model":
            return False
        return jnp.ndim(leaf) >= 2 and names[-1] not in _NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decide, params)


# Update rules: fn(learning_rate, *, <options>) -> GradientTransformation. learning_rate is
# the warm-up schedule; every other keyword is the rule's option (config.optim.<name>.<opt>).
OPTIMIZERS = Registry("optimizer", context=("learning_rate",))


@OPTIMIZERS.register("adamw")
def adamw(learning_rate, *, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01):
    """AdamW with decoupled weight decay on network kernels only (the paper's optimiser)."""
    return optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
    )


@OPTIMIZERS.register("adam")
def adam(learning_rate, *, b1=0.9, b2=0.99, eps=1e-8):
    """Adam without weight decay."""
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


@OPTIMIZERS.register("lamb")
def lamb(learning_rate, *, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0):
    """LAMB (layer-wise trust ratios, for large batches); decay masked like AdamW's."""
    return optax.lamb(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
    )


@OPTIMIZERS.register("sgd")
def sgd(learning_rate, *, momentum=0.9, nesterov=False):
    """SGD with (optionally Nesterov) momentum; momentum 0 gives plain SGD."""
    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)


def make_optimizer(
    name: str = "adamw",
    *,
    learning_rate: float,
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
    options=None,
) -> optax.GradientTransformation:
    """Builds the update rule: [global-norm clipping] -> the named optimiser (warm-up lr).

    Gradient accumulation is not part of this transformation: the train step splits its batch
    into micro-batches and averages their gradients before calling `update`, so the config's
    batch size stays the effective batch and steps count optimiser updates.

    Args:
      name: an OPTIMIZERS name (adamw|adam|lamb|sgd|...).
      learning_rate: peak learning rate.
      warmup_steps: linear warm-up length.
      grad_clip: global-norm clipping threshold; <= 0 for none (the paper).
      options: that optimiser's options (e.g. adamw's b1, b2, eps, weight_decay).

    Returns:
      An optax GradientTransformation.
    """
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    lr = learning_rate_schedule(learning_rate, warmup_steps)
    parts.append(OPTIMIZERS.build(name, options, learning_rate=lr))
    return optax.chain(*parts)


def ema_decay(step, rate: float, warmup: bool):
    """The EMA decay for the update that produces step `step + 1`.

    With warm-up the decay is min(rate, (1 + step) / (10 + step)), so early averages are not
    dominated by the random initialisation.
    """
    if not warmup:
        return jnp.asarray(rate, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(rate, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    """Returns decay * ema + (1 - decay) * params, leaf by leaf (optax.incremental_update)."""
    return optax.incremental_update(params, ema_params, 1.0 - decay)
