"""The "base measure" (model.base_measure): a fixed term added to every network's output.

The published VDM network returns eps_hat = conv_out(h) + z_t; with its zero-initialised output
conv, a fresh model predicts eps_hat = z_t, which is the exact answer at t = 1 (z_1 is almost
pure noise) and leaves the network to learn only the correction. The option keeps that
meaning for every parameterisation: the base is whatever prediction of the network's kind
implies eps_hat = z_t, so a fresh network is the same model whichever quantity it predicts.

  eps:   base = z_t                                   (the paper's form)
  x, v:  base = (z_t - sigma_t z_t) / alpha_t = alpha_t z_t / (1 + sigma_t)
         (both conversions of eps = z_t give this; it tends to z_t as t -> 0, the
         identity-like denoiser, and to 0 as t -> 1, the data mean of centred data)
  score: rejected. The implied base -z_t / sigma_t grows without bound as sigma_t -> 0
         (about 770 z_t at gamma = -13.3), so the network's output would be dominated by a
         fixed term of that size; use eps, x or v with the base measure.

alpha_t^2 = sigmoid(-gamma_t) and sigma_t^2 = sigmoid(gamma_t) are computed here from the gamma_t
the network already receives (the nets package does not import vdm.core), in float32 after the
network's last layer, so a bfloat16 network still adds an exact base.
"""

import jax
import jax.numpy as jnp

# Parameterisations the base measure is defined for; see the module docstring for why not score.
BASE_MEASURE_PARAMETERIZATIONS = ("eps", "x", "v")


def check_base_measure(parameterization: str) -> None:
    """Raises a ValueError when base_measure=True cannot be used with `parameterization`.

    Args:
      parameterization: config.model.parameterization (eps|x|v|score).
    """
    if parameterization in BASE_MEASURE_PARAMETERIZATIONS:
        return
    if parameterization == "score":
        raise ValueError(
            "model.base_measure=True is not defined for model.parameterization='score': the "
            "score implied by eps_hat = z_t is -z_t / sigma_t, unbounded as sigma_t -> 0. Use "
            f"a parameterization in {BASE_MEASURE_PARAMETERIZATIONS} or model.base_measure=False."
        )
    raise ValueError(
        f"Unknown model.parameterization {parameterization!r} for the base measure; use one of "
        f"{BASE_MEASURE_PARAMETERIZATIONS}."
    )


def add_base_measure(out, z, gamma_t, parameterization: str):
    """out + the base of `parameterization`: the prediction that implies eps_hat = z_t.

    Args:
      out: the network's float32 output, shaped like z.
      z: the network's input z_t [B, ...].
      gamma_t: gamma(t) [B] or a scalar.
      parameterization: eps|x|v (score raises, see `check_base_measure`).

    Returns:
      float32 array shaped like z.
    """
    check_base_measure(parameterization)
    z = jnp.asarray(z, jnp.float32)
    if parameterization == "eps":
        return out + z
    gamma = jnp.reshape(jnp.asarray(gamma_t, jnp.float32), (-1,) + (1,) * (z.ndim - 1))
    alpha = jnp.sqrt(jax.nn.sigmoid(-gamma))
    sigma = jnp.sqrt(jax.nn.sigmoid(gamma))
    # alpha / (1 + sigma) equals (1 - sigma) / alpha without its 0/0 as alpha -> 0.
    return out + alpha / (1.0 + sigma) * z
