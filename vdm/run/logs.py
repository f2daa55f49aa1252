"""Run records: metrics.jsonl (written through vdm/run/writers.py, read by the sweep tool), the
run clock, the config record and the DONE marker.

Only process 0 writes files. `metrics.jsonl` holds one JSON object per line with "step",
"wall_time" (seconds of run time since the run began, carried across restarts through the
checkpoint) and the metric values; on resume, lines past the restored step are dropped so a
relaunched run does not log the same step twice. `DONE` is written last, as
{"step": int, "wall_time": float}.
"""

import json
import logging as logging_std
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


_NOISY_LIBRARIES = ("orbax", "jax", "tensorflow_datasets")


def quiet_library_logs() -> None:
    """Keeps orbax/jax INFO lines out of the run log (warnings and errors still show)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


class RunClock:
    """Seconds of run time, continuing across restarts from the checkpointed elapsed time."""

    def __init__(self, elapsed: float = 0.0):
        self._start = time.time() - elapsed

    def wall_time(self) -> float:
        """Seconds of run time so far (including earlier segments of a resumed run)."""
        return time.time() - self._start


def to_floats(metrics: dict) -> dict:
    """Device or numpy scalars -> Python floats."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def truncate_after(path, step: int) -> None:
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


def config_changes(workdir, config) -> list[str]:
    """'key: old -> new' for every setting that differs from the workdir's config.json (a
    resumed run may change settings that leave the state's shapes alone: learning rate, eval
    cadence, sampler, ...; the restore refuses the others). Empty without a config.json."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return []
    old = _flat(json.loads(path.read_text()))
    new = _flat(json.loads(config.to_json_best_effort()))
    old.pop("dataset", None)
    return [
        f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith("dataset.")
    ]


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_config(workdir, config, *, dataset: dict | None = None) -> None:
    """Saves the resolved config as workdir/config.json (process 0 only).

    Args:
      workdir: run directory.
      config: the run's config.
      dataset: facts inferred from the data (shape, vocabulary, classes, source details),
        recorded under "dataset" so a run on one's own files says what it trained on.
    """
    if jax.process_index() == 0:
        record = json.loads(config.to_json_best_effort())
        if dataset is not None:
            record["dataset"] = dataset
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def read_metrics(workdir) -> list[dict]:
    """Reads metrics.jsonl back (for tests and tools)."""
    path = epath.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
