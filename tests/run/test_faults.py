"""Faults of multi-process runs, on two localhost processes joined by jax.distributed.

- A process killed with SIGKILL: the survivor stops by itself (the coordination service's
  heartbeat timeout, here 5 s) with one message naming the lost process and the last complete
  checkpoint, and no C++ stack dump; relaunching both processes resumes from that checkpoint
  and recomputes the steps the killed launch had logged after it to the same losses.
- SIGTERM to one process only: both processes agree at the next log step, write one
  checkpoint at the same step and exit 0.
"""

import json
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


def spawn_pair(workdir, logs_dir, *flags, tag=""):
    port = th.free_port()
    return [
        th.spawn_main(
            workdir,
            *flags,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            log=logs_dir / f"proc{i}{tag}.log",
        )  # fmt: skip
        for i in range(2)
    ]


def logged_losses(workdir) -> dict[int, float]:
    """step -> loss of every train record (a later record of a step replaces an earlier)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_lost_process_stops_the_survivor_with_one_message_and_relaunch_resumes(tmp_path):
    run = tmp_path / "run"
    procs = spawn_pair(run, tmp_path, *th.overrides(**LONG))
    try:
        th.wait_for(lambda: th.checkpoint_steps(run), timeout=300, proc=procs[0], interval=0.05)
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
    for dump in ("Check failure", "*** SIGABRT", "Stack trace", "Fatal Python error"):
        assert dump not in log, log[-3000:]
    assert stopped_after < 60, stopped_after  # heartbeat 5 s: typically ~6-10 s
    first = logged_losses(run)
    ckpt = th.checkpoint_steps(run)[-1]
    redone = [s for s in first if s > ckpt]
    assert redone, "the killed launch logged nothing after its last checkpoint"
    # Relaunch both processes to a step a little past what the killed launch reached.
    end = max(redone) + 2
    codes, logs = th.run_processes(
        run, *th.overrides(**dict(LONG, train__num_steps=end)), logs_dir=tmp_path
    )
    assert codes == [0, 0], logs
    assert f"Resuming at step {ckpt} on 2 devices / 2 processes" in logs, logs
    second = logged_losses(run)
    assert sorted(second) == list(range(1, end + 1))
    for step in redone:  # recomputed after the restore: the same losses, bit for bit
        assert second[step] == first[step], (step, first[step], second[step])


def test_sigterm_to_one_process_checkpoints_both_at_one_step_and_exits_0(tmp_path):
    run = tmp_path / "run"
    procs = spawn_pair(run, tmp_path, *th.overrides(**LONG))
    try:
        th.wait_for(lambda: th.checkpoint_steps(run), timeout=300, proc=procs[0], interval=0.05)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"proc{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    steps = th.checkpoint_steps(run)
    last = logged_losses(run)
    # The preemption checkpoint is at the step both processes stopped at (the last logged).
    assert steps[-1] == max(last), (steps, max(last))
    assert not (run / "DONE").exists()
