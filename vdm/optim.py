"""Optimiser factory: AdamW with linear warm-up, a weight-decay mask, clipping, and the EMA.

The parameter tree is `{'model': ..., 'schedule': ...}`. Weight decay only touches the
network's weight matrices and embeddings: biases, normalisation scales and every noise-schedule
parameter are spared, since decaying the schedule would pull gamma_min/gamma_max towards zero
and decaying norms fights their role (the published code decays all but biases).
"""

import jax
import jax.numpy as jnp
import optax

# Leaf names that are never decayed even when they are matrices.
_NO_DECAY_NAMES = ("bias", "scale")


def learning_rate_schedule(optim_config) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then constant.

    Args:
      optim_config: the `config.optim` ConfigDict.

    Returns:
      An optax schedule mapping the update count to a learning rate.
    """
    lr = optim_config.learning_rate
    warmup = int(optim_config.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
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


def make_optimizer(optim_config) -> optax.GradientTransformation:
    """Builds the update rule: [global-norm clipping] -> AdamW(warm-up lr, masked decay).

    Gradient accumulation is not part of this transformation: the train step splits its batch
    into `accum_steps` micro-batches and averages their gradients before calling `update`, so
    the config's batch size stays the effective batch and steps count optimiser updates.

    Args:
      optim_config: the `config.optim` ConfigDict.

    Returns:
      An optax GradientTransformation.
    """
    parts = []
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate_schedule(optim_config),
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=weight_decay_mask,
        )
    )
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
    """Returns decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
