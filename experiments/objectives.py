"""Test bits/dim of the training-objective variants on a short training run.

Run from the repository root (about three minutes a run on a 2-core CPU with the defaults):

  python -m experiments.objectives
  python -m experiments.objectives --steps=400 --seeds=1,2 --variants=vdm,v_pred

For each seed and each variant (a set of --config overrides on --config, default the embedded
digits config) it trains --steps steps and reads the run's own final evaluation: the ELBO in
bits/dim over the full test split with the EMA parameters, at eval.num_draws=--num_draws (t,
eps) draws per example and uniform evaluation times for every variant, so the figures are the
same estimator of the same bound. Every other setting, the seed and the batches are identical.
It prints a table and writes experiments/results/objectives.json (every figure with the
environment) and objectives.md.

Per run: bits/dim and its standard error, the per-example variance of the estimate (the s.e.
squared times the number of examples: the spread over the test examples of their draw-averaged
ELBO, data spread included), and the wall time of training (compilation and the eval included).
Across seeds: the mean and its standard error, and each variant's difference to `vdm` paired by
seed. With one seed that difference's s.e. is the two eval s.e.s combined: eval noise only, no
seed-to-seed spread, so it understates the uncertainty of a conclusion about the objective.
"""

import datetime
import json
import os
import shutil
from collections.abc import Callable

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments.bench import objectives_report
from experiments.bench.configs import with_overrides
from experiments.bench.runs import machine, train_final_eval
from vdm import runtime
from vdm.run import logs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Each variant: the --config overrides it adds to the config (the VDM paper objective as the
# digits config has it is `vdm`). combo is fixed in advance, not picked after the figures.
VARIANTS = {
    "vdm": {},
    "is_adaptive": {"loss.time.proposal": "adaptive"},
    "v_pred": {"model.parameterization": "v"},
    "base_measure": {"model.base_measure": True},
    "learned_net_variance": {"schedule.type": "learned_net", "schedule.grad": "variance"},
    "combo": {"loss.time.proposal": "adaptive", "model.parameterization": "v"},
    # Kingma & Gao 2023: monotone EDM weighting with their adaptive noise schedule.
    "edm_adaptive": {
        "loss.type": "weighted",
        "loss.weighting": "edm",
        "loss.time.proposal": "adaptive_lambda",
    },
    "v_edm_adaptive": {
        "model.parameterization": "v",
        "loss.type": "weighted",
        "loss.weighting": "edm",
        "loss.time.proposal": "adaptive_lambda",
    },
    # Sahoo et al. 2024 without the auxiliary latent: one learned monotone gamma per sub-pixel.
    "multivariate": {"schedule.type": "multivariate"},
}

config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "digits.py"), "Config file[:arg] to train."
)
flags.DEFINE_integer("steps", 1000, "Training steps per run.")
flags.DEFINE_list("seeds", ["1"], "Seeds; each variant is trained once per seed.")
flags.DEFINE_list("variants", list(VARIANTS), f"Variants to train, of {', '.join(VARIANTS)}.")
flags.DEFINE_bool(
    "use_ema",
    False,
    "eval.use_ema: evaluate the EMA parameters (at optim.ema_rate 0.999 they still carry much of "
    "the initialisation after a short run, which favours forms that start closer to right) "
    "rather than the raw ones.",
)
flags.DEFINE_integer("num_draws", 4, "eval.num_draws: (t, eps) draws per test example.")
flags.DEFINE_string("workdir", "/tmp/objectives", "Parent of the run directories.")
flags.DEFINE_string("out", os.path.join(HERE, "results", "objectives"), "Output path stem.")
flags.DEFINE_bool(
    "reuse",
    False,
    "Keep the runs of an earlier --out .json measured with the same config, "
    "steps, num_draws and variant overrides; train only the missing (variant, seed) runs.",
)
FLAGS = flags.FLAGS


