"""Faults of multi-process runs, on two localhost processes joined by jax.distributed.

- A process killed with SIGKILL: the survivor stops by itself (the coordination service's
  heartbeat timeout, here 5 s) with one message naming the lost process and the last complete
  checkpoint, and no C++ stack dump; relaunching both processes resumes from that checkpoint
  and recomputes the steps the killed launch had logged after it to the same losses.
- The coordinator (process 0) killed: the other process stops at once with one message (its
  supervising parent replaces jaxlib's fatal log and stack dump), and a relaunch resumes.
- SIGTERM to one process of two, or to each of four a moment apart (a preempted pod): the
  processes agree at the next log step, write one checkpoint at the same step and exit 0.
- A full disk on one process only (its checkpoint writer raises ENOSPC, injected by
  tests/faulty_main.py): the save of that step fails on both (the other's in the save's
  collective), both stop with exit 1, the other's message quoting the full disk, and the
  earlier checkpoint is intact (resuming from it: the lost-process test above).
"""

import os
import signal
import time

import pytest
import train_helpers as th

pytestmark = pytest.mark.slow  # every test here launches two vdm.main processes

LONG = dict(
    train__num_steps=100_000,  # never reached: the test stops the run
    train__ckpt_every=20,
    train__eval_every=100_000,
    train__write_samples=False,
    distributed__heartbeat_timeout_s=5,
)


FAULTY_MAIN = os.path.join(th.REPO, "tests", "faulty_main.py")
DUMPS = ("Check failure", "*** SIGABRT", "Stack trace", "Fatal Python error")


def stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()


def relaunch_reproduces(run, tmp_path) -> None:
    """Relaunches both processes on `run` (stopped by a fault) a little past the step its
    launch reached: they resume from the last checkpoint and recompute the steps logged after
    it to the same losses, bit for bit."""
    first = th.logged_losses(run)
    ckpt = th.checkpoint_steps(run)[-1]
    redone = [s for s in first if s > ckpt]
    assert redone, "the killed launch logged nothing after its last checkpoint"
    end = max(redone) + 2
    codes, logs = th.run_processes(
        run, *th.overrides(**dict(LONG, train__num_steps=end)), logs_dir=tmp_path
    )
    assert codes == [0, 0], logs
    assert f"Resuming at step {ckpt} on 2 devices / 2 processes" in logs, logs
    second = th.logged_losses(run)
    assert sorted(second) == list(range(1, end + 1))
    for step in redone:  # recomputed after the restore: the same losses, bit for bit
        assert second[step] == first[step], (step, first[step], second[step])


def test_lost_process_stops_the_survivor_with_one_message_and_relaunch_resumes(tmp_path):
    run = tmp_path / "run"
    procs = th.spawn_processes(run, *th.overrides(**LONG), logs_dir=tmp_path)
    try:
        th.wait_for(lambda: th.logged_past_checkpoint(run), proc=procs[0], interval=0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = procs[0].wait(timeout=120)  # a hang fails here
        stopped_after = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "proc0.log").read_text()
    assert code == 1, log[-3000:]
    assert "process 1 was lost" in log, log[-3000:]
    assert "Last complete checkpoint:" in log and "(step " in log, log[-3000:]
    for dump in DUMPS:
        assert dump not in log, log[-3000:]
    assert stopped_after < 60, stopped_after  # heartbeat 5 s: typically ~6-10 s
    relaunch_reproduces(run, tmp_path)


def test_the_coordinator_lost_stops_the_other_process_with_one_message_and_relaunch_resumes(
    tmp_path,
):
    """jaxlib terminates a process whose coordination service is gone from C++ (a fatal log,
    a stack dump, SIGABRT) and 0.10.2 cannot call a Python handler instead; the supervising
    parent of each process (vdm/run/supervisor.py) turns that into our one message. Killing
    process 0's parent also proves the job dies with its parent (else nothing would be lost)."""
    run = tmp_path / "run"
    procs = th.spawn_processes(run, *th.overrides(**LONG), logs_dir=tmp_path)
    try:
        th.wait_for(lambda: th.logged_past_checkpoint(run), proc=procs[1], interval=0.05)
        procs[0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = procs[1].wait(timeout=120)
        stopped_after = time.time() - killed_at
    finally:
        stop_all(procs)
    log = (tmp_path / "proc1.log").read_text()
    assert code == 1, log[-3000:]
    assert stopped_after < 30, stopped_after
    assert "vdm.main: error: Process 1 of 2 lost the coordination service: process 0" in log
    assert "Last complete checkpoint:" in log and "(step " in log, log[-3000:]
    for dump in DUMPS:
        assert dump not in log, log[-3000:]
    relaunch_reproduces(run, tmp_path)


# One process of two told; or a preempted pod of four, every process told at its own moment
# (process 0, which hosts the coordination service, neither first nor last).
@pytest.mark.parametrize(("num", "order"), [(2, [1]), (4, [3, 0, 2, 1])], ids=["one", "pod"])
def test_sigterm_checkpoints_every_process_at_one_step_and_exits_0(tmp_path, num, order):
    run = tmp_path / "run"
    procs = th.spawn_processes(run, *th.overrides(**LONG), logs_dir=tmp_path, num=num)
    try:
        th.wait_for(lambda: th.checkpoint_steps(run), proc=procs[0], interval=0.05)
        for k, i in enumerate(order):
            if k:
                time.sleep(0.3)
            procs[i].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        stop_all(procs)
    logs = "\n".join((tmp_path / f"proc{i}.log").read_text()[-3000:] for i in range(num))
    assert codes == [0] * num, logs
    steps = th.checkpoint_steps(run)
    last = th.logged_losses(run)
    # The preemption checkpoint is at the step both processes stopped at (the last logged).
    assert steps[-1] == max(last), (steps, max(last))
    for i in range(num):  # each process reports that one checkpoint, however late it was told
        text = (tmp_path / f"proc{i}.log").read_text()
        assert f"Preempted: saved {run / 'checkpoints' / str(steps[-1])};" in text, (i, logs)
    assert not (run / "DONE").exists()
    for dump in DUMPS:
        assert dump not in logs, logs


def test_a_full_disk_on_one_process_stops_both_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    flags = th.overrides(**LONG)
    full = dict(th.env_for(), VDM_TEST_SAVES_BEFORE_ENOSPC="1")  # process 1: only save 1 works
    # python tests/faulty_main.py instead of python -m vdm.main (the same run without the env).
    procs = th.spawn_processes(
        run, *flags, logs_dir=tmp_path, envs=(th.env_for(), full), entry=(FAULTY_MAIN,)
    )
    try:
        codes = [p.wait(timeout=180) for p in procs]  # a hang fails here
    finally:
        stop_all(procs)
    logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(2)]
    assert codes == [1, 1], [x[-3000:] for x in logs]
    saved = th.checkpoint_steps(run)
    assert saved == [LONG["train__ckpt_every"]], saved  # the first save; the failed one absent
    assert "No space left on device" in logs[1], logs[1][-3000:]
    # Process 0 names process 1 and quotes its reason.
    assert "process 1" in logs[0] and "No space left on device" in logs[0], logs[0][-3000:]
    assert f"(step {saved[0]})" in logs[0], logs[0][-3000:]
    for dump in DUMPS:
        assert dump not in logs[0] and dump not in logs[1], logs
