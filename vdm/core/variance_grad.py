"""Per-example gradient rewiring for the VDM paper's variance-minimising schedule update.

`variance_gradient(fn, h, *args)` returns L = fn(h, *args), per-example losses [B]. Gradients
with respect to `args` (and anything fn closes over) are the ordinary gradients of L, but the
gradient reaching h is that of L^2: for the objective sum_i g_i L_i the cotangent of h_i is
g_i * 2 L_i * dL_i/dh_i. With a mean over the batch this is exactly grad E[L^2] for h.

It costs one forward and one backward pass: the backward pass is the ordinary one, and since
h_i influences only L_i (examples are independent: no batch norm), rescaling its cotangent by
2 L_i after the fact is exact.
"""

import functools

import chex
import jax
import jax.numpy as jnp


def variance_gradient(fn, h, *args):
    """Calls fn(h, *args) -> [B] with the cotangent of h rescaled by 2 L per example.

    Args:
      fn: function of (h, *args) returning per-example losses [B]. It may close over traced
        values (network parameters): they are hoisted out by jax.closure_convert so that
        their gradients flow normally.
      h: pytree of [B] arrays (or arrays with leading batch axis) whose gradient becomes that
        of L^2.
      *args: other differentiable inputs.

    Returns:
      The per-example losses L, [B].
    """
    converted, consts = jax.closure_convert(fn, h, *args)
    loss = _rewired(converted, h, args, tuple(consts))
    # The rescaling is exact only if L is per-example and h_i feeds only L_i.
    chex.assert_rank(loss, 1)
    chex.assert_tree_shape_prefix(h, loss.shape)
    return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rewired(fn, h, args, consts):
    return fn(h, *args, *consts)


def _rewired_fwd(fn, h, args, consts):
    loss, vjp = jax.vjp(lambda h_, a_, c_: fn(h_, *a_, *c_), h, args, consts)
    return loss, (loss, vjp)


def _rewired_bwd(fn, res, g):
    loss, vjp = res
    dh, dargs, dconsts = vjp(g)

    def rescale(d):
        return d * (2.0 * loss).reshape(loss.shape + (1,) * (jnp.ndim(d) - loss.ndim))

    return jax.tree.map(rescale, dh), dargs, dconsts


_rewired.defvjp(_rewired_fwd, _rewired_bwd)
