"""Guidance: classifier-free (mixing conditional and null-label predictions) and classifier.

Classifier-free guidance with weight w combines two predictions of the same network in eps
space, eps_w = eps(z, null) + w (eps(z, cond) - eps(z, null)): w = 0 is the unconditional
model, w = 1 the conditional one, w > 1 over-weights the condition. Ho & Salimans (2022) write
the same mixture as (1 + w') eps(z, cond) - w' eps(z, null), so their w' = w - 1: their w' = 0
(plain conditional) is w = 1 here, and their w' = 3 is w = 4. Since eps = -sigma * score, this
is the score of p(z) p(y | z)^w up to the usual approximation.

Classifier guidance (Dhariwal & Nichol 2021) adds scale * grad_z log p(y | z_t) to the score,
i.e. shifts eps by -sigma_t * scale * grad; the classifier sees noisy inputs and gamma_t, and is
trained with `classifier_loss` on q_sample'd data at uniformly drawn times.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdm.core import decoder, diffusion, oracles


def null_condition(cond, num_classes: int | None):
    """cond with every label replaced by the null label num_classes (other entries kept)."""
    if cond is None or "label" not in cond:
        raise ValueError("Guidance needs cond with a 'label' entry to derive null_cond from.")
    if num_classes is None:
        raise ValueError("Pass null_cond, or the option num_classes so it can be derived.")
    label = jnp.asarray(cond["label"])
    return dict(cond, label=jnp.full_like(label, num_classes))


def guided_eps_fn(
    denoise_fn: Callable,
    parameterization: str = "eps",
    *,
    cond=None,
    guidance: float = 0.0,
    null_cond=None,
    num_classes: int | None = None,
) -> Callable:
    """The classifier-free-guided eps predictor eps_w(z, gamma [B]).

    With a static w of 0 or 1 only one prediction is computed (the null or the conditional
    one), so w = 0 costs one evaluation and equals the unconditional sampler bit for bit. A
    traced w always evaluates both.

    Args:
      denoise_fn: (z, gamma [B], cond) -> prediction of kind `parameterization`.
      parameterization: eps|x|v|score.
      cond: conditioning for the conditional branch (None: unconditional model, no guidance).
      guidance: the weight w.
      null_cond: conditioning of the unconditional branch; derived from cond if None.
      num_classes: the null label's value, used only to derive null_cond.

    Returns:
      eps_fn(z, gamma) -> eps prediction.
    """

    def eps(z, gamma, c):
        return diffusion.to_eps(denoise_fn(z, gamma, c), z, gamma, parameterization)

    static_w = isinstance(guidance, int | float)
    if cond is None or (static_w and guidance == 1.0):
        return lambda z, gamma: eps(z, gamma, cond)
    if null_cond is None:
        null_cond = null_condition(cond, num_classes)
    if static_w and guidance == 0.0:
        return lambda z, gamma: eps(z, gamma, null_cond)

    def combined(z, gamma):
        e_null = eps(z, gamma, null_cond)
        return e_null + guidance * (eps(z, gamma, cond) - e_null)

    return combined


def _label_log_prob(classifier_fn, z, gamma, label, cond):
    logits = classifier_fn(z, gamma, cond)
    k = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_p, jnp.clip(label, 0, k - 1)[:, None], axis=-1)[:, 0]
    # The null label means "no class": it contributes no gradient.
    return jnp.where(label < k, picked, 0.0)


def classifier_guided(
    denoise_fn: Callable,
    classifier_fn: Callable,
    *,
    scale: float,
    parameterization: str = "eps",
) -> Callable:
    """Wraps a denoiser so its eps is shifted by -sigma * scale * grad_z log p(y | z_t, gamma).

    Examples are independent in the classifier, so the gradient of the batch sum of log-probs
    is every example's own gradient.

    Args:
      denoise_fn: (z, gamma [B], cond) -> prediction of kind `parameterization`.
      classifier_fn: (z, gamma [B], cond) -> logits [B, K] on noisy inputs.
      scale: guidance scale (0: no guidance).
      parameterization: the kind denoise_fn predicts.

    Returns:
      A denoiser (z, gamma, cond) -> guided eps; use it with parameterization='eps'. cond must
      hold 'label' [B]; labels >= K get no guidance.
    """

    def denoise(z, gamma, cond):
        eps = diffusion.to_eps(denoise_fn(z, gamma, cond), z, gamma, parameterization)
        label = jnp.asarray(cond["label"])

        def total_log_prob(zz):
            return jnp.sum(_label_log_prob(classifier_fn, zz, gamma, label, cond))

        grad = jax.grad(total_log_prob)(z)
        _, sigma = diffusion.alpha_sigma(diffusion.broadcast(gamma, z))
        return eps - sigma * scale * grad

    return denoise


def classifier_loss(
    classifier_fn: Callable,
    schedule,
    schedule_params,
    x,
    labels,
    key,
    *,
    vocab_size: int | None,
    cond=None,
):
    """Mean cross-entropy of a noisy classifier on z_t ~ q(z_t | x), t ~ U(0, 1).

    Args:
      classifier_fn: (z, gamma [B], cond) -> logits [B, K] (closing over its parameters).
      schedule, schedule_params: the diffusion's noise schedule.
      x: data [B, ...] (integers for vocab_size, else continuous).
      labels: int [B] in [0, K).
      key: PRNG key for t and the noise.
      vocab_size: number of discrete values, or None.
      cond: extra conditioning passed through to the classifier.

    Returns:
      Scalar mean cross-entropy in nats.
    """
    if schedule.event_shape:
        raise ValueError(
            "The noisy classifier is conditioned on one gamma per example; the multivariate "
            "schedule has one per element."
        )
    k_t, k_eps = jax.random.split(key)
    x_enc = decoder.encode(x, vocab_size)
    t = jax.random.uniform(k_t, (x_enc.shape[0],))
    gamma = schedule.gamma(schedule_params, t)
    z = diffusion.q_sample(x_enc, gamma, jax.random.normal(k_eps, x_enc.shape, x_enc.dtype))
    labels = jnp.asarray(labels)
    return -jnp.mean(_label_log_prob(classifier_fn, z, gamma, labels, cond))


def mixture_classifier(weights, means, covs) -> Callable:
    """The exact noisy classifier of a diagonal Gaussian mixture: logits log w_k q_k(z_t).

    Args:
      weights: [K]; means, covs: [K, D] (as for vdm.oracles.mixture_eps).

    Returns:
      classifier_fn(z [B, D], gamma [B], cond=None) -> logits [B, K].
    """
    weights, means, covs = jnp.asarray(weights), jnp.asarray(means), jnp.asarray(covs)

    def classify(z, gamma, cond=None):
        del cond
        per_class = [
            oracles.mixture_log_prob(jnp.ones((1,)), means[k : k + 1], covs[k : k + 1], z, gamma)
            for k in range(weights.shape[0])
        ]
        return jnp.log(weights)[None] + jnp.stack(per_class, axis=-1)

    return classify
