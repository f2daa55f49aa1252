"""The training loop: resume or start, step, log, evaluate, checkpoint, finish.

`train_and_evaluate(config, workdir)` assembles the run (vdm/run/setup.py) and calls `train`.
The loop syncs with the host only at log, eval and checkpoint steps (and on preemption);
metrics go through clu's writers (vdm/run/writers.py) and progress through clu's
ReportProgress (steps/s, ETA) and Profile periodic actions.
"""

import contextlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from vdm import data, distributed, parallel
from vdm.run import logs, writers
from vdm.run.checkpoint import Checkpoints
from vdm.run.evaluate import evaluate
from vdm.run.sample import write_final
from vdm.run.setup import KeyStream, Run, build_run
from vdm.run.state import TrainState


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient or update."""


def restore_or_init(run: Run, ckpts: Checkpoints):
    """The latest verified checkpoint, or a fresh state when there is none.

    Returns:
      (state, meta, start_step, restored: bool)
    """
    found = ckpts.restore(run.abstract_state)
    if found is not None:
        state, meta, step = found
        return state, meta, step, True
    return run.init_state(), {}, 0, False


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

    def __init__(self, *, exits_after: bool = False):
        self._requested = False
        self._stopping = False  # the run agreed to stop for a preemption
        self._exits_after = exits_after  # the process ends when training returns (the CLI)
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        if self._stopping:
            logging.warning("SIGTERM received while exiting after the preemption checkpoint.")
            return
        logging.warning("SIGTERM received: checkpointing and exiting at the next step.")
        self._requested = True

    def requested(self, *, sync: bool) -> bool:
        """Whether to stop now. With several processes all must agree, so the flag is only
        exchanged (a collective) at steps where every process calls with sync=True."""
        if jax.process_count() == 1:
            stop = self._requested
        elif not sync:
            return False
        else:
            stop = bool(np.any(multihost_utils.process_allgather(np.int32(self._requested))))
        self._stopping = self._stopping or stop
        return stop

    def restore(self) -> None:
        """Reinstates the previous SIGTERM handler. Only when the process ends with the run
        (`exits_after`, the CLI) and it is stopping for a preemption is this one kept: a pod's
        processes are told at slightly different times, and one told after the agreed
        checkpoint must still finish its exit (0) rather than die of it. A library caller
        gets its handler back always: a handler left behind that ignores SIGTERM made a
        pytest worker unkillable by its CI's timeout."""
        if self._previous is not None and not (self._stopping and self._exits_after):
            signal.signal(signal.SIGTERM, self._previous)


