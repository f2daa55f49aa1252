"""A light parent for each process of a multi-process run, so that losing the coordinator ends
the survivors with one readable message instead of jaxlib's fatal log and stack dump.

When process 0 (which hosts JAX's coordination service) dies, jaxlib's client in every other
process notices at once and terminates it from C++: a fatal log line, a stack trace, SIGABRT.
jaxlib 0.10.2 takes a Python `missed_heartbeat_callback` but aborts with std::bad_cast when it
calls it, so nothing inside the process can replace that exit (vdm/distributed.py handles
every other lost process there). The one place left is outside: with several processes,
`python -m vdm.main` runs the same command as a child and stays as a small parent that

- passes the child's stdout through untouched and its stderr line by line, until jaxlib's
  fatal line; that line and the stack dump after it are held back, and once the child has
  died the parent prints one `vdm.main: error:` line naming the lost coordinator and the last
  complete checkpoint (read from the workdir, no JAX here) and exits 1;
- forwards SIGTERM and SIGINT to the child (a pod's preemption notice reaches the job), and
  otherwise exits as the child did (its status, or the same signal);
- makes the child die with it (Linux PR_SET_PDEATHSIG): `kill -9` of a launched process kills
  the whole process, as the fault tests and a cluster scheduler expect.

Not used for a single process, under --verbose (jaxlib's own report is then shown as it is), or
with VDM_SUPERVISE=0. This module imports nothing heavy: the parent never starts JAX.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

from vdm.run import checkpoint_files

CHILD_MARK = "VDM_SUPERVISED"  # set in the child's environment: it must not supervise again
# jaxlib's fatal line when its coordination client fails, and the cause when process 0 is gone.
FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
LEADER_LOST = "leader task was preempted/died"
FORWARDED = (signal.SIGTERM, signal.SIGINT)
VERBOSE_ARGS = ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")  # vdm.main's too
_PR_SET_PDEATHSIG = 1


def flag_value(argv: list[str], name: str, default: str | None = None) -> str | None:
    """The value of absl flag `--name` in `argv` (`--name=V` or `--name V`; last one wins)."""
    value = default
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def wanted(argv: list[str], environ) -> bool:
    """Whether this `python -m vdm.main` (args `argv`) should run its job as a child."""
    if environ.get(CHILD_MARK) or environ.get("VDM_SUPERVISE", "1") == "0":
        return False
    if any(a in VERBOSE_ARGS for a in argv):
        return False
    num = flag_value(argv, "num_processes", environ.get("VDM_NUM_PROCESSES", "1"))
    try:
        return int(num) > 1
    except (TypeError, ValueError):
        return False  # vdm.main reports the bad value itself


def lost_coordinator_message(fatal: str, argv: list[str], environ) -> str:
    """The one error line for a child that jaxlib terminated because its service failed."""
    me = flag_value(argv, "process_id", environ.get("VDM_PROCESS_ID", "0"))
    num = flag_value(argv, "num_processes", environ.get("VDM_NUM_PROCESSES", "?"))
    if LEADER_LOST in fatal:
        what = (
            f"Process {me} of {num} lost the coordination service: process 0 (the coordinator) "
            "was lost (killed, crashed, or its host went down)"
        )
    else:
        status = fatal.split("absl::Status:", 1)[-1].strip()
        what = f"Process {me} of {num} stopped: the coordination service failed ({status})"
    workdir = flag_value(argv, "workdir")
    where = (
        checkpoint_files.describe_latest(os.path.join(workdir, "checkpoints")) if workdir else ""
    )
    return f"{what}. {where} Relaunch all processes with the same command to resume."


def _die_with_parent(parent: int) -> None:
    """In the forked child, before exec: SIGKILL when the parent dies (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: the child may outlive a killed parent
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run(command: list[str], argv: list[str], environ) -> int:
    """Runs `command` as the supervised child; returns the exit status for this process
    (after re-raising on itself a signal that killed the child for another reason)."""
    parent = os.getpid()
    child = subprocess.Popen(
        command,
        env={**environ, CHILD_MARK: "1"},
        stderr=subprocess.PIPE,
        preexec_fn=lambda: _die_with_parent(parent),  # noqa: PLW1509 - no threads here yet
    )
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _frame: child.send_signal(s))
    fatal = None
    out = sys.stderr.buffer
    for line in iter(child.stderr.readline, b""):
        if fatal is None and FATAL in line:
            fatal = line.decode(errors="replace")
        if fatal is None:  # held back from the fatal line on: the stack dump follows it
            out.write(line)
            out.flush()
    code = child.wait()
    if fatal is not None and code != 0:
        sys.stderr.write(f"vdm.main: error: {lost_coordinator_message(fatal, argv, environ)}\n")
        sys.stderr.write("(--verbose shows jaxlib's own report)\n")
        return 1
    if code < 0:  # killed by a signal: end the same way, for the launcher to see
        sys.stderr.flush()
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP keep theirs
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def maybe_supervise() -> None:
    """Called by `python -m vdm.main` before anything else: with several processes, runs this
    same command as a supervised child and exits with its outcome; otherwise returns."""
    argv = sys.argv[1:]
    if wanted(argv, os.environ):
        sys.exit(run([sys.executable, *sys.orig_argv[1:]], argv, os.environ))
