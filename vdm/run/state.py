"""The train state: everything that evolves during training, as one checkpointed pytree."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything that evolves during training (a pytree; checkpointed whole).

    Attributes:
      step: number of steps taken (int32 scalar); also the data position.
      params: {'model': ..., 'schedule': ...}.
      opt_state: optax state.
      ema_params: exponential moving average of params (used for eval and samples).
      nonfinite_step: first step (as logged: the update that would have produced it) whose
        update was refused as non-finite, -1 if none.
      time_hist: [loss.time.bins] running mean squared diffusion loss per bin of t, always
        kept (cheap), so any checkpoint can evaluate with an adaptive time proposal; it
        drives training's times when loss.time.proposal=adaptive.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite_step: jax.Array
    time_hist: jax.Array


def create_state(model, optimizer: optax.GradientTransformation, init_key) -> TrainState:
    """A fresh state (call under jit with out_shardings to place it sharded).

    Args:
      model: the DiffusionModel.
      optimizer: the update rule.
      init_key: the run's parameter-initialisation key.

    Returns:
      The TrainState at step 0.
    """
    # Explicit dtypes drop JAX's weak types (Python-float initialisers give them), which
    # would otherwise change the step's signature after one update and recompile it.
    params = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), model.init_params(init_key))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        nonfinite_step=jnp.full((), -1, jnp.int32),
        time_hist=jnp.zeros((model.objective.time.bins,), jnp.float32),
    )
