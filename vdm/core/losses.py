"""The VDM objective: ELBO terms in nats per example, bits/dim, and the training losses.

-ELBO(x) = L_diffusion + L_prior + L_recon with
  L_diffusion (continuous)  0.5 gamma'(t) ||eps - eps_hat(z_t, t)||^2, t ~ U(0, 1)
  L_diffusion (T steps)     0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2, s = t - 1/T
  L_prior                   KL(q(z_1 | x) || N(0, I))
  L_recon                   -log p(x | z_0), z_0 ~ q(z_0 | x)   (vdm.decoder)

The denoiser is any callable (z_t, gamma_t, cond) -> prediction of kind eps/x/v/score, so an
analytic denoiser plugs in exactly where a network does. The ELBO is always reported; the
training loss may instead be DDPM's "simple" eps-MSE or a weighted diffusion loss.

With schedule_grad="variance" the schedule is trained as in the VDM paper: its endpoints get
ELBO gradients, while its shape gets gradients of E[L_diffusion^2], which (the ELBO being
invariant to the shape) minimises the variance of the diffusion-loss estimator.
"""

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from vdm.core import decoder, diffusion
from vdm.core.schedules import Schedule, endpoints, gamma_and_slope
from vdm.core.variance_grad import variance_gradient
from vdm.registry import Registry

# Weightings w(gamma_t) of the diffusion loss for loss_type="weighted": fn(gamma, *, options).
WEIGHTINGS = Registry("weighting", context=("gamma",))


@WEIGHTINGS.register("none")
def no_weighting(gamma):
    """w = 1: the ELBO's own weighting."""
    return jnp.ones_like(gamma)


@WEIGHTINGS.register("sigmoid")
def sigmoid_weighting(gamma, *, bias: float = 2.0):
    """Kingma & Gao 2023's sigmoid weighting w(lambda) = sigmoid(bias - lambda), lambda = -gamma."""
    return jax.nn.sigmoid(gamma + bias)


def sample_times(key, n: int, antithetic: bool = True):
    """n times in [0, 1): iid uniform, or (u + i / n) mod 1 with one shared u (antithetic)."""
    if antithetic:
        u = jax.random.uniform(key, ())
        return jnp.mod(u + jnp.arange(n) / n, 1.0)
    return jax.random.uniform(key, (n,))


def prior_loss(x_enc, gamma_1):
    """KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) summed per example, in nats.

    Written as 0.5 (alpha_1^2 (x^2 - 1) - log sigma_1^2) per dimension, using
    sigma_1^2 - 1 = -alpha_1^2, so no 1 - sigmoid cancellation appears.
    """
    g1 = diffusion.broadcast(gamma_1, x_enc)
    kl = 0.5 * (jax.nn.sigmoid(-g1) * (jnp.square(x_enc) - 1.0) - jax.nn.log_sigmoid(g1))
    return jnp.sum(kl, axis=tuple(range(1, x_enc.ndim)))


def _sum_sq(a, b):
    return jnp.sum(jnp.square(a - b), axis=tuple(range(1, a.ndim)))


def bits_per_dim(nats, num_dims: int):
    """Converts nats per example to bits per dimension."""
    return nats / (num_dims * jnp.log(2.0))


