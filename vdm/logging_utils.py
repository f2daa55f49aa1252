"""Run logs: metrics.jsonl (read by the sweep tool), TensorBoard via clu, progress lines, DONE.

Only process 0 writes files. `metrics.jsonl` holds one JSON object per line with "step",
"wall_time" (seconds of run time since the run began, carried across restarts through the
checkpoint) and the metric values; on resume, lines past the restored step are dropped so a
relaunched run does not log the same step twice. `DONE` is written last, as
{"step": int, "wall_time": float}.
"""

import json
import logging as logging_std
import math
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"
DONE_FILE = "DONE"


class _QuietLibraries(logging_std.Filter):
    """Drops INFO chatter from libraries (orbax logs several lines per save)."""

    def filter(self, record) -> bool:
        noisy = any(f"/{name}/" in record.pathname for name in _NOISY_LIBRARIES)
        return record.levelno >= logging_std.WARNING or not noisy


_NOISY_LIBRARIES = ("orbax", "jax")


def quiet_library_logs() -> None:
    """Keeps orbax/jax INFO lines out of the run log (warnings and errors still show)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


def _tensorboard_writer(logdir: str):
    """clu's asynchronous TensorBoard writer, or None when clu/tensorboard cannot load."""
    try:
        from clu import metric_writers  # imports TensorFlow: slow, so only when asked
    except ImportError as e:
        logging.warning("TensorBoard logging disabled (%s); metrics.jsonl is still written.", e)
        return None
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


def _to_float(value) -> float:
    return float(np.asarray(value))


class MetricLogger:
    """Writes scalar metrics to metrics.jsonl and TensorBoard (process 0 only).

    Args:
      workdir: run directory.
      elapsed: run time already spent before this process started (from the checkpoint).
      resume_step: the step training resumes from; later lines in metrics.jsonl are dropped.
      tensorboard: also write TensorBoard summaries through clu.
    """

    def __init__(
        self,
        workdir,
        *,
        elapsed: float = 0.0,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.workdir = epath.Path(workdir)
        self.primary = jax.process_index() == 0
        self._start = time.time() - elapsed
        self._tb = None
        self._file = None
        if not self.primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        if resume_step is not None and path.exists():
            _truncate_after(path, resume_step)
        elif resume_step is None and path.exists():
            path.unlink()  # a fresh run in a reused workdir starts a fresh log
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the run
        if tensorboard:
            self._tb = _tensorboard_writer(os.fspath(self.workdir))

    def wall_time(self) -> float:
        """Seconds of run time so far (including earlier segments of a resumed run)."""
        return time.time() - self._start

    def write(self, step: int, metrics: dict) -> dict:
        """Logs scalars at `step`; returns them as Python floats."""
        values = {k: _to_float(v) for k, v in metrics.items()}
        if self.primary:
            record = {"step": int(step), "wall_time": self.wall_time()}
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self._tb is not None:
                self._tb.write_scalars(int(step), values)
        return values

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Sends an [H, W, C] uint8 image to TensorBoard (if enabled)."""
        if self.primary and self._tb is not None:
            self._tb.write_images(int(step), {name: np.asarray(image)[None]})

    def close(self) -> None:
        """Flushes and closes the writers."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _truncate_after(path, step: int) -> None:
    """Keeps the lines of a JSONL log whose step is <= `step` (drops torn lines too)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if int(record.get("step", -1)) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def write_done(workdir, step: int, wall_time: float) -> None:
    """Marks a completed run (process 0 only)."""
    if jax.process_index() == 0:
        record = {"step": int(step), "wall_time": float(wall_time)}
        (epath.Path(workdir) / DONE_FILE).write_text(json.dumps(record) + "\n")


def is_done(workdir) -> bool:
    """Whether the run in `workdir` completed (its DONE file exists)."""
    return (epath.Path(workdir) / DONE_FILE).exists()


def clear_done(workdir) -> None:
    """Removes a DONE marker before training continues (process 0 only)."""
    path = epath.Path(workdir) / DONE_FILE
    if jax.process_index() == 0 and path.exists():
        path.unlink()


def write_config(workdir, config) -> None:
    """Saves the resolved config as workdir/config.json (process 0 only)."""
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))


def read_metrics(workdir) -> list[dict]:
    """Reads metrics.jsonl back (for tests and tools)."""
    path = epath.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """Throughput and ETA between log steps.

    Args:
      total_steps: the run's final step.
      batch_size: global examples per step.
      start_step: the step this process started from.
    """

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total = total_steps
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = time.time()
        self._paused = 0.0
        self._first = True

    def pause(self, seconds: float) -> None:
        """Excludes time spent on eval/checkpoints from the throughput."""
        self._paused += seconds

    def line(self, step: int, loss: float) -> str:
        """A one-line summary for the log; resets the measurement window."""
        now = time.time()
        dt = max(now - self._last_time - self._paused, 1e-9)
        rate = (step - self._last_step) / dt
        self._last_step, self._last_time, self._paused = step, now, 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        note = " (incl. compilation)" if self._first else ""
        self._first = False
        return (
            f"step {step}/{self.total} | loss {loss:.4f} | {rate:.2f} steps/s | "
            f"{rate * self.batch_size:.0f} images/s | ETA {_format_seconds(eta)}{note}"
        )


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
