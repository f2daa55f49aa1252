"""Test bits/dim with and without the base measure (model.base_measure) on a short training run.

Run from the repository root (about ten minutes on a 2-core CPU with the defaults):

  python -m experiments.base_measure
  python -m experiments.base_measure --steps=400 --evals=2 --seeds=1,2

For each seed and each setting of model.base_measure it trains --config (default the embedded
digits config) for --steps steps, evaluating the full test split's ELBO bits/dim --evals times
at equal intervals, with every other setting, the seed and the batches identical. Both runs of a
seed share the initial parameters (the base measure adds none) and the eval draws, so the
columns differ only by the network's output form. Each eval point is reported twice: with the
EMA parameters (what the run itself evaluates; early on they are still close to the
initialisation, where the two output forms differ most) and with the raw trained parameters,
evaluated afterwards from the checkpoint of that step. It prints a table and writes
experiments/results/base_measure.json (every figure with the environment) and base_measure.md.
"""

import datetime
import json
import os
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments.bench.runs import machine
from vdm import runtime
from vdm.run import logs
from vdm.run.evaluate import evaluate
from vdm.run.loop import train
from vdm.run.setup import build_run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "digits.py"), "Config file[:arg] to train."
)
flags.DEFINE_integer("steps", 1000, "Training steps per run.")
flags.DEFINE_integer("evals", 4, "Eval points per run, at equal intervals (the last at --steps).")
flags.DEFINE_list("seeds", ["1"], "Seeds; each is trained with and without the base measure.")
flags.DEFINE_string("workdir", None, "Parent of the run directories (default: a temp dir).")
flags.DEFINE_string("out", os.path.join(HERE, "results", "base_measure"), "Output path stem.")
FLAGS = flags.FLAGS


def train_one(seed: int, base_measure: bool, workdir: str) -> dict:
    """Trains one run.

    Returns:
      {'ema': {step: bits/dim}, 'raw': {step: bits/dim}, 'wall_s': training seconds}.
    """
    config = FLAGS.config
    with config.unlocked():
        config.seed = seed
        config.model.base_measure = base_measure
        config.train.num_steps = FLAGS.steps
        config.train.eval_every = max(FLAGS.steps // FLAGS.evals, 1)
        config.train.log_every = config.train.eval_every
        config.train.ckpt_every = FLAGS.steps
        config.train.keep_ckpts = FLAGS.evals + 1  # every eval point, for the raw evaluation
        config.train.write_samples = False  # the figure is bits/dim; sampling costs minutes
    run = build_run(config)
    start = time.perf_counter()
    train(run, workdir, tensorboard=False)
    wall = time.perf_counter() - start
    ema = {
        int(r["step"]): float(r["eval/bpd"]) for r in logs.read_metrics(workdir) if "eval/bpd" in r
    }
    raw = {}
    ckpts = run.checkpoints(workdir)
    try:
        for step in sorted(ema):
            state, _, _ = ckpts.restore(run.abstract_state, step)
            raw[step] = float(evaluate(run, state.params)["eval/bpd"])
    finally:
        ckpts.close()
    return {"ema": ema, "raw": raw, "wall_s": wall}


def to_markdown(record: dict) -> str:
    """The results table: one row per eval step, a column per (seed, setting), the difference."""
    lines = [
        "# Base measure: test bits/dim with and without",
        "",
        f"{record['date']}; {record['machine']}; jax {record['jax']}. Config "
        f"`{record['config']}`, {record['steps']} steps, full test split ELBO (eval/bpd).",
        "",
        f"Command: `{record['command']}`",
        "",
        "| seed | params | step | base_measure=False | base_measure=True | True - False |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for seed, runs in record["runs"].items():
        for kind in ("ema", "raw"):
            off, on = runs["False"][kind], runs["True"][kind]
            for step in sorted(off, key=int):
                a, b = off[step], on[step]
                lines.append(f"| {seed} | {kind} | {step} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    lines.append("")
    for seed, runs in record["runs"].items():
        lines.append(
            f"Seed {seed} wall time: off {runs['False']['wall_s']:.0f} s, "
            f"on {runs['True']['wall_s']:.0f} s."
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logs.quiet_library_logs()
    parent = FLAGS.workdir or tempfile.mkdtemp(prefix="base_measure_")
    runs = {}
    for seed in (int(s) for s in FLAGS.seeds):
        runs[str(seed)] = {}
        for on in (False, True):
            workdir = os.path.join(parent, f"seed{seed}_bm{int(on)}")
            result = train_one(seed, on, workdir)
            runs[str(seed)][str(on)] = {
                kind: {str(k): v for k, v in result[kind].items()} for kind in ("ema", "raw")
            }
            runs[str(seed)][str(on)]["wall_s"] = result["wall_s"]
            print(f"seed {seed} base_measure={on}: {result} ")
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "jax": jax.__version__,
        "config": os.path.relpath(config_flags.get_config_filename(FLAGS["config"]), REPO),
        "steps": FLAGS.steps,
        "command": "python -m experiments.base_measure "
        f"--steps={FLAGS.steps} --evals={FLAGS.evals} --seeds={','.join(FLAGS.seeds)}",
        "runs": runs,
    }
    table = to_markdown(record)
    print(table)
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(table)


if __name__ == "__main__":
    runtime.setup()  # tcmalloc and XLA:CPU flags, as `python -m vdm.main` runs
    app.run(main)
