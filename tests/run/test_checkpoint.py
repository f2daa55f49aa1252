"""Tests of checkpointing: retention, corruption fallback, kill/preempt-and-resume, resharding.

The resume tests compare metrics.jsonl losses of interrupted runs with an uninterrupted run of
the same config, bit for bit (CPU, same device count) or to float tolerance (other count).
"""

import errno
import os
import re
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th

from vdm.errors import UserError
from vdm.run.checkpoint import CheckpointError, Checkpoints, CheckpointSaveError

NUM_STEPS = 300
RUN = dict(
    train__num_steps=NUM_STEPS,
    train__ckpt_every=20,
    train__eval_every=10_000,
    train__write_samples=False,
)


def _target(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _largest_file(directory: Path) -> Path:
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


# Orbax abandons the other reads of a failed restore; their coroutines complain when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_retention_donation_and_corruption_fallback(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=2)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    noise = np.random.default_rng(0).normal(size=(50_000,)).astype(np.float32)
    state = {"w": jnp.asarray(noise), "n": jnp.zeros((), jnp.int32)}
    snapshots = {}
    for step in range(1, 9):
        state = bump(state)  # donation right after an async save must not corrupt it
        if step % 2 == 0:
            snapshots[step] = jax.tree.map(np.array, state)
            bpd = 0.5 if step == 4 else 10.0 - step  # step 4 is the best
            ckpts.save(step, state, {"wall_time": float(step)}, {"eval/bpd": bpd})
    ckpts.wait()
    assert ckpts.all_steps() == [4, 6, 8]  # latest two plus the best by eval/bpd
    for step in (4, 6, 8):
        restored, meta, _ = ckpts.restore(_target(state), step=step)
        assert meta["step"] == step
        jax.tree.map(
            np.testing.assert_array_equal, jax.tree.map(np.array, restored), snapshots[step]
        )

    # A truncated data file in the latest checkpoint: fall back to the previous one and move
    # the bad one aside so a new save at that step works.
    with open(_largest_file(tmp_path / "checkpoints" / "8" / "state"), "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)
    restored, _, step = ckpts.restore(_target(state))
    assert step == 6 and ckpts.all_steps() == [4, 6]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints.corrupt").iterdir()] == ["8"]
    ckpts.save(8, state, {"wall_time": 8.0})
    ckpts.close()

    # Every checkpoint unreadable: a clear error, nothing moved, never a silent fresh start.
    for step in (4, 6, 8):
        _largest_file(tmp_path / "checkpoints" / str(step) / "state").write_bytes(b"")
    ckpts = Checkpoints(tmp_path, keep=2)
    with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
        ckpts.restore(_target(state))
    assert ckpts.all_steps() == [4, 6, 8]
    ckpts.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-device run: its workdir (built once for the whole test run)."""
    build = lambda workdir: th.run_main(workdir, *th.overrides(**RUN))
    return th.workdir_once(tmp_path_factory, "checkpoint_reference", build)


def _last_logged_step(workdir) -> int:
    try:
        return max(th.train_losses(workdir), default=0)
    except (FileNotFoundError, ValueError):
        return 0  # not written yet, or a line half-written


def _steps_in_log(log) -> int:
    """The last step a launch logged to its own output ("step N/M | loss"), or 0."""
    return max(map(int, re.findall(r"\] step (\d+)/", log.read_text())), default=0)


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_bit_for_bit(tmp_path, reference):
    flags = th.overrides(**RUN)
    # 1. SIGKILL as soon as the first checkpoint is on disk.
    proc = th.spawn_main(tmp_path, *flags, log=tmp_path / "run1.log")
    th.wait_for(lambda: th.checkpoint_steps(tmp_path), proc=proc, interval=0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "DONE").exists() and _last_logged_step(tmp_path) < NUM_STEPS

    # 2. Relaunch; SIGTERM (preemption) a few steps after it resumed: checkpoint and exit 0.
    proc = th.spawn_main(tmp_path, *flags, log=tmp_path / "run2.log")
    resumed_from = th.checkpoint_steps(tmp_path)[-1]
    # Its own log, not metrics.jsonl: until the relaunch truncates that file it still holds
    # the killed launch's steps, and a SIGTERM sent before the handler is installed kills it.
    th.wait_for(lambda: _steps_in_log(tmp_path / "run2.log") > resumed_from + 3, proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    assert not (tmp_path / "DONE").exists()
    preempted_at = _last_logged_step(tmp_path)
    assert preempted_at < NUM_STEPS and th.checkpoint_steps(tmp_path)[-1] == preempted_at

    # 3. Relaunch to the end: the same losses as the uninterrupted run, bit for bit.
    th.run_main(tmp_path, *flags)
    assert (tmp_path / "DONE").exists()
    expected = th.train_losses(reference)
    assert sorted(expected) == list(range(1, NUM_STEPS + 1))
    assert th.train_losses(tmp_path) == expected
    final = [r for r in th.read_metrics(tmp_path) if "eval/bpd" in r]
    reference_final = [r for r in th.read_metrics(reference) if "eval/bpd" in r]
    assert final[-1]["eval/bpd"] == reference_final[-1]["eval/bpd"]


@pytest.mark.slow
def test_restore_single_device_checkpoint_on_four_devices(tmp_path, reference):
    # Train 10 steps on one device, then continue to 20 on 4 devices with sharded parameters.
    th.run_main(tmp_path, *th.overrides(**dict(RUN, train__num_steps=10, train__ckpt_every=5)))
    assert th.checkpoint_steps(tmp_path)[-1] == 10
    th.run_main(tmp_path, *th.overrides(**dict(RUN, train__num_steps=20, train__fsdp=2)), devices=4)
    losses, expected = th.train_losses(tmp_path), th.train_losses(reference)
    assert sorted(losses) == list(range(1, 21))
    for step in range(1, 21):
        np.testing.assert_allclose(losses[step], expected[step], rtol=2e-5, err_msg=str(step))


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
    # `--workdir=runs/x` as in the README: orbax itself accepts only absolute paths.
    monkeypatch.chdir(tmp_path)
    ckpts = Checkpoints("runs/relative", keep=1)
    state = {"w": jnp.arange(4.0)}
    ckpts.save(3, state, {"wall_time": 1.0})
    ckpts.wait()
    restored, meta, step = ckpts.restore(_target(state))
    ckpts.close()
    assert step == 3 and meta["step"] == 3
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
    assert (tmp_path / "runs" / "relative" / "checkpoints" / "3").is_dir()


def test_a_save_that_fails_names_the_step_and_leaves_earlier_checkpoints(tmp_path):
    """A full disk (ENOSPC from the writer) during a save: CheckpointSaveError naming the step,
    the cause and the last complete checkpoint, which still restores; the failed step is not
    among the finalised ones."""
    state = {"w": jnp.arange(6.0), "step": jnp.asarray(1)}
    ckpts = Checkpoints(tmp_path, keep=3, async_save=False)
    ckpts.save(1, state, {"note": "first"})
    ckpts.wait()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpts._mngr.save = disk_full  # the writer fails as tensorstore does on a full disk
    with pytest.raises(CheckpointSaveError) as err:
        ckpts.save(2, {"w": jnp.arange(6.0) + 1, "step": jnp.asarray(2)}, {"note": "second"})
    message = str(err.value)
    assert "step 2" in message and "No space left on device" in message, message
    assert f"Last complete checkpoint: {tmp_path / 'checkpoints' / '1'} (step 1)" in message
    assert isinstance(err.value, UserError)  # the command line prints it as one message
    ckpts.close()
    assert th.checkpoint_steps(tmp_path) == [1]
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)  # fmt: skip
    restored, meta, step = Checkpoints(tmp_path, async_save=False).restore(target)
    assert step == 1 and meta["note"] == "first"
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_a_checkpoint_of_another_shape_is_refused_naming_the_arrays(tmp_path):
    state = {"params": {"conv": {"kernel": jnp.zeros((3, 3, 4, 8))}, "b": jnp.zeros(3)}}
    ckpts = Checkpoints(tmp_path, async_save=False)
    ckpts.save(1, state, {})
    ckpts.wait()
    other = {"params": {"conv": {"kernel": jnp.zeros((3, 3, 4, 16))}, "c": jnp.zeros(3)}}
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          other)  # fmt: skip
    with pytest.raises(CheckpointError, match="does not fit this config: 3 arrays differ") as e:
        ckpts.restore(target)
    message = str(e.value)
    assert "params/conv/kernel: checkpoint (3, 3, 4, 8) vs config (3, 3, 4, 16)" in message
    assert "params/b: checkpoint (3,) vs config absent" in message
    assert "params/c: checkpoint absent vs config (3,)" in message
    assert th.checkpoint_steps(tmp_path) == [1]  # refused, not moved aside


@pytest.mark.slow
def test_resuming_with_another_network_fails_and_with_another_lr_logs_it(trained_workdir):
    tmp_path = trained_workdir  # a finished 2-step run
    wider = th.run_main(tmp_path, *th.overrides(train__num_steps=4, model__n_embd=32),
                        check=False)  # fmt: skip
    assert wider.returncode == 1, wider.stderr[-3000:]
    assert "does not fit this config" in wider.stderr and "Traceback" not in wider.stderr
    assert "checkpoint (2, 64) vs config (2, 32)" in wider.stderr or "vs config (" in wider.stderr
    lower = th.run_main(tmp_path, *th.overrides(train__num_steps=3, optim__learning_rate=1e-4,
                                                train__write_samples=False))  # fmt: skip
    assert "Resuming with a changed setting: optim.learning_rate: 0.001 -> 0.0001" in (
        lower.stderr
    ), lower.stderr[-3000:]
    assert sorted(th.train_losses(tmp_path)) == [1, 2, 3]