def _next_event(step: int, every: list[int], last: int) -> int:
    candidates = [last] + [(step // e + 1) * e for e in every if e > 0]
    return min(candidates)


def train_and_evaluate(
    config, workdir: str, *, tensorboard: bool = True, fail_at_step: int | None = None
) -> dict:
    """Assembles the run from `config` and trains it (see `train`)."""
    return train(build_run(config), workdir, tensorboard=tensorboard, fail_at_step=fail_at_step)


def train(
    run: Run,
    workdir: str,
    *,
    tensorboard: bool = True,
    fail_at_step: int | None = None,
    exits_after: bool = False,
) -> dict:
    """Trains (resuming from the workdir's latest checkpoint), evaluates and writes outputs.

    Args:
      run: the assembled run.
      workdir: run directory (checkpoints, metrics.jsonl, TensorBoard, pictures, DONE).
      tensorboard: also write TensorBoard summaries.
      fail_at_step: test hook forwarded to the train step (injects a NaN loss).
      exits_after: the process ends when this returns (vdm.main): after a preemption
        checkpoint, a late SIGTERM is logged and ignored until exit instead of the caller's
        handler being reinstated.

    Returns:
      Dict with 'step', 'preempted' and the last eval metrics.

    Raises:
      NonFiniteError: a step produced non-finite values (nothing non-finite was saved).
      CheckpointError: checkpoints exist but none can be restored.
      CheckpointSaveError: a checkpoint could not be written (the earlier ones are intact).
    """
    config, tc = run.config, run.config.train
    parallel.check_batch_size(config.data.batch_size, run.mesh, config.optim.accum_steps)
    ckpts = run.checkpoints(workdir)
    # A lost or failing process stops every process with a message ending in this line.
    distributed.set_context(ckpts.describe_latest)
    state, meta, step, restored = restore_or_init(run, ckpts)
    if restored and step >= tc.num_steps and logs.is_done(workdir):
        logging.info("Run in %s is already complete at step %d.", workdir, step)
        ckpts.close()
        return {"step": step, "preempted": False}
    logs.clear_done(workdir)  # e.g. a finished run extended with more steps
    clock = logs.RunClock(float(meta.get("wall_time", 0.0)))
    writer = writers.create_writer(
        workdir, clock, resume_step=step if restored else None, tensorboard=tensorboard
    )
    if restored:
        for change in logs.config_changes(workdir, config):
            logging.warning("Resuming with a changed setting: %s", change)
    logs.write_config(workdir, config, dataset=data.info_record(run.info))
    logging.info(
        "%s at step %d on %d devices / %d processes.",
        "Resuming" if restored else "Starting",
        step,
        jax.device_count(),
        jax.process_count(),
    )
    steps_fn = run.compiled_steps(fail_at_step=fail_at_step)
    batches = run.train_batches(step)
    key = run.key(KeyStream.TRAIN)
    preempt = PreemptionFlag(exits_after=exits_after)
    hooks = []
    if jax.process_index() == 0:
        report = periodic_actions.ReportProgress(
            num_train_steps=tc.num_steps, writer=writer, every_steps=max(tc.log_every, 1)
        )
        hooks.append(report)
        if tc.profile_steps > 0:
            hooks.append(
                # Stop after the steps alone: clu's default also waits 3 s, so a short run
                # or fast steps would end before the trace is ever written.
                periodic_actions.Profile(
                    logdir=str(workdir),
                    num_profile_steps=tc.profile_steps,
                    profile_duration_ms=None,
                    every_secs=None,
                )
            )
    every = [tc.log_every, tc.eval_every, tc.ckpt_every]
    acc, acc_steps, eval_metrics = None, 0, {}
    input_s = 0.0  # host seconds spent reading and placing batches since the last log line
    try:
        while step < tc.num_steps:
            num = min(max(int(tc.steps_per_call), 1), _next_event(step, every, tc.num_steps) - step)
            started = time.perf_counter()
            local = [next(batches) for _ in range(num)]
            if num > 1:
                local = [jax.tree.map(lambda *xs: np.stack(xs), *local)]
            batch = parallel.global_batch(local[0], run.mesh, stacked=num > 1)
            input_s += time.perf_counter() - started
            state, metrics = steps_fn(num)(state, batch, key)
            acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
            step, acc_steps = step + num, acc_steps + num
            for hook in hooks:
                hook(step)
            final = step >= tc.num_steps
            is_log = final or (tc.log_every > 0 and step % tc.log_every == 0)
            is_eval = final or (tc.eval_every > 0 and step % tc.eval_every == 0)
            is_ckpt = is_eval or (tc.ckpt_every > 0 and step % tc.ckpt_every == 0)
            stop = preempt.requested(sync=is_log)
            if not (is_log or is_ckpt or stop):
                continue
            check_finite(state, ckpts)
            ckpts.check()  # a failed background save stops the run at the next sync point
            if is_log:
                values = logs.to_floats(jax.tree.map(lambda v: v / acc_steps, parallel.fetch(acc)))
                # The input pipeline's cost per step on this host. Steps are dispatched
                # asynchronously, so the device stalls on input only when this exceeds the
                # step time (1000 / ReportProgress's steps_per_sec).
                values["train/input_ms"] = 1e3 * input_s / acc_steps
                writer.write_scalars(step, values)
                acc, acc_steps, input_s = None, 0, 0.0
                if jax.process_index() == 0:
                    logging.info("step %d/%d | loss %.4f", step, tc.num_steps, values["train/loss"])
            if is_eval:
                with _timed(hooks, "eval"):
                    eval_metrics = evaluate(run, run.eval_params(state), time_hist=state.time_hist)
                writer.write_scalars(step, eval_metrics)
            if is_ckpt or stop:
                with _timed(hooks, "checkpoint"):
                    ckpts.save(
                        step,
                        state,
                        {"wall_time": clock.wall_time()},
                        eval_metrics if is_eval else None,
                    )
            writer.flush()
            if stop:
                ckpts.wait()
                logging.warning(
                    "Preempted: saved %s; relaunch the same command to resume.", ckpts.path(step)
                )
                return {"step": step, "preempted": True, **eval_metrics}
        ckpts.wait()
        if not eval_metrics:  # relaunched after the last step (e.g. killed while sampling)
            eval_metrics = evaluate(run, run.eval_params(state), time_hist=state.time_hist)
        write_final(
            run, run.eval_params(state), workdir, step, writer, clock.wall_time(), eval_metrics
        )
        return {"step": step, "preempted": False, **eval_metrics}
    finally:
        preempt.restore()
        writer.close()
        ckpts.close()


def _timed(hooks, name: str):
    """ReportProgress's timer for a non-training section (so steps/s leaves it out)."""
    for hook in hooks:
        if isinstance(hook, periodic_actions.ReportProgress):
            return hook.timed(name, wait_jax_async_dispatch=False)
    return contextlib.nullcontext()
