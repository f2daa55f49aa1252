"""The train state, the jitted train step and the training loop.

`train_step(state, batch, key)` is pure: the step's randomness is fold_in(key, state.step), so
a run restarted from a checkpoint (which stores the step; the data position is the step too)
repeats an uninterrupted run bit for bit on CPU, and the device count only changes float
reduction order. A non-finite loss, gradient or update is never applied: the step keeps the
old state and records the step in `state.nonfinite_step`; the loop raises `NonFiniteError` at
its next host check, which always precedes a checkpoint save.

The loop syncs with the host only at log, eval and checkpoint steps (and on preemption).
"""

import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.experimental import multihost_utils

from vdm import data, logging_utils, optim, outputs, sharding
from vdm.checkpoint import Checkpoints
from vdm.experiment import Experiment
from vdm.logging_utils import MetricLogger, Progress


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient or update."""


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
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite_step: jax.Array


def create_state(exp: Experiment, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state from the config's seed (call under jit to place it sharded)."""
    # Explicit dtypes drop JAX's weak types (Python-float initialisers give them), which
    # would otherwise change the step's signature after one update and recompile it.
    params = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), exp.init_params(exp.root_key(0)))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def state_shardings(exp: Experiment, optimizer):
    """(abstract state with shardings, sharding tree) for this mesh."""
    shapes = jax.eval_shape(lambda: create_state(exp, optimizer))
    shardings = sharding.state_shardings(exp.mesh, shapes)
    return sharding.with_shardings(shapes, shardings), shardings


def _mean_metrics(terms, num_dims: int) -> dict:
    to_bpd = 1.0 / (num_dims * np.log(2.0))
    return {
        "bpd": jnp.mean(terms["bpd"]),
        "diffusion_bpd": jnp.mean(terms["diffusion"]) * to_bpd,
        "prior_bpd": jnp.mean(terms["prior"]) * to_bpd,
        "recon_bpd": jnp.mean(terms["recon"]) * to_bpd,
    }


def make_train_step(exp: Experiment, optimizer, *, fail_at_step: int | None = None):
    """Builds the pure `train_step(state, batch, key) -> (state, metrics)`.

    Args:
      exp: the experiment.
      optimizer: from optim.make_optimizer.
      fail_at_step: test hook: the loss of the update producing this step is NaN.

    Returns:
      The step function (not jitted). `key` is the run's training root key; the step folds
      in state.step itself. The batch is split into config.optim.accum_steps micro-batches
      whose gradients are averaged before one optimiser update.
    """
    c = exp.config
    accum = int(c.optim.accum_steps)
    lr_fn = optim.learning_rate_schedule(c.optim)

    def loss_fn(params, batch, key, step):
        terms = exp.loss_terms(params, batch, key, train=True)
        # The training loss on the bits/dim scale (as the published code), so Adam's eps and
        # clipping thresholds mean the same for every image size.
        loss = jnp.mean(terms["train"]) / (exp.num_dims * np.log(2.0))
        if fail_at_step is not None:
            loss = loss * jnp.where(step + 1 == fail_at_step, jnp.nan, 1.0)
        return loss, _mean_metrics(terms, exp.num_dims)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batch(batch, i):
        # Strided split keeps each device's rows on that device.
        return jax.tree.map(lambda a: a.reshape((-1, accum) + a.shape[1:])[:, i], batch)

    def train_step(state: TrainState, batch: dict, key) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(key, state.step)
        if accum == 1:
            (loss, aux), grads = grad_fn(state.params, batch, step_key, state.step)
        else:
            # Unrolled rather than scanned: scans were seen to slow XLA:CPU convolutions.
            results = [
                grad_fn(
                    state.params, micro_batch(batch, i), jax.random.fold_in(step_key, i), state.step
                )
                for i in range(accum)
            ]
            (loss, aux), grads = jax.tree.map(lambda *xs: sum(xs) / accum, *results)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = optim.ema_decay(state.step, c.optim.ema_rate, c.optim.ema_warmup)
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
        )
        g0, g1 = exp.endpoints(state.params)
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": grad_norm,
            "lr": lr_fn(state.step),
            "gamma_0": g0,
            "gamma_1": g1,
        }
        return new_state, {f"train/{k}": v.astype(jnp.float32) for k, v in metrics.items()}

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


def compile_steps(exp, optimizer, shardings, **kwargs):
    """A cache of jitted (donated-state) step functions keyed by steps per call."""
    step = make_train_step(exp, optimizer, **kwargs)
    cache = {}

    def get(num: int):
        if num not in cache:
            cache[num] = jax.jit(
                make_multi_step(step, num),
                out_shardings=(shardings, sharding.replicated(exp.mesh)),
                donate_argnums=0,
            )
        return cache[num]

    return get


def restore_or_init(exp: Experiment, optimizer, ckpts: Checkpoints):
    """The latest verified checkpoint, or a fresh state when there is none.

    Returns:
      (state, meta, start_step, restored: bool)
    """
    target, shardings = state_shardings(exp, optimizer)
    found = ckpts.restore(target)
    if found is not None:
        state, meta, step = found
        return state, meta, step, True
    state = jax.jit(lambda: create_state(exp, optimizer), out_shardings=shardings)()
    return state, {}, 0, False


