"""Run logs through clu's metric writers: metrics.jsonl (read by the sweep tool), absl log
lines and TensorBoard events; plus the config record and the DONE marker.

Only process 0 writes files. `metrics.jsonl` holds one JSON object per line with "step",
"wall_time" (seconds of run time since the run began, carried across restarts through the
checkpoint) and the metric values; on resume, lines past the restored step are dropped so a
relaunched run does not log the same step twice. `DONE` is written last, as
{"step": int, "wall_time": float}.
"""

import json
import logging as logging_std
import math
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers
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


class JsonlWriter(metric_writers.interface.MetricWriter):
    """A clu MetricWriter appending scalars to metrics.jsonl (clu has no JSON-lines writer).

    Each write_scalars call is one line {"step", "wall_time", name: value, ...}; non-finite
    values are written as strings ("nan"). Images, texts and the rest are not recorded here.

    Args:
      path: the metrics.jsonl path.
      clock: the run's RunClock (wall time carried across restarts).
      resume_step: the step training resumes from (later lines are dropped), or None for a
        fresh run (an existing file is replaced).
    """

    def __init__(self, path, clock: "RunClock", resume_step: int | None):
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            _truncate_after(path, resume_step)
        elif resume_step is None and path.exists():
            path.unlink()  # a fresh run in a reused workdir starts a fresh log
        self._clock = clock
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the run

    def write_scalars(self, step: int, scalars) -> None:
        record = {"step": int(step), "wall_time": self._clock.wall_time()}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            record[k] = v if math.isfinite(v) else str(v)
        self._file.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def write_hparams(self, hparams) -> None:
        del hparams

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RunClock:
    """Seconds of run time, continuing across restarts from the checkpointed elapsed time."""

    def __init__(self, elapsed: float = 0.0):
        self._start = time.time() - elapsed

    def wall_time(self) -> float:
        """Seconds of run time so far (including earlier segments of a resumed run)."""
        return time.time() - self._start


def create_writer(
    workdir, clock: RunClock, *, resume_step: int | None, tensorboard: bool = True
) -> metric_writers.MetricWriter:
    """The run's metric writer: JSONL + absl log lines + TensorBoard, on process 0 only.

    Args:
      workdir: run directory (metrics.jsonl and TensorBoard events go there).
      clock: the run's RunClock.
      resume_step: the step resumed from (None for a fresh run).
      tensorboard: also write TensorBoard summaries (clu's asynchronous SummaryWriter).

    Returns:
      A clu MetricWriter (a writer of nothing on other processes).
    """
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    writers = [
        JsonlWriter(epath.Path(workdir) / METRICS_FILE, clock, resume_step),
        metric_writers.LoggingWriter(),
    ]
    if tensorboard:
        writers.append(metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir))))
    return metric_writers.MultiWriter(writers)


def to_floats(metrics: dict) -> dict:
    """Device or numpy scalars -> Python floats."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


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
