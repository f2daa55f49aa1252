"""Joining a multi-process run, and stopping all of it together when one process fails.

JAX's coordination service (started by `jax.distributed.initialize` on process 0) watches
every process through heartbeats. Left to itself, a survivor of a lost process either blocks
in the next collective or, once the service notices the silence, is terminated by a C++ fatal
log with a stack dump; at exit it also waits in a shutdown barrier that the lost process never
reaches. This module replaces that with one readable error on every process:

- `initialize` sets the heartbeat and shutdown timeouts (config `distributed.*`), turns on
  recoverable mode (the service then does not abort every process when one is lost) and starts
  a watcher thread that polls the service's live processes and ends this process with a
  message naming the lost one(s). Losing process 0 itself is the exception: jaxlib aborts the
  survivors from C++ before any Python runs, and vdm/run/supervisor.py (the parent process of each
  multi-process job) turns that into the same kind of message.
- `fail_together()` wraps a job: a process whose job raises publishes its reason in the
  service's key-value store (so the others' messages can quote it) and exits at once,
  skipping the shutdown barrier; one whose job raised a JAX runtime error (a collective that
  failed because a peer went away) first waits for the service's verdict so that its message
  can name the lost process.
- `set_context(fn)` lets the training loop add a line (the last complete checkpoint) to every
  such message.

Nothing here reads a config: `vdm.main` passes the values.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
from absl import logging

# Exit status of a process stopped because the run as a whole failed (any process's error).
EXIT_FAILED = 1
_REASON_KEY = "vdm/failure/{}"

_context: list[Callable[[], str]] = []
_timeouts = {"heartbeat": 100, "shutdown": 300}
_exiting = threading.Lock()
_finished = threading.Event()  # the job ended everywhere: the watcher stops watching


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    heartbeat_timeout_s: int = 20,
    shutdown_timeout_s: int = 30,
    init_timeout_s: int = 300,
) -> None:
    """Joins a multi-process JAX run when asked to; a no-op for a single process.

    Must run before anything touches a JAX backend.

    Args:
      coordinator_address: 'host:port' of process 0's coordinator, or None/'' to skip.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      heartbeat_timeout_s: seconds without heartbeats after which the coordination service
        declares a process lost (and every other process stops).
      shutdown_timeout_s: seconds a finishing process waits for the others at exit.
      init_timeout_s: seconds to wait for all processes to join.
    """
    if not coordinator_address and not (num_processes and num_processes > 1):
        return
    for name, value in (
        ("heartbeat_timeout_s", heartbeat_timeout_s),
        ("shutdown_timeout_s", shutdown_timeout_s),
        ("init_timeout_s", init_timeout_s),
    ):
        if int(value) < 1:
            raise ValueError(f"distributed.{name}={value} must be a whole number of seconds >= 1.")
    _timeouts.update(heartbeat=int(heartbeat_timeout_s), shutdown=int(shutdown_timeout_s))
    # Recoverable mode stops the service from terminating every process (a C++ fatal log
    # with a stack dump) when one is lost; the watcher below stops them with a message.
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=int(init_timeout_s),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        shutdown_timeout_seconds=int(shutdown_timeout_s),
    )
    threading.Thread(target=_watch, name="vdm-process-watcher", daemon=True).start()
    logging.info("Process %d of %d joined.", jax.process_index(), jax.process_count())


def set_context(describe: Callable[[], str] | None) -> None:
    """Registers a function whose line ends every fault message (None clears it)."""
    _context.clear()
    if describe is not None:
        _context.append(describe)


def publish_failure(summary: str) -> None:
    """Records why this process is failing where the other processes' fault messages can quote
    it (a no-op for a single process; best effort: the service may be gone)."""
    client = _client() if jax.process_count() > 1 else None
    if client is not None:
        with contextlib.suppress(Exception):
            client.key_value_set(_REASON_KEY.format(jax.process_index()), summary[:2000])


def peer_failures() -> str:
    """'; process P reported: REASON' for every other process that published why it failed
    (empty for a single process, or when none did)."""
    client = _client() if jax.process_count() > 1 else None
    if client is None:
        return ""
    others = [p for p in range(jax.process_count()) if p != jax.process_index()]
    return "".join(f"; process {p} reported: {r}" for p in others if (r := _reason(client, p)))


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _lost_processes(client) -> list[int] | None:
    """Processes the service no longer sees, or None when the service itself is unreachable."""
    try:
        live = client.get_live_nodes(list(range(jax.process_count())))
    except Exception:  # noqa: BLE001 - the coordinator (process 0) is gone
        return None
    return sorted(set(range(jax.process_count())) - set(live))


def _reason(client, process: int) -> str | None:
    try:
        return client.key_value_try_get(_REASON_KEY.format(process))
    except Exception:  # noqa: BLE001 - nothing published, or the service is gone
        return None


def _context_line() -> str:
    lines = []
    for describe in _context:
        try:
            lines.append(describe())
        except Exception as e:  # noqa: BLE001 - a message must still go out
            lines.append(f"(could not list checkpoints: {e!r})")
    return " ".join(lines)


def _exit(message: str) -> None:
    """Logs `message` as the one error of this process and exits now, skipping the
    shutdown barrier (which would wait for processes that will never arrive)."""
    if not _exiting.acquire(blocking=False):
        time.sleep(3600)  # another thread is already exiting this process
    logging.error("%s", message)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FAILED)


def fault_message(lost: list[int] | None, reasons: dict[int, str]) -> str:
    """The readable error for a run that lost processes (None: the coordinator is gone)."""
    n, me = jax.process_count(), jax.process_index()
    if lost is None:
        what = (
            f"Process {me} of {n} lost the coordination service: process 0 (the coordinator) "
            "was lost (killed, crashed, or its host went down)"
        )
    else:
        names = ", ".join(str(p) for p in lost) or "?"
        what = (
            f"Process {me} of {n} is stopping: process {names} was lost (it stopped sending "
            f"heartbeats for {_timeouts['heartbeat']} s: killed, crashed, or its host went down)"
        )
    for process, reason in sorted(reasons.items()):
        what += f"; process {process} reported: {reason}"
    return f"{what}. {_context_line()} Relaunch all processes with the same command to resume."


def _watch(interval_s: float = 1.0) -> None:
    """Background thread: polls the service's list of live processes and stops this process
    with `fault_message` once one is lost (or the service itself is unreachable). It runs
    even while the main thread is blocked in a collective that will never complete."""
    client = _client()
    while not _finished.wait(interval_s):
        lost = _lost_processes(client)
        if (lost is None or lost) and not _finished.is_set():
            reasons = {p: r for p in lost or () if (r := _reason(client, p))}
            _exit(fault_message(lost, reasons))


@contextlib.contextmanager
def fail_together():
    """Makes a failure of this process's job stop every process promptly (see module doc).

    A no-op for a single process.
    """
    try:
        yield
        if jax.process_count() > 1:
            # The job is done: a SIGTERM now (a pod's late preemption notice) has nothing left
            # to save and must not turn this exit into a death by signal.
            _ignore_sigterm()
            # Recoverable mode leaves out jax's own shutdown barrier, so the processes meet
            # here: process 0 (which hosts the service) must not leave while others work.
            _client().wait_at_barrier("vdm_job_done", _timeouts["shutdown"] * 1000)
            _finished.set()
            _shutdown_in_order()
            _ignore_sigterm()  # jax's preemption notifier restores the default at shutdown
    except SystemExit as e:
        if jax.process_count() == 1 or e.code in (0, None):
            raise
        # The job ended with its one message (vdm.main.fail, which published it): leave now,
        # skipping the shutdown barrier that the other processes, still working, never reach.
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else EXIT_FAILED)
    except BaseException as e:
        if jax.process_count() == 1 or isinstance(e, KeyboardInterrupt):
            raise
        _fail(e)


def _ignore_sigterm() -> None:
    with contextlib.suppress(ValueError):  # not the main thread: nothing to change
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _shutdown_in_order() -> None:
    """Disconnects from the service, process 0 (its host) last: were it to leave first, a
    process still disconnecting would find the service gone and abort with a C++ stack dump
    (seen when SIGTERM reached one process only). Waits at most the shutdown timeout."""
    client, others = _client(), set(range(1, jax.process_count()))
    if jax.process_index() != 0:
        jax.distributed.shutdown()
        return
    deadline = time.time() + _timeouts["shutdown"]
    while time.time() < deadline:
        lost = _lost_processes(client)
        if lost is None or others <= set(lost):  # every other process has disconnected
            break
        time.sleep(0.05)
    jax.distributed.shutdown()


# XLA runtime errors carry a status code in front of their text (and not always the
# JaxRuntimeError type: a collective failing inside jit can surface as a ValueError).
_STATUS_CODES = ("UNKNOWN", "UNAVAILABLE", "INTERNAL", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED")


def _is_runtime_error(error: BaseException) -> bool:
    """Whether `error` came from the XLA runtime (a collective or the coordination service)
    rather than from this process's own code (a failed save, a non-finite loss, ...)."""
    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) or any(
        text.startswith(f"{code}:") for code in _STATUS_CODES
    )


def _fail(error: BaseException) -> None:
    me = jax.process_index()
    summary = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if _is_runtime_error(error):
        # Most likely a collective that failed because a peer went away: the watcher thread
        # names it once the service declares it lost (within the heartbeat timeout).
        wait = _timeouts["heartbeat"] + 5
        logging.warning("%s; waiting up to %d s for the lost process to be named.", summary, wait)
        time.sleep(wait)  # the watcher thread exits the process first if a peer is lost
        _exit(f"Process {me} failed: {summary}. {_context_line()}")
    logging.exception("Process %d failed.", me)
    publish_failure(summary)
    _exit(
        f"Process {me} of {jax.process_count()} failed: {summary}. The other processes stop "
        f"within {_timeouts['heartbeat']} s. {_context_line()} Relaunch all processes with the "
        "same command to resume."
    )