def check_finite(state: TrainState, ckpts: Checkpoints) -> None:
    """Host check: raises NonFiniteError when a step refused a non-finite update."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad < 0:
        return
    ckpts.wait()
    last = ckpts.latest_step()
    where = f"{ckpts.path(last)} (step {last})" if last is not None else "none"
    raise NonFiniteError(
        f"Non-finite loss or gradients at step {bad}; the update was not applied and training "
        f"stopped. Last good checkpoint: {where}. Relaunching resumes from it; consider a "
        "lower optim.learning_rate or optim.grad_clip > 0."
    )


class PreemptionFlag:
    """Turns SIGTERM into a request to checkpoint and exit at the next step boundary."""

    def __init__(self):
        self._requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: checkpointing and exiting at the next step.")
        self._requested = True

    def requested(self, *, sync: bool) -> bool:
        """Whether to stop now. With several processes all must agree, so the flag is only
        exchanged (a collective) at steps where every process calls with sync=True."""
        if jax.process_count() == 1:
            return self._requested
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.int32(self._requested))
        return bool(np.any(flags))

    def restore(self) -> None:
        """Reinstates the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def batch_iterator(exp: Experiment, start_step: int):
    """This process's share of the training batches from `start_step` on."""
    return data.train_batches(
        exp.config.data,
        seed=exp.config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _next_event(step: int, every: list[int], last: int) -> int:
    candidates = [last] + [(step // e + 1) * e for e in every if e > 0]
    return min(candidates)


def train_and_evaluate(
    config, workdir: str, *, tensorboard: bool = True, fail_at_step: int | None = None
) -> dict:
    """Trains (resuming from the workdir's latest checkpoint), evaluates and writes outputs.

    Args:
      config: the locked experiment ConfigDict.
      workdir: run directory (checkpoints, metrics.jsonl, TensorBoard, pictures, DONE).
      tensorboard: also write TensorBoard summaries.
      fail_at_step: test hook forwarded to make_train_step (injects a NaN loss).

    Returns:
      Dict with 'step', 'preempted' and the last eval metrics.

    Raises:
      NonFiniteError: a step produced non-finite values (nothing non-finite was saved).
      CheckpointError: checkpoints exist but none can be restored.
    """
    exp = Experiment.build(config)
    tc = config.train
    sharding.check_batch_size(config.data.batch_size, exp.mesh, config.optim.accum_steps)
    optimizer = optim.make_optimizer(config.optim)
    ckpts = Checkpoints(workdir, keep=tc.keep_ckpts)
    state, meta, step, restored = restore_or_init(exp, optimizer, ckpts)
    if restored and step >= tc.num_steps and logging_utils.is_done(workdir):
        logging.info("Run in %s is already complete at step %d.", workdir, step)
        ckpts.close()
        return {"step": step, "preempted": False}
    logging_utils.clear_done(workdir)  # e.g. a finished run extended with more steps
    logger = MetricLogger(
        workdir,
        elapsed=float(meta.get("wall_time", 0.0)),
        resume_step=step if restored else None,
        tensorboard=tensorboard,
    )
    logging_utils.write_config(workdir, config)
    logging.info(
        "%s at step %d on %d devices / %d processes.",
        "Resuming" if restored else "Starting",
        step,
        jax.device_count(),
        jax.process_count(),
    )
    _, shardings = state_shardings(exp, optimizer)
    steps_fn = compile_steps(exp, optimizer, shardings, fail_at_step=fail_at_step)
    batches = batch_iterator(exp, step)
    key = exp.root_key(1)
    preempt = PreemptionFlag()
    progress = Progress(tc.num_steps, config.data.batch_size, step)
    every = [tc.log_every, tc.eval_every, tc.ckpt_every]
    acc, acc_steps, eval_metrics = None, 0, {}
    try:
        while step < tc.num_steps:
            num = min(max(int(tc.steps_per_call), 1), _next_event(step, every, tc.num_steps) - step)
            local = [next(batches) for _ in range(num)]
            if num > 1:
                local = [jax.tree.map(lambda *xs: np.stack(xs), *local)]
            batch = sharding.global_batch(local[0], exp.mesh, stacked=num > 1)
            state, metrics = steps_fn(num)(state, batch, key)
            acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
            step, acc_steps = step + num, acc_steps + num
            final = step >= tc.num_steps
            is_log = final or (tc.log_every > 0 and step % tc.log_every == 0)
            is_eval = final or (tc.eval_every > 0 and step % tc.eval_every == 0)
            is_ckpt = is_eval or (tc.ckpt_every > 0 and step % tc.ckpt_every == 0)
            stop = preempt.requested(sync=is_log)
            if not (is_log or is_ckpt or stop):
                continue
            check_finite(state, ckpts)
            if is_log:
                values = logger.write(
                    step, jax.tree.map(lambda v: v / acc_steps, sharding.fetch(acc))
                )
                acc, acc_steps = None, 0
                if jax.process_index() == 0:
                    logging.info(progress.line(step, values["train/loss"]))
            pause = logger.wall_time()
            if is_eval:
                eval_metrics = exp.evaluate(eval_params(config, state))
                logger.write(step, eval_metrics)
                logging.info("eval at step %d: %s", step, _fmt(eval_metrics))
            if is_ckpt or stop:
                ckpts.save(
                    step,
                    state,
                    {"wall_time": logger.wall_time()},
                    eval_metrics if is_eval else None,
                )
            progress.pause(logger.wall_time() - pause)
            if stop:
                ckpts.wait()
                logging.warning(
                    "Preempted: saved %s; relaunch the same command to resume.", ckpts.path(step)
                )
                return {"step": step, "preempted": True, **eval_metrics}
        ckpts.wait()
        if not eval_metrics:  # relaunched after the last step (e.g. killed while sampling)
            eval_metrics = exp.evaluate(eval_params(config, state))
        outputs.write_final(exp, eval_params(config, state), workdir, step, logger, eval_metrics)
        return {"step": step, "preempted": False, **eval_metrics}
    finally:
        preempt.restore()
        ckpts.close()
        logger.close()


def eval_params(config, state: TrainState):
    """The parameters used for evaluation and samples (EMA unless eval.use_ema is off)."""
    return state.ema_params if config.eval.use_ema else state.params


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items())