def run_config(
    base: ml_collections.ConfigDict,
    variant: str,
    seed: int,
    steps: int,
    num_draws: int,
    use_ema: bool = False,
) -> ml_collections.ConfigDict:
    """The config of one run: `base` with the variant's overrides and the measurement's settings.

    Raises:
      ValueError: an unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; known: {', '.join(VARIANTS)}.")
    if steps < 1 or num_draws < 1:
        raise ValueError(f"--steps ({steps}) and --num_draws ({num_draws}) must be at least 1.")
    settings = {
        "seed": seed,
        "train.num_steps": steps,
        "train.eval_every": steps,  # one eval, at the end
        "train.log_every": min(base.train.log_every, steps),
        "train.ckpt_every": steps,
        "train.write_samples": False,  # the figure is bits/dim; sampling costs minutes
        "eval.num_draws": num_draws,
        "eval.use_ema": use_ema,
    }
    return with_overrides(base, {**VARIANTS[variant], **settings})


def measure(
    base: ml_collections.ConfigDict,
    variants: list[str],
    seeds: list[int],
    steps: int,
    num_draws: int,
    root: str,
    done: dict | None = None,
    after_each: Callable[[dict], None] | None = None,
    use_ema: bool = False,
) -> dict:
    """Trains every (variant, seed) run under `root` and gathers their final eval figures.

    Runs go seed by seed (every variant at the first seed, then at the next). Each run gets a
    fresh directory root/<variant>/seed<seed> (an earlier one there is removed,
    so no run resumes from an old checkpoint).

    Args:
      base: the config the variants override.
      variants: names from VARIANTS.
      seeds: config.seed of each run.
      steps: training steps per run.
      num_draws: eval.num_draws of the final evaluation.
      root: parent of the run directories.
      done: {variant: {seed: result}} of runs measured earlier in the same setting; those are
        kept, not trained again.
      after_each: called after every trained run with the figures so far (the dict this
        returns, of the runs done), so that an interrupted measurement leaves its record.
      use_ema: evaluate the EMA parameters instead of the raw ones.

    Returns:
      {'runs': {variant: {seed: train_final_eval's dict + 'per_example_var'}},
       'reused': ['<variant>/<seed>' taken from `done`],
       'summary': objectives_report.summarize's dict}.

    Raises:
      ValueError: no variant or no seed, or an unknown variant (before anything trains).
    """
    if not variants or not seeds:
        raise ValueError("Give at least one variant (--variants) and one seed (--seeds).")
    # Seed by seed, so that a measurement stopped early has every variant at its first seeds.
    configs = {
        (v, s): run_config(base, v, s, steps, num_draws, use_ema) for s in seeds for v in variants
    }
    runs, reused = {v: {} for v in variants}, []
    for variant, seed in configs:  # kept runs first, so that every saved record holds them
        if str(seed) in (done or {}).get(variant, {}):
            runs[variant][str(seed)] = done[variant][str(seed)]
            reused.append(f"{variant}/{seed}")
            print(f"{variant} seed {seed}: kept from the earlier record", flush=True)
    for (variant, seed), config in configs.items():
        if f"{variant}/{seed}" in reused:
            continue
        workdir = os.path.join(root, variant, f"seed{seed}")
        shutil.rmtree(workdir, ignore_errors=True)
        result = train_final_eval(config, workdir)
        result["per_example_var"] = result["bpd_stderr"] ** 2 * result["num_examples"]
        runs[variant][str(seed)] = result
        if after_each:
            after_each(_measured(runs, reused))
        print(
            f"{variant} seed {seed}: {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} bits/dim, "
            f"{result['wall_s']:.0f} s",
            flush=True,
        )
    return _measured(runs, reused)


def _measured(runs: dict, reused: list[str]) -> dict:
    """measure's result from the runs so far (variants without a run yet left out)."""
    runs = {v: dict(by_seed) for v, by_seed in runs.items() if by_seed}
    return {"runs": runs, "reused": list(reused), "summary": objectives_report.summarize(runs)}


def earlier_runs(path: str, setting: dict) -> dict:
    """The runs of the record at `path` if it was measured in `setting`, else {}.

    Args:
      path: an earlier --out .json (need not exist).
      setting: {'config', 'steps', 'num_draws', 'variants'} of this measurement; a variant's
        runs are kept only where its overrides are unchanged.
    """
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if any(old.get(k) != setting.get(k) for k in ("config", "steps", "num_draws", "use_ema")):
        print(f"--reuse: {path} was measured in another setting; training everything.")
        return {}
    return {
        v: runs
        for v, runs in old["runs"].items()
        if v in setting["variants"] and old["variants"].get(v) == setting["variants"][v]
    }


def main(argv):
    del argv
    logs.quiet_library_logs()
    seeds = [int(s) for s in FLAGS.seeds]
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"Unknown --variants {unknown}; known: {', '.join(VARIANTS)}.")
    setting = {
        "config": os.path.relpath(config_flags.get_config_filename(FLAGS["config"]), REPO),
        "steps": FLAGS.steps,
        "num_draws": FLAGS.num_draws,
        "use_ema": FLAGS.use_ema,
        "variants": {v: VARIANTS[v] for v in FLAGS.variants},
    }
    done = earlier_runs(FLAGS.out + ".json", setting) if FLAGS.reuse else {}
    total = len(FLAGS.variants) * len(seeds)

    def record_of(measured: dict) -> dict:
        return {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "jax": jax.__version__,
            **setting,
            "seeds": seeds,
            "ema_rate": FLAGS.config.optim.ema_rate,
            "command": "python -m experiments.objectives "
            f"--steps={FLAGS.steps} --seeds={','.join(FLAGS.seeds)} "
            f"--variants={','.join(FLAGS.variants)} --num_draws={FLAGS.num_draws}"
            + ("" if not FLAGS.use_ema else " --use_ema")
            + (" --reuse" if FLAGS.reuse else ""),
            "complete": sum(len(r) for r in measured["runs"].values()) == total,
            **measured,
        }

    def save(measured: dict) -> None:  # the record so far, rewritten after every run
        record = record_of(measured)
        objectives_report.write(record, objectives_report.markdown(record), FLAGS.out)

    measured = measure(FLAGS.config, FLAGS.variants, seeds, FLAGS.steps, FLAGS.num_draws,
                       FLAGS.workdir, done, save, FLAGS.use_ema)  # fmt: skip
    record = record_of(measured)
    table = objectives_report.markdown(record)
    print(table)
    objectives_report.write(record, table, FLAGS.out)


if __name__ == "__main__":
    runtime.setup()  # tcmalloc and XLA:CPU flags, as `python -m vdm.main` runs
    app.run(main)
