"""Noise and layouts that do not depend on the device count.

Noise is always drawn for the global batch shape from a key, never per device, so a batch
sharded over any number of devices gets the same numbers; with a `batch_sharding` the draws
(and every intermediate z) are also laid out across devices like the batch.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType


def explicit_axes() -> tuple[str, ...]:
    """Names of the context mesh's Explicit axes (jax.set_mesh), empty if none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(
        n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == AxisType.Explicit
    )


def constrain(x, batch_sharding):
    """Lays x out like the batch (no-op without a sharding).

    With a mesh context whose axes are Explicit (jax.make_mesh's default, which jit needs
    entered with jax.set_mesh) shardings are part of the array types and `reshard` sets them;
    otherwise (Auto axes, e.g. the trainer's mesh, or inside jax.sharding.auto_axes) a
    sharding constraint guides XLA's propagation.
    """
    if batch_sharding is None:
        return x
    if jax.sharding.get_abstract_mesh().empty:
        if AxisType.Explicit in tuple(getattr(batch_sharding.mesh, "axis_types", ())):
            raise ValueError("A sharding on a mesh with Explicit axes needs jax.set_mesh(mesh).")
        return jax.lax.with_sharding_constraint(x, batch_sharding)
    if explicit_axes():
        return jax.sharding.reshard(x, batch_sharding.spec)
    return jax.lax.with_sharding_constraint(x, batch_sharding.spec)


def normal(key, shape, batch_sharding=None, dtype=jnp.float32):
    """Standard normal noise for the global batch shape."""
    return constrain(jax.random.normal(key, shape, dtype), batch_sharding)
