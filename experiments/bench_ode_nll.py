"""PF-ODE likelihood cost: solver steps and network evaluations against accuracy, integrating
in t, in log-SNR or in EDM's sigma (issue 14, target 2), on a trained workdir.

Why: an ODE bits/dim costs one adaptive solve per batch, and its price is the number of steps
the controller needs at a tolerance. In t the velocity carries gamma'(t), which a learned
schedule makes uneven; in gamma = -log SNR it drops out, and in sigma / alpha (state z / alpha)
the flow of a Gaussian is straight (vdm.sampling.ode.time_change), so the same tolerance may
need fewer steps. This measures them on the same checkpoint, the same examples and the same
Hutchinson probes (one key), so the difference between two rows is the solver's alone.

For each (time variable, rtol = atol): the ode estimator of `--mode=eval`
(vdm.run.evaluate.estimate) over the split, with its bits/dim, solver steps (mean over
batches; one step sequence per batch), network evaluations per example (per step 6 for Tsit5:
7 stages with the last reused; 13 for Dopri8; rejected steps included) and seconds. Accuracy
is the distance to a reference solve (--reference_solver at --reference_tol, in t, same
probes).

  python -m experiments.bench_ode_nll --workdir=runs/digits [--tols=1e-5,1e-4,1e-3]
      [--times=t,log_snr,sigma] [--solvers=tsit5,dopri8] [--max_examples=-1]
      [--config.data.eval_batch_size=64] [--out=experiments/results]

Writes ode_nll.md and ode_nll.json to --out.
"""

import datetime
import json
import os
import platform
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from vdm import runtime
from vdm.run import evaluate
from vdm.run.eval_records import Job
from vdm.run.setup import build_run
from vdm.sampling.ode import EVALS_PER_STEP

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

config_flags.DEFINE_config_file("config", "configs/digits.py", "The workdir's config.")
flags.DEFINE_string("workdir", None, "A trained workdir (its latest checkpoint).", required=True)
flags.DEFINE_list("tols", ["1e-5", "1e-4", "1e-3"], "rtol = atol of each row.")
flags.DEFINE_list(
    "times", ["t", "log_snr"], "ODE time variables (eval.ode.time: t|log_snr|sigma|log_sigma)."
)
flags.DEFINE_list(
    "solvers", ["tsit5"], "Adaptive solvers (eval.ode.solver): tsit5, dopri5, dopri8."
)
# Dopri8 at 1e-5: eighth order, far below Tsit5's error at the same tolerance; tighter
# tolerances run into float32 rounding in the controller's error estimate.
flags.DEFINE_float("reference_tol", 1e-5, "Tolerance of the reference solve (in t).")
flags.DEFINE_string("reference_solver", "dopri8", "Solver of the reference solve.")
flags.DEFINE_string("trace", "hutchinson", "eval.ode.trace: hutchinson | exact.")
flags.DEFINE_integer("max_examples", -1, "Examples of the split (-1: all).")
flags.DEFINE_string("out", RESULTS, "Directory for ode_nll.md and ode_nll.json.")
FLAGS = flags.FLAGS


def solve(run, params, time_var: str, tol: float, max_examples: int, solver="tsit5") -> dict:
    """One ODE pass over the split: bits/dim, steps, NFE per example, seconds."""
    options = dict(run.estimators["ode"], time=time_var, rtol=tol, atol=tol, solver=solver,
                   trace=FLAGS.trace)  # fmt: skip
    job = Job("ode", options, discrete=run.info.vocab_size is not None)
    # Compiles on one example (same padded batch shape, so the same program), untimed.
    evaluate.estimate(run, params, job, max_examples=1)
    start = time.perf_counter()
    fig = evaluate.estimate(run, params, job, max_examples=max_examples)
    seconds = time.perf_counter() - start
    return dict(time=time_var, tol=tol, solver=solver, bpd=fig["bpd"],
                bpd_stderr=fig["bpd_stderr"], steps_mean=fig["num_steps_mean"],
                steps_max=fig["num_steps_max"],
                nfe_per_example=EVALS_PER_STEP[solver] * fig["num_steps_mean"],
                seconds=seconds)  # fmt: skip


def markdown(rows, ref, meta) -> str:
    lines = [
        f"# PF-ODE bits/dim: steps and accuracy by ODE time ({meta['examples']} examples)",
        "",
        f"{meta['date']}, {meta['machine']}, jax {jax.__version__}. Model: {meta['workdir']} "
        f"(step {meta['step']}, EMA). Trace: {meta['trace']} (the same probes in every row). "
        f"Reference: {ref['solver']}, time=t, rtol = atol = {meta['reference_tol']:g}: "
        f"{ref['bpd']:.5f} bits/dim, {ref['steps_mean']:.0f} steps. NFE = network "
        "evaluations per example = solver steps x evaluations per step (Tsit5, Dopri5: 6; "
        "Dopri8: 13), one step sequence per batch.",
        "",
        "| solver | time | rtol = atol | bits/dim | abs. error vs reference | steps | NFE | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['time']} | {r['tol']:g} | {r['bpd']:.5f} | "
                     f"{abs(r['bpd'] - ref['bpd']):.1e} | {r['steps_mean']:.0f} | "
                     f"{r['nfe_per_example']:.0f} | {r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    config = FLAGS.config
    config.eval.estimator = "ode"  # its options: the config's eval.ode.* (dequantisation, ...)
    run = build_run(config)
    state, step = evaluate.restore_latest(run, FLAGS.workdir)
    params = run.eval_params(state)
    n = FLAGS.max_examples
    ref = solve(run, params, "t", FLAGS.reference_tol, n, FLAGS.reference_solver)
    print("reference", ref, flush=True)
    rows = []
    for solver in FLAGS.solvers:
        for tol in (float(t) for t in FLAGS.tols):
            for time_var in FLAGS.times:
                rows.append(solve(run, params, time_var, tol, n, solver))
                print(rows[-1], flush=True)
    size = run.dataset.split_size(run.config.eval.split)
    meta = dict(date=str(datetime.date.today()), machine=f"{platform.machine()} CPU, "
                f"{os.cpu_count()} cores", workdir=FLAGS.workdir, step=int(step),
                trace=FLAGS.trace, reference_tol=FLAGS.reference_tol,
                examples=size if n < 0 else min(n, size))  # fmt: skip
    table = markdown(rows, ref, meta)
    print(table)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "ode_nll.md"), "w") as f:
        f.write(table)
    with open(os.path.join(FLAGS.out, "ode_nll.json"), "w") as f:
        json.dump({"meta": meta, "reference": ref, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    runtime.setup()
    app.run(main)
