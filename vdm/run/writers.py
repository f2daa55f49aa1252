"""The run's metric writers, all clu MetricWriters: metrics.jsonl, absl log lines, TensorBoard.

Kept apart from vdm/run/logs.py because importing clu's writers imports TensorFlow: only
training needs them; eval, sample and the sweep tool do not. Even in training TensorFlow is
needed only for TensorBoard, so its import waits for the first SummaryWriter
(vdm/run/deferred_tensorflow.py).
"""

import json
import math

import jax
import numpy as np
from clu import metric_writers
from etils import epath

from vdm.run.logs import METRICS_FILE, RunClock, truncate_after


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

    def __init__(self, path, clock: RunClock, resume_step: int | None):
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            truncate_after(path, resume_step)
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