def loss_terms(
    denoise_fn: Callable,
    schedule: Schedule,
    schedule_params,
    x,
    key,
    *,
    vocab_size: int | None,
    cond=None,
    parameterization: str = "eps",
    timesteps: int = 0,
    antithetic: bool = True,
    loss_type: str = "elbo",
    weighting: str = "none",
    weighting_options=None,
    schedule_grad: str = "elbo",
    t=None,
    time_weight=None,
):
    """Monte-Carlo ELBO terms and the training loss for a batch.

    Args:
      denoise_fn: (z_t, gamma_t [B], cond) -> prediction of kind `parameterization`.
      schedule, schedule_params: the noise schedule and its parameters.
      x: data [B, ...], integers in [0, vocab_size) or continuous (vocab_size None).
      key: PRNG key for t, eps and the reconstruction noise.
      vocab_size: number of discrete values, or None for continuous data.
      cond: conditioning passed to denoise_fn unchanged.
      parameterization: eps|x|v|score.
      timesteps: T for the discrete-time loss; 0 for continuous time.
      antithetic: low-discrepancy times over the batch.
      loss_type: elbo|simple|weighted: what `train` holds.
      weighting: a WEIGHTINGS name, for loss_type=weighted.
      weighting_options: that weighting's options (e.g. sigmoid's bias).
      schedule_grad: elbo|variance (see module docstring).
      t: optional fixed times [B] or a scalar (overrides sampling; for evaluation and tests).
      time_weight: optional [B] importance weights 1 / q(t) of times t drawn from a proposal q
        (vdm.core.time_proposals); the diffusion term is multiplied by them, which keeps its
        expectation over t ~ U(0, 1).

    Returns:
      Dict of [B] arrays: diffusion, prior, recon, total (nats), bpd, train (the per-example
      training loss to average), gamma_t, t and time_weight (1 without a proposal).
    """
    if loss_type not in ("elbo", "simple", "weighted"):
        raise ValueError(f"Unknown loss type {loss_type!r}; use elbo|simple|weighted.")
    WEIGHTINGS.check(weighting, weighting_options or {})
    if schedule_grad not in ("elbo", "variance"):
        raise ValueError(f"Unknown schedule_grad {schedule_grad!r}; use elbo|variance.")
    if schedule_grad == "variance" and loss_type != "elbo":
        raise ValueError("schedule_grad='variance' needs loss_type='elbo'.")
    n = x.shape[0]
    k_t, k_eps, k_0 = jax.random.split(key, 3)
    x_enc = decoder.encode(x, vocab_size)
    g0, g1 = endpoints(schedule, schedule_params)
    if t is None:
        t = sample_times(k_t, n, antithetic)
    # A scalar t means the same time for every example; any other shape must be [B].
    t = jnp.broadcast_to(jnp.asarray(t, x_enc.dtype), (n,))
    if timesteps:
        # Grid times 1/T .. 1; s is the previous grid point.
        t = jnp.maximum(jnp.ceil(t * timesteps), 1.0) / timesteps
    eps = jax.random.normal(k_eps, x_enc.shape, x_enc.dtype)

    def eps_error(gamma_t):
        z_t = diffusion.q_sample(x_enc, gamma_t, eps)
        pred = denoise_fn(z_t, gamma_t, cond)
        # A prediction of the wrong shape would broadcast inside the squared error silently.
        chex.assert_equal_shape([pred, z_t])
        return _sum_sq(eps, diffusion.to_eps(pred, z_t, gamma_t, parameterization))

    w = jnp.ones((n,), x_enc.dtype) if time_weight is None else time_weight

    def diffusion_loss(gamma_t, slope):
        """slope: gamma'(t) (continuous) or gamma_s (discrete); both terms weighted by w."""
        sq = w * eps_error(gamma_t)
        if timesteps:
            return 0.5 * timesteps * jnp.expm1(gamma_t - slope) * sq, sq
        return 0.5 * slope * sq, sq

    def gamma_at(tt):
        return schedule.gamma(schedule_params, tt)

    if timesteps:
        gamma_t, second = gamma_at(t), gamma_at(t - 1.0 / timesteps)
    else:
        gamma_t, second = gamma_and_slope(schedule, schedule_params, t)

    if schedule_grad == "variance":
        # The shape s(t) = (gamma(t) - g0) / (g1 - g0) carries the variance gradient; the
        # endpoints enter outside it and get ordinary ELBO gradients.
        def shape(tt):
            return (gamma_at(tt) - g0) / (g1 - g0)

        if timesteps:
            h = (shape(t), shape(t - 1.0 / timesteps))
        else:
            h = jax.jvp(shape, (t,), (jnp.ones_like(t),))

        def from_shape(h, g0, g1):
            a, b = h
            gt = g0 + (g1 - g0) * a
            return diffusion_loss(gt, g0 + (g1 - g0) * b if timesteps else (g1 - g0) * b)[0]

        l_diff = variance_gradient(from_shape, h, g0, g1)
        train_diff = l_diff
    else:
        l_diff, sq = diffusion_loss(gamma_t, second)
        if loss_type == "simple":
            train_diff = sq / (x_enc.size // n)
        elif loss_type == "weighted":
            weight = WEIGHTINGS.build(weighting, weighting_options, gamma=gamma_t)
            train_diff = weight * l_diff
        else:
            train_diff = l_diff

    eps_0 = jax.random.normal(k_0, x_enc.shape, x_enc.dtype)
    z_0 = diffusion.q_sample(x_enc, jnp.broadcast_to(g0, (n,)), eps_0)
    l_recon = decoder.reconstruction_loss(x, z_0, g0, vocab_size)
    l_prior = prior_loss(x_enc, g1)
    total = l_diff + l_prior + l_recon
    train = train_diff if loss_type == "simple" else train_diff + l_prior + l_recon
    chex.assert_shape([l_diff, l_prior, l_recon, train], (n,))
    return {
        "diffusion": l_diff,
        "prior": l_prior,
        "recon": l_recon,
        "total": total,
        "bpd": bits_per_dim(total, x_enc.size // n),
        "train": train,
        "gamma_t": gamma_t,
        "t": t,
        "time_weight": w,
    }
