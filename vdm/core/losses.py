"""The VDM objective: ELBO terms in nats per example, bits/dim, and the training losses.

-ELBO(x) = L_diffusion + L_prior + L_recon with
  L_diffusion (continuous)  0.5 gamma'(t) ||eps - eps_hat(z_t, t)||^2, t ~ U(0, 1)
  L_diffusion (T steps)     0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2, s = t - 1/T
  L_prior                   KL(q(z_1 | x) || N(0, I))
  L_recon                   -log p(x | z_0), z_0 ~ q(z_0 | x)   (vdm.decoder)

The denoiser is any callable (z_t, gamma_t, cond) -> prediction of kind eps/x/v/score, so an
analytic denoiser plugs in exactly where a network does. The ELBO is always reported; the
network's training loss may instead be DDPM's "simple" eps-MSE or a weighted diffusion loss.
The schedule is trained by the ELBO whatever the network's loss: a weighted loss is not a
bound, and minimising it over the schedule would move the endpoints to wherever that
weighting is cheapest (the eps-MSE falls as noise rises, so "simple" pushes both up).

With schedule_grad="variance" the schedule is trained as in the VDM paper: its endpoints get
ELBO gradients, while its shape gets gradients of E[L_diffusion^2], which (the continuous-time
ELBO being invariant to the shape) minimises the variance of the diffusion-loss estimator. The
squared loss is measured in the unit the training loss is optimised in, bits/dim, so that a
parameter reached both ways (learned_net's linear part) gets one consistently scaled sum.
In discrete time the ELBO depends on the shape, so the rule is refused there.
"""

import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vdm.core import decoder, diffusion
from vdm.core.schedules import Schedule, endpoints, gamma_and_slope, network_gamma
from vdm.core.variance_grad import frozen_closure, variance_gradient
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


def _edm_log_weight(lam, p_mean: float, p_std: float, sigma_data: float):
    """log of EDM's weighting of the eps-MSE as a function of lambda = log SNR (unnormalised).

    EDM draws log sigma ~ N(p_mean, p_std^2) and weights the x-MSE by
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. With sigma^2 = exp(-lambda) (the
    variance-exploding view of z_t / alpha_t), lambda ~ N(-2 p_mean, (2 p_std)^2), and the x-MSE
    is exp(-lambda) times the eps-MSE, so the eps-MSE weight per unit of lambda is
    N(lambda; -2 p_mean, (2 p_std)^2) (exp(-lambda) + sigma_data^2) / sigma_data^2.
    Works on numpy floats and jax arrays alike.
    """
    mu, s, c = -2.0 * p_mean, 2.0 * p_std, sigma_data**2
    return -0.5 * jnp.square((lam - mu) / s) + jnp.logaddexp(-lam, math.log(c)) - math.log(c)


def _edm_peak(p_mean: float, p_std: float, sigma_data: float) -> float:
    """The lambda where EDM's weighting (`_edm_log_weight`) is largest, by a dense grid search.

    A Python float: the options are static, so this runs once per trace, in numpy.
    """
    lam = np.linspace(-60.0, 60.0, 240_001)  # spacing 5e-4; the weighting is flat at its peak
    mu, s, c = -2.0 * p_mean, 2.0 * p_std, sigma_data**2
    log_w = -0.5 * ((lam - mu) / s) ** 2 + np.logaddexp(-lam, np.log(c))
    return float(lam[np.argmax(log_w)])


