"""The pure train step and its compiled forms.

`train_step(state, batch, key)` is pure: the step's randomness is fold_in(key, state.step), so
a run restarted from a checkpoint (which stores the step; the data position is the step too)
repeats an uninterrupted run bit for bit on CPU, and the device count only changes float
reduction order. A non-finite loss, gradient or update is never applied: the step keeps the
old state and records the step in `state.nonfinite_step` (the loop raises at its next host
check, which always precedes a checkpoint save).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm import optim
from vdm.core import losses, time_proposals
from vdm.parallel import replicated
from vdm.run.state import TrainState


def _mean_metrics(terms, num_dims: int) -> dict:
    to_bpd = 1.0 / (num_dims * np.log(2.0))
    return {
        "bpd": jnp.mean(terms["bpd"]),
        "diffusion_bpd": jnp.mean(terms["diffusion"]) * to_bpd,
        "prior_bpd": jnp.mean(terms["prior"]) * to_bpd,
        "recon_bpd": jnp.mean(terms["recon"]) * to_bpd,
    }


def make_train_step(
    model,
    optimizer,
    *,
    lr_fn,
    accum_steps: int = 1,
    ema_rate: float = 0.9999,
    ema_warmup: bool = False,
    fail_at_step: int | None = None,
):
    """Builds the pure `train_step(state, batch, key) -> (state, metrics)`.

    Args:
      model: the DiffusionModel.
      optimizer: the optax update rule.
      lr_fn: the learning-rate schedule (for the logged 'lr').
      accum_steps: micro-batches whose gradients are averaged before one update.
      ema_rate: EMA decay of the parameters.
      ema_warmup: EMA decay min(rate, (1 + step) / (10 + step)).
      fail_at_step: test hook: the loss of the update producing this step is NaN.

    Returns:
      The step function (not jitted). `key` is the run's training root key; the step folds
      in state.step itself.
    """
    accum = int(accum_steps)

    time = model.objective.time

    def loss_fn(params, batch, key, step, time_hist):
        probs = model.time_probs(params, time_hist, time.proposal)
        terms = model.loss_terms(params, batch, key, train=True, time_probs=probs)
        # The training loss on the bits/dim scale (as the published code), so Adam's eps and
        # clipping thresholds mean the same for every image size. loss_terms scales the
        # variance rule's gradient for exactly this unit (losses.bits_per_dim).
        loss = losses.bits_per_dim(jnp.mean(terms["train"]), model.num_dims)
        if fail_at_step is not None:
            loss = loss * jnp.where(step + 1 == fail_at_step, jnp.nan, 1.0)
        # The per-t histogram takes the unweighted diffusion term f(t) (adaptive_lambda: the
        # weighted one, as its square root; time_proposals.histogram_values).
        f = terms["diffusion"] / terms["time_weight"]
        weight = model.loss_weight(jax.lax.stop_gradient(terms["gamma_t"]))
        seen = (terms["t"], time_proposals.histogram_values(time.proposal, f, weight))
        return loss, (_mean_metrics(terms, model.num_dims), seen)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batch(batch, i):
        # Strided split keeps each device's rows on that device.
        return jax.tree.map(lambda a: a.reshape((-1, accum) + a.shape[1:])[:, i], batch)

    def train_step(state: TrainState, batch: dict, key) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(key, state.step)
        hist = state.time_hist
        if accum == 1:
            (loss, (aux, seen)), grads = grad_fn(state.params, batch, step_key, state.step, hist)
        else:
            # Unrolled rather than scanned: scans were seen to slow XLA:CPU convolutions.
            results = [
                grad_fn(
                    state.params,
                    micro_batch(batch, i),
                    jax.random.fold_in(step_key, i),
                    state.step,
                    hist,
                )  # fmt: skip
                for i in range(accum)
            ]
            # Each result is ((loss, (metrics, seen)), grads): average the losses, metrics and
            # gradients; pool the micro-batches' (t, f) pairs for the histogram.
            losses_aux = [((lo, m), g) for (lo, (m, _)), g in results]
            (loss, aux), grads = jax.tree.map(lambda *xs: sum(xs) / accum, *losses_aux)
            seen = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[s for (_, (_, s)), _ in results])
        hist = time_proposals.histogram_update(hist, *seen, rate=time.rate)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = optim.ema_decay(state.step, ema_rate, ema_warmup)
        ema = optim.ema_update(state.ema_params, params, decay)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        finite &= jnp.isfinite(optax.global_norm(updates))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        # Steps are numbered as logged: the update from state.step produces step + 1.
        first_bad = jnp.where(
            finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step + 1
        )
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema_params=keep(ema, state.ema_params),
            nonfinite_step=first_bad.astype(jnp.int32),
            time_hist=jnp.where(finite, hist, state.time_hist),
        )
        g0, g1 = model.endpoints(state.params)
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": grad_norm,
            "lr": lr_fn(state.step),
            "gamma_0": g0,
            "gamma_1": g1,
        }
        # jnp.asarray: a constant learning-rate schedule returns a Python float.
        return new_state, {f"train/{k}": jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return train_step


def make_multi_step(train_step, num: int):
    """`num` train steps in one call over batches stacked on axis 0; returns summed metrics."""
    if num == 1:
        return train_step

    def multi_step(state, batches, key):
        total = None
        for i in range(num):  # unrolled (see make_train_step)
            state, m = train_step(state, jax.tree.map(lambda b: b[i], batches), key)
            total = m if total is None else jax.tree.map(jnp.add, total, m)
        return state, total

    return multi_step


def compile_steps(train_step, mesh, state_shardings):
    """A cache of jitted (donated-state) step functions keyed by steps per call.

    Args:
      train_step: from make_train_step.
      mesh: the device mesh (metrics come back replicated on it).
      state_shardings: the state's sharding tree (the step keeps the state in place).

    Returns:
      get(num) -> the jitted `num`-steps-per-call function.
    """
    cache = {}

    def get(num: int):
        if num not in cache:
            cache[num] = jax.jit(
                make_multi_step(train_step, num),
                out_shardings=(state_shardings, replicated(mesh)),
                donate_argnums=0,
            )
        return cache[num]

    return get
