"""The multi-process supervisor (vdm/run/supervisor.py) without JAX: when it supervises, what it
passes through or holds back of the child's stderr, the message, and the exit it mirrors.

The child here is a small Python script standing in for a vdm.main process; the real case
(the coordinator killed under two vdm.main processes) is tests/run/test_faults.py.
"""

import signal
import subprocess
import sys
import textwrap

from vdm.run import supervisor

ARGS = ["--config=c.py", "--workdir=W", "--num_processes=2", "--process_id=1"]


def test_supervises_only_several_processes_and_not_twice_or_verbose():
    assert supervisor.wanted(ARGS, {})
    assert not supervisor.wanted(["--num_processes=1"], {})
    assert not supervisor.wanted([], {})
    assert supervisor.wanted([], {"VDM_NUM_PROCESSES": "4"})
    assert supervisor.wanted(["--num_processes", "2"], {})
    assert not supervisor.wanted(["--num_processes=2"], {"VDM_NUM_PROCESSES": "2"} | {
        supervisor.CHILD_MARK: "1"})  # fmt: skip
    assert not supervisor.wanted([*ARGS, "--verbose"], {})
    assert not supervisor.wanted(ARGS, {"VDM_SUPERVISE": "0"})
    assert not supervisor.wanted(["--num_processes=two"], {})  # vdm.main names the bad value


def test_flag_value_takes_both_forms_and_the_last():
    argv = ["--workdir", "A", "--workdir=B", "--x=1"]
    assert supervisor.flag_value(argv, "workdir") == "B"
    assert supervisor.flag_value(["--workdir", "A"], "workdir") == "A"
    assert supervisor.flag_value([], "workdir", "D") == "D"


def test_message_names_the_lost_coordinator_and_the_last_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in ("10", "20", "30.orbax-checkpoint-tmp-5"):  # 30 is not complete
        (ckpts / name).mkdir(parents=True)
    argv = ["--workdir", str(tmp_path), "--num_processes=2", "--process_id=1"]
    fatal = "F... Terminating ... absl::Status: UNAVAILABLE: Either the leader task was "
    fatal += "preempted/died/restarted unexpectedly"
    text = supervisor.lost_coordinator_message(fatal, argv, {})
    assert text.startswith("Process 1 of 2 lost the coordination service: process 0"), text
    assert f"Last complete checkpoint: {ckpts / '20'} (step 20)." in text, text
    other = supervisor.lost_coordinator_message("absl::Status: INTERNAL: boom", argv, {})
    assert "the coordination service failed (INTERNAL: boom)" in other, other
    empty = supervisor.lost_coordinator_message(fatal, ["--workdir=/nonexistent"], {})
    assert "No complete checkpoint in /nonexistent/checkpoints." in empty, empty


def _supervise(tmp_path, child_code: str):
    """Runs `child_code` as the supervised child of a parent Python process."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(child_code))
    parent = (
        "import sys; from vdm.run import supervisor; "
        f"sys.exit(supervisor.run([sys.executable, {str(child)!r}], {ARGS!r}, {{}}))"
    )
    return subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, timeout=60
    )


def test_jaxlibs_fatal_exit_becomes_one_message_and_the_dump_is_held_back(tmp_path):
    done = _supervise(
        tmp_path,
        f"""
        import os, sys
        print("to stdout", flush=True)
        sys.stderr.write("I1203 a log line\\n")
        sys.stderr.write("F1203 client.h:80] {supervisor.FATAL.decode()}. absl::Status: "
                         "UNAVAILABLE: Either the leader task was preempted/died\\n")
        sys.stderr.write("*** Check failure stack trace: ***\\n    @ 0x1 frame\\n")
        sys.stderr.flush()
        os.abort()
    """,
    )
    assert done.returncode == 1, done
    assert done.stdout == "to stdout\n"
    assert "I1203 a log line" in done.stderr
    assert "Check failure" not in done.stderr and "Terminating" not in done.stderr
    assert "vdm.main: error: Process 1 of 2 lost the coordination service" in done.stderr


def test_the_childs_exit_status_and_signal_are_the_parents(tmp_path):
    assert _supervise(tmp_path, "import sys; sys.exit(3)").returncode == 3
    done = _supervise(tmp_path, "import sys; sys.stderr.write('plain error\\n'); sys.exit(1)")
    assert done.returncode == 1 and done.stderr == "plain error\n"
    killed = _supervise(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL


def test_sigterm_to_the_parent_reaches_the_child(tmp_path):
    ready = tmp_path / "ready"
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(f"""
        import pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean preemption stop
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
        sys.exit(5)
    """)
    )
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; from vdm.run import supervisor; "
        f"sys.exit(supervisor.run([sys.executable, {str(child)!r}], [], {{}}))")])  # fmt: skip
    try:
        for _ in range(300):
            if ready.exists():
                break
            subprocess.run(["sleep", "0.1"])
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
    finally:
        parent.kill()


def test_the_parent_never_starts_jax():
    """The parent stays small: importing the supervisor loads no JAX (jaxlib's version module
    aside, which `import vdm` reads for the XLA flags), no orbax and no TensorFlow."""
    code = (
        "import sys, vdm.run.supervisor; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'orbax', 'tensorflow', 'flax') "
        "or m.startswith('jaxlib.') and m != 'jaxlib.version'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done