@WEIGHTINGS.register("edm")
def edm_weighting(gamma, *, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
    """Kingma & Gao 2023's monotone EDM weighting in lambda = -gamma, with maximum 1.

    EDM's own weighting re-expressed in lambda (`_edm_log_weight`) rises then falls; made
    monotone as Kingma & Gao do ("EDM-monotonic"): held at its peak value for every lambda
    below the peak lambda*, so w(lambda) = w_EDM(max(lambda, lambda*)) / w_EDM(lambda*), which
    is non-increasing in lambda (non-decreasing in gamma), as a weighted ELBO needs. With the
    defaults (EDM's p_mean, p_std, sigma_data) lambda* = -3.31, i.e. gamma* = 3.31.

    Args:
      gamma: -log SNR, any shape.
      p_mean, p_std: EDM's log-sigma training distribution N(p_mean, p_std^2).
      sigma_data: EDM's data standard deviation.

    Returns:
      w(gamma) in (0, 1], gamma's shape.
    """
    if p_std <= 0 or sigma_data <= 0:
        raise ValueError(
            f"edm weighting needs p_std > 0 and sigma_data > 0, got {p_std}, {sigma_data}."
        )
    peak = _edm_peak(p_mean, p_std, sigma_data)
    lam = jnp.maximum(-gamma, peak)
    return jnp.exp(
        _edm_log_weight(lam, p_mean, p_std, sigma_data)
        - _edm_log_weight(peak, p_mean, p_std, sigma_data)
    )


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


def scalar_gamma_input(denoise_fn):
    """denoise_fn called with network_gamma(gamma): [B] for a per-element gamma [B, ...]."""

    def denoise(z, gamma, cond):
        return denoise_fn(z, network_gamma(gamma), cond)

    return denoise


def check_multivariate(loss_type: str = "elbo", schedule_grad: str = "elbo"):
    """Raises ValueError for the objective settings a multivariate schedule does not support.

    The variance rule normalises one scalar shape between scalar endpoints, and a weighting
    w(gamma) of the per-example loss needs one gamma per example; neither is defined for a
    gamma per element.
    """
    if schedule_grad != "elbo":
        raise ValueError(
            f"schedule.grad={schedule_grad!r} needs a scalar schedule; the multivariate "
            "schedule (schedule.type=multivariate) is trained by the ELBO: use schedule.grad=elbo."
        )
    if loss_type == "weighted":
        raise ValueError(
            "loss.type='weighted' weights each example's loss by w(gamma_t), one gamma per "
            "example; the multivariate schedule has one per element: use loss.type=elbo|simple."
        )


def bits_per_dim(nats, num_dims: int):
    """Converts nats per example to bits per dimension."""
    return nats / (num_dims * jnp.log(2.0))


def check_objective(
    loss_type: str = "elbo",
    weighting: str = "none",
    weighting_options=None,
    timesteps: int = 0,
    schedule_grad: str = "elbo",
):
    """Raises ValueError naming the problem if the objective's settings are inconsistent.

    Called by loss_terms and when a model's Objective is built, so a bad combination fails
    when a run is assembled rather than when the first step is traced.
    """
    if loss_type not in ("elbo", "simple", "weighted"):
        raise ValueError(f"Unknown loss type {loss_type!r}; use elbo|simple|weighted.")
    WEIGHTINGS.check(weighting, weighting_options or {})
    if schedule_grad not in ("elbo", "variance"):
        raise ValueError(f"Unknown schedule_grad {schedule_grad!r}; use elbo|variance.")
    if int(timesteps) < 0:
        raise ValueError(f"timesteps (loss.timesteps) must be >= 0, got {timesteps}.")
    if schedule_grad == "variance" and timesteps:
        # In discrete time E[L_T] depends on the schedule's interior, so replacing its
        # gradient by the variance rule would drop a real ELBO gradient.
        raise ValueError(
            f"schedule_grad='variance' (schedule.grad) needs continuous time, timesteps=0 "
            f"(loss.timesteps), got timesteps={timesteps}: with T steps the expected loss "
            "depends on the schedule's shape, so the shape must keep its ELBO gradient; use "
            "schedule_grad='elbo'."
        )


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

    Gradients of mean(train): the network gets those of the configured training loss; the
    schedule gets those of the ELBO (with schedule_grad='variance': ELBO for its endpoints,
    the variance rule for its shape) whatever the loss type, so a simple or weighted loss never
    drags the learned schedule. The unit of the optimised objective is bits/dim: the caller
    minimises bits_per_dim(mean(train), D) (vdm.run.step does), and the variance rule is
    scaled for that unit, so the shape gets grad mean((L_diffusion in bits/dim)^2).

    Args:
      denoise_fn: (z_t, gamma_t [B], cond) -> prediction of kind `parameterization`.
      schedule, schedule_params: the noise schedule and its parameters.
      x: data [B, ...], integers in [0, vocab_size) or continuous (vocab_size None).
      key: PRNG key for t, eps and the reconstruction noise.
      vocab_size: number of discrete values, or None for continuous data.
      cond: conditioning passed to denoise_fn unchanged.
      parameterization: eps|x|v|score.
      timesteps: T for the discrete-time loss; 0 for continuous time.
      antithetic: low-discrepancy times over the batch (training only: evaluation wants
        independent examples for its standard error).
      loss_type: elbo|simple|weighted: what `train` holds.
      weighting: a WEIGHTINGS name, for loss_type=weighted.
      weighting_options: that weighting's options (e.g. sigmoid's bias).
      schedule_grad: elbo|variance (see module docstring); variance needs timesteps=0.
      t: optional fixed times [B] or a scalar (overrides sampling; for evaluation and tests).
      time_weight: optional [B] importance weights 1 / q(t) of times t drawn from a proposal q
        (vdm.core.time_proposals); the diffusion term is multiplied by them, which keeps its
        expectation over t ~ U(0, 1).

    Returns:
      Dict of [B] arrays: diffusion, prior, recon, total (nats), bpd, train (the per-example
      training loss to average, in nats except simple's per-dimension eps-MSE), gamma_t, t
      and time_weight (1 without a proposal).
    """
    check_objective(loss_type, weighting, weighting_options, timesteps, schedule_grad)
    multi = bool(schedule.event_shape)
    if multi:
        check_multivariate(loss_type, schedule_grad)
        # The network is conditioned on one gamma per example (the mean of the elements').
        denoise_fn = scalar_gamma_input(denoise_fn)
    n = x.shape[0]
    k_t, k_eps, k_0 = jax.random.split(key, 3)
    x_enc = decoder.encode(x, vocab_size)
    num_dims = x_enc.size // n
    g0, g1 = endpoints(schedule, schedule_params)
    if multi:
        # Per-element endpoints [*shape] against the batch: the prior and the reconstruction
        # terms are then per element, summed per example as for a scalar schedule.
        g0, g1 = jnp.broadcast_to(g0, x_enc.shape), jnp.broadcast_to(g1, x_enc.shape)
    if t is None:
        t = sample_times(k_t, n, antithetic)
    # A scalar t means the same time for every example; any other shape must be [B].
    t = jnp.broadcast_to(jnp.asarray(t, x_enc.dtype), (n,))
    if timesteps:
        # Grid times 1/T .. 1; s is the previous grid point.
        t = jnp.maximum(jnp.ceil(t * timesteps), 1.0) / timesteps
    eps = jax.random.normal(k_eps, x_enc.shape, x_enc.dtype)

    def eps_error(gamma_t, denoise):
        """The squared error of the implied eps prediction, per element [B, ...]."""
        z_t = diffusion.q_sample(x_enc, gamma_t, eps)
        pred = denoise(z_t, gamma_t, cond)
        # A prediction of the wrong shape would broadcast inside the squared error silently.
        chex.assert_equal_shape([pred, z_t])
        return jnp.square(eps - diffusion.to_eps(pred, z_t, gamma_t, parameterization))

    w = jnp.ones((n,), x_enc.dtype) if time_weight is None else time_weight
    axes = tuple(range(1, x_enc.ndim))

    def diffusion_loss(gamma_t, second, denoise):
        """The ELBO's diffusion term and the squared error, both weighted by the importance
        weight w; second: gamma'(t) or gamma_s (per element for a multivariate schedule,
        whose term is then 0.5 sum_i gamma_i'(t) (eps_i - eps_hat_i)^2)."""
        err = eps_error(gamma_t, denoise)
        sq = w * jnp.sum(err, axis=axes)
        if timesteps:
            coef = 0.5 * timesteps * jnp.expm1(gamma_t - second)
        else:
            coef = 0.5 * second
        if multi:
            return w * jnp.sum(coef * err, axis=axes), sq
        return coef * sq, sq

    def gamma_at(tt):
        return schedule.gamma(schedule_params, tt)

    if timesteps:
        gamma_t, second = gamma_at(t), gamma_at(t - 1.0 / timesteps)
    else:
        gamma_t, second = gamma_and_slope(schedule, schedule_params, t)

    # Under a non-ELBO loss the network and the schedule are trained by different terms: the
    # network's term sees the schedule through stop_gradient, and the ELBO's diffusion term
    # sees the network through frozen_closure (its gradient reaches z_t and gamma_t, so the
    # schedule, with the full chain rule through the prediction, but no network parameter).
    # Both evaluate the same prediction, which XLA computes once.
    split = loss_type != "elbo"
    learned = bool(jax.tree.leaves(schedule_params))
    schedule_denoise = frozen_closure(denoise_fn) if split else denoise_fn

    if schedule_grad == "variance":
        # The shape s(t) = (gamma(t) - g0) / (g1 - g0) carries the variance gradient; the
        # endpoints enter outside it and get ordinary ELBO gradients (continuous time only).
        def shape(tt):
            return (gamma_at(tt) - g0) / (g1 - g0)

        h = jax.jvp(shape, (t,), (jnp.ones_like(t),))

        def from_shape(h, g0, g1):
            a, b = h
            return diffusion_loss(g0 + (g1 - g0) * a, (g1 - g0) * b, schedule_denoise)[0]

        l_diff = variance_gradient(from_shape, h, g0, g1, scale=num_dims * math.log(2.0))
    elif split and not learned:
        # Nothing for the ELBO term to train: the network's own term below gives the value.
        l_diff = None
    else:
        l_diff = diffusion_loss(gamma_t, second, schedule_denoise)[0]

    eps_0 = jax.random.normal(k_0, x_enc.shape, x_enc.dtype)
    z_0 = diffusion.q_sample(x_enc, g0 if multi else jnp.broadcast_to(g0, (n,)), eps_0)
    l_recon = decoder.reconstruction_loss(x, z_0, g0, vocab_size)
    l_prior = prior_loss(x_enc, g1)

    if split:
        g_net, second_net = jax.lax.stop_gradient(gamma_t), jax.lax.stop_gradient(second)
        l_net, sq = diffusion_loss(g_net, second_net, denoise_fn)
        l_diff = l_net if l_diff is None else l_diff
        total = l_diff + l_prior + l_recon
        if loss_type == "simple":
            value = sq / num_dims
        else:
            weight = WEIGHTINGS.build(weighting, weighting_options, gamma=g_net)
            value = weight * l_net + jax.lax.stop_gradient(l_prior + l_recon)
        # Zero in value; carries the ELBO's gradient to the schedule alone.
        train = value + (total - jax.lax.stop_gradient(total))
    else:
        total = l_diff + l_prior + l_recon
        train = total
    chex.assert_shape([l_diff, l_prior, l_recon, train], (n,))
    return {
        "diffusion": l_diff,
        "prior": l_prior,
        "recon": l_recon,
        "total": total,
        "bpd": bits_per_dim(total, num_dims),
        "train": train,
        "gamma_t": gamma_t,
        "t": t,
        "time_weight": w,
    }
