"""Device mesh, shardings and host-to-global batch placement (jit + NamedSharding, no pmap).

The mesh has two axes: 'data' (pure data parallelism) and 'fsdp' (parameter sharding, size
`config.train.fsdp`, 1 by default). Batches are split over both axes; each parameter is split
along its largest dimension divisible by the fsdp size and replicated otherwise, and XLA inserts
the gathers. The same code therefore runs on 1 CPU, N local devices and several processes: each
process contributes its share of every global batch through
`jax.make_array_from_process_local_data`.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")
# Small leaves are cheaper to replicate than to gather.
_MIN_SHARD_SIZE = 2**12


def make_mesh(fsdp: int = 1) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh over all devices of all processes.

    Args:
      fsdp: size of the parameter-sharding axis; must divide the device count.

    Returns:
      The mesh (Auto axis types, so shardings propagate through jit as in GSPMD).
    """
    n = jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"train.fsdp={fsdp} must be >= 1 and divide the {n} devices.")
    return jax.make_mesh((n // fsdp, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * 2)


def replicated(mesh) -> NamedSharding:
    """Sharding of a fully replicated value."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh, stacked: bool = False) -> NamedSharding:
    """Sharding of a batch split along its example axis (axis 1 when `stacked` over steps)."""
    return NamedSharding(mesh, P(None, DATA_AXES) if stacked else P(DATA_AXES))


def _param_spec(shape, fsdp: int) -> P:
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_SHARD_SIZE:
        return P()
    # Largest dimension divisible by the axis size; ties go to the last (usually channels).
    best = None
    for axis, size in enumerate(shape):
        if size % fsdp == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def state_shardings(mesh, abstract_state):
    """NamedShardings for every leaf of a (train) state, given its shapes.

    Args:
      mesh: from `make_mesh`.
      abstract_state: a pytree of arrays or ShapeDtypeStructs.

    Returns:
      A pytree of NamedSharding with the same structure.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _param_spec(np.shape(x), fsdp)), abstract_state
    )


def with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying shardings (the target of an orbax restore)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def global_batch(local_batch: dict, mesh, stacked: bool = False) -> dict:
    """Assembles this process's numpy share into globally sharded jax Arrays.

    Args:
      local_batch: dict of numpy arrays, example axis 0 (axis 1 when `stacked`): the rows of
        the global batch that this process owns, in process order.
      mesh: the device mesh.
      stacked: the arrays carry a leading steps axis (several steps in one call).

    Returns:
      Dict of jax Arrays of the global shape.
    """
    sharding = batch_sharding(mesh, stacked)
    axis = 1 if stacked else 0
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        shape = list(value.shape)
        shape[axis] *= jax.process_count()
        out[name] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
    return out


def check_batch_size(global_batch_size: int, mesh, accum_steps: int = 1) -> None:
    """Raises a clear error when the batch cannot be split over processes/devices/micro-steps."""
    per = mesh.size * accum_steps
    if global_batch_size % per or global_batch_size % jax.process_count():
        raise ValueError(
            f"data.batch_size={global_batch_size} must be divisible by the number of devices "
            f"({mesh.size}) times optim.accum_steps ({accum_steps})."
        )


def fetch(tree):
    """Device-to-host copy of a replicated pytree as numpy (a host sync: use sparingly)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
