"""Helpers shared by the measurement scripts that train short runs and read their eval figures
(experiments/base_measure.py, experiments/objectives.py): the machine's name and one
train-then-read-the-final-eval run.

Kept free of flags, so scripts and tests can call them with any config.
"""

import os
import platform
import subprocess
import time

import ml_collections

from vdm.run import logs
from vdm.run.loop import train
from vdm.run.setup import build_run


def machine() -> str:
    """The CPU model name as lscpu reports it, and the core count."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def train_final_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` for config.train.num_steps steps and reads back its final evaluation.

    The run evaluates itself at its last step (vdm/run/loop.py does so whatever eval_every
    says), with the EMA parameters when config.eval.use_ema, over config.eval.split.

    Args:
      config: the run's config (train.num_steps, eval.* already set).
      workdir: the run directory; must not hold an earlier run's checkpoints, or training
        resumes from them.

    Returns:
      {'step', 'bpd', 'bpd_stderr', 'num_examples', 'wall_s'}: the last eval record's ELBO
      figures and the seconds `train` took (compilation and evaluations included).

    Raises:
      RuntimeError: the run wrote no eval record.
    """
    run = build_run(config)
    start = time.perf_counter()
    train(run, workdir, tensorboard=False)
    wall = time.perf_counter() - start
    evals = [r for r in logs.read_metrics(workdir) if "eval/bpd" in r]
    if not evals:
        raise RuntimeError(f"The run in {workdir} wrote no eval/bpd record to its metrics.")
    last = max(evals, key=lambda r: int(r["step"]))
    return {
        "step": int(last["step"]),
        "bpd": float(last["eval/bpd"]),
        "bpd_stderr": float(last["eval/bpd_stderr"]),
        "num_examples": int(last["eval/num_examples"]),
        "wall_s": wall,
    }
