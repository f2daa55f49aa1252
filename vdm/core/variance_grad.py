"""Gradient rewiring for the learned schedule: the VDM paper's variance-minimising update, and
a denoiser whose own parameters get no gradient (so a loss term can train only the schedule).

`variance_gradient(fn, h, *args, scale=s)` returns L = fn(h, *args), per-example losses [B].
Gradients with respect to `args` (and anything fn closes over) are the ordinary gradients of
L, but the gradient reaching h is that of (L / s)^2. Precisely: for the objective
sum_i c_i L_i the cotangent of h_i is c_i * 2 (L_i / s) * dL_i/dh_i. The convention is that the
caller optimises mean_i(L_i) / s, i.e. the losses in the unit s (c_i = 1 / (B s)); then h gets
exactly grad_h mean_i((L_i / s)^2), the squared per-example loss in the unit that is optimised,
while everything else gets grad mean_i(L_i / s). Both parts of a parameter that reaches L both
ways (through h and through args) are then on one scale.

It costs one forward and one backward pass: the backward pass is the ordinary one, and since
h_i influences only L_i (examples are independent: no batch norm), rescaling its cotangent by
2 L_i / s after the fact is exact.

`frozen_closure(fn)` is fn with the gradient of every value it closes over stopped: only its
explicit arguments are differentiated. With a network denoiser (its parameters closed over)
this gives a prediction whose gradient reaches z_t and gamma_t, hence the schedule, and never
the network.
"""

import functools

import chex
import jax
import jax.numpy as jnp


def variance_gradient(fn, h, *args, scale: float = 1.0):
    """Calls fn(h, *args) -> [B] with the cotangent of h rescaled by 2 L / scale per example.

    Args:
      fn: function of (h, *args) returning per-example losses [B]. It may close over traced
        values (network parameters): they are hoisted out by jax.closure_convert so that
        their gradients flow normally.
      h: pytree of [B] arrays (or arrays with leading batch axis) whose gradient becomes that
        of (L / scale)^2.
      *args: other differentiable inputs.
      scale: the unit the caller's objective measures L in (it optimises mean(L) / scale);
        the default 1 means L itself. vdm.core.losses passes D ln 2 (bits/dim).

    Returns:
      The per-example losses L, [B].
    """
    converted, consts = jax.closure_convert(fn, h, *args)
    loss = _rewired(converted, float(scale), h, args, tuple(consts))
    # The rescaling is exact only if L is per-example and h_i feeds only L_i.
    chex.assert_rank(loss, 1)
    chex.assert_tree_shape_prefix(h, loss.shape)
    return loss


# scale is a static Python float (D ln 2 is known from the shapes), so it keeps float64
# precision under x64 and needs no cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rewired(fn, scale, h, args, consts):
    return fn(h, *args, *consts)


def _rewired_fwd(fn, scale, h, args, consts):
    loss, vjp = jax.vjp(lambda h_, a_, c_: fn(h_, *a_, *c_), h, args, consts)
    return loss, (loss, vjp)


def _rewired_bwd(fn, scale, res, g):
    loss, vjp = res
    dh, dargs, dconsts = vjp(g)
    factor = (2.0 / scale) * loss

    def rescale(d):
        return d * factor.reshape(loss.shape + (1,) * (jnp.ndim(d) - loss.ndim))

    return jax.tree.map(rescale, dh), dargs, dconsts


_rewired.defvjp(_rewired_fwd, _rewired_bwd)


def frozen_closure(fn):
    """fn with no gradient to the values it closes over; its arguments are differentiated.

    Args:
      fn: any function of arrays (pytrees) that may close over traced values.

    Returns:
      A function with fn's signature and values whose gradient reaches only its arguments.
    """

    def frozen(*args):
        converted, consts = jax.closure_convert(fn, *args)
        return converted(*args, *(jax.lax.stop_gradient(c) for c in consts))

    return frozen
