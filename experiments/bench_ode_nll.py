"""PF-ODE likelihood cost: solver steps and network evaluations against accuracy, integrating
in t, in log-SNR or in EDM's sigma (issue 14, target 2), on a trained workdir.

Why: an ODE bits/dim costs one adaptive solve per batch, and its price is the number of steps
the controller needs at a tolerance. In t the velocity carries gamma'(t), which a learned
schedule makes uneven; in gamma = -log SNR it drops out, and in sigma / alpha (state z / alpha)
the flow of a Gaussian is straight (vdm.sampling.ode.time_change), so the same tolerance may
need fewer steps. This measures them on the same checkpoint, the same examples and the same
Hutchinson probes (one key), so the difference between two rows is the solver's alone.

For each (time variable, rtol = atol, density_tol): the ode estimator of `--mode=eval` over
the split with evaluate.estimate's keys, with its bits/dim, solver steps (mean over batches;
one step sequence per batch), network evaluations per example (per step 6 for Tsit5: 7 stages
with the last reused; 13 for Dopri8; rejected steps included) and seconds. Accuracy is the
distance to a reference solve (--reference_solver at --reference_tol and
--reference_density_tol, in t, same probes): of the split's mean, and per example, because
per-example errors of both signs cancel in a mean and a lucky cancellation is no accuracy.

The controller bounds the state's error; by default the log-density integral rides on its
steps as a quadrature. --density_tols adds rows whose controller also bounds the log-density's
own error to that many bits/dim (eval.ode.density_tol), so the state's tolerance can be looser.

--rows lists rows one by one instead of the product of the lists, as
solver/time/tol/density_tol/pcoeff/icoeff: pcoeff/icoeff are the step-size controller's
coefficients (eval.ode.pcoeff, eval.ode.icoeff; diffrax's PID controller), 0/1 the classic
integral controller (the product's rows use it) and e.g. 0.3/0.4 a PI controller, which reacts
less to one noisy error estimate.
--reference_json reuses the reference of an earlier run's ode_nll.json (same workdir, examples
and probes; checked) instead of solving it again.

  python -m experiments.bench_ode_nll --workdir=runs/digits [--tols=1e-5,1e-4,1e-3]
      [--times=t,log_snr,sigma] [--solvers=bosh3,tsit5,dopri8] [--density_tols=0,1e-4]
      [--rows=bosh3/t/1e-3/1e-4/0.3/0.4,...] [--reference_json=FILE]
      [--max_examples=-1]
      [--config.data.eval_batch_size=64] [--out=experiments/results] [--name=ode_nll]

Writes <name>.md and <name>.json (--name, default ode_nll) to --out.
"""

import datetime
import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vdm import parallel, runtime
from vdm.core import split_stats
from vdm.estimators import ESTIMATORS
from vdm.run import evaluate
from vdm.run.setup import KeyStream, build_run
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
flags.DEFINE_float(
    "reference_density_tol", 0.0, "eval.ode.density_tol of the reference solve (0: state only)."
)
flags.DEFINE_list(
    "density_tols", ["0"], "eval.ode.density_tol of each row: bits/dim (0: state only)."
)
flags.DEFINE_list(
    "rows", [], "Rows solver/time/tol/density_tol/pcoeff/icoeff (instead of the lists' product)."
)
flags.DEFINE_string("reference_json", None, "Reuse the reference of this earlier ode_nll.json.")
flags.DEFINE_string("trace", "hutchinson", "eval.ode.trace: hutchinson | exact.")
flags.DEFINE_integer("max_examples", -1, "Examples of the split (-1: all).")
flags.DEFINE_string("out", RESULTS, "Directory for the tables.")
flags.DEFINE_string("name", "ode_nll", "The tables' file name: <out>/<name>.md and .json.")
FLAGS = flags.FLAGS


def _per_example(run, fn, max_examples: int):
    """The jitted estimator fn's per-example bits/dim over the split, with the keys of
    vdm.run.evaluate.estimate (batch i, draw d: fold_in(fold_in(EVAL key, i), d)), so its mean
    is the figure `--mode=eval` reports; and the solver steps of every batch. Everything is
    fetched after the last batch (no host sync per batch)."""
    key, out, masks = run.key(KeyStream.EVAL), [], []
    for i, batch in enumerate(run.eval_batches(max_examples)):
        b = parallel.global_batch(batch, run.mesh)
        means, steps = split_stats.draw_average(
            fn, b, jax.random.fold_in(key, i), run.config.eval.num_draws
        )
        out.append((means["bpd"], steps))
        masks.append(np.asarray(batch["mask"]) > 0)
    out = jax.device_get(out)
    bpd = np.concatenate([np.asarray(o[0], np.float64)[m] for o, m in zip(out, masks, strict=True)])
    return bpd, np.asarray([np.mean(o[1]) for o in out])


def row_options(run, time_var: str, tol: float, solver="tsit5", density_tol=0.0, pcoeff=0.0,
                icoeff=1.0) -> dict:  # fmt: skip
    """The ode estimator's options of one row: the config's eval.ode, with the row's solver,
    time, tolerances and controller."""
    return dict(run.estimators["ode"], time=time_var, rtol=tol, atol=tol, solver=solver,
                trace=FLAGS.trace, density_tol=density_tol, pcoeff=pcoeff,
                icoeff=icoeff)  # fmt: skip


def solve(run, params, time_var: str, tol: float, max_examples: int, solver="tsit5",
          density_tol=0.0, pcoeff=0.0, icoeff=1.0) -> dict:  # fmt: skip
    """One ODE pass over the split: bits/dim (and per example), steps, NFE per example, s."""
    options = row_options(run, time_var, tol, solver, density_tol, pcoeff, icoeff)
    estimate = evaluate.estimator_fn(run.model, "ode", tuple(sorted(options.items())),
                                     parallel.batch_sharding(run.mesh))  # fmt: skip
    fn = lambda b, k: estimate(params, b, k, None)  # noqa: E731
    # Compiles on one example (same padded batch shape, so the same program), untimed.
    _per_example(run, fn, 1)
    start = time.perf_counter()
    bpd, steps = _per_example(run, fn, max_examples)
    seconds = time.perf_counter() - start
    return dict(time=time_var, tol=tol, solver=solver, density_tol=density_tol,
                pcoeff=pcoeff, icoeff=icoeff,
                bpd=float(bpd.mean()), bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd))),
                steps_mean=float(steps.mean()), steps_max=float(steps.max()),
                nfe_per_example=EVALS_PER_STEP[solver] * float(steps.mean()),
                seconds=seconds, per_example=bpd.tolist())  # fmt: skip


def with_errors(row: dict, ref: dict) -> dict:
    """The row's error against the reference: of the split's mean, and per example (mean and
    max of |bpd - reference bpd|: per-example errors of both signs cancel in the mean)."""
    diff = np.asarray(row["per_example"]) - np.asarray(ref["per_example"])
    return dict(row, error=float(abs(diff.mean())), example_mae=float(np.abs(diff).mean()),
                example_max_error=float(np.abs(diff).max()))  # fmt: skip


def markdown(rows, ref, meta) -> str:
    lines = [
        f"# PF-ODE bits/dim: steps and accuracy by ODE time ({meta['examples']} examples)",
        "",
        f"{meta['date']}, {meta['machine']}, jax {jax.__version__}. Model: {meta['workdir']} "
        f"(step {meta['step']}, EMA). Trace: {meta['trace']} (the same probes in every row). "
        f"Reference: {ref['solver']}, time=t, rtol = atol = {meta['reference_tol']:g}, "
        f"density_tol {ref['density_tol']:g}: "
        f"{ref['bpd']:.5f} bits/dim, {ref['steps_mean']:.0f} steps. NFE = network "
        "evaluations per example = solver steps x evaluations per step (Bosh3: 3; Tsit5, "
        "Dopri5: 6; Dopri8: 13), rejected steps included, one step sequence per batch. "
        "density_tol: the controller's bound on the log-density integral's own error in "
        "bits/dim (0: the state's error only). PID: the step-size controller's pcoeff/icoeff "
        "(0/1: integral).",
        "",
        "Errors against the reference: of the split's mean bits/dim, and per example (mean and "
        "max over examples of |bits/dim - reference|).",
        "",
        "| solver | time | rtol = atol | density_tol | PID | bits/dim | error of the mean "
        "| per-example mean error | per-example max error | steps | NFE | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['time']} | {r['tol']:g} | {r['density_tol']:g} | "
                     f"{r['pcoeff']:g}/{r['icoeff']:g} | "
                     f"{r['bpd']:.5f} | {r['error']:.1e} | {r['example_mae']:.1e} | "
                     f"{r['example_max_error']:.1e} | {r['steps_mean']:.0f} | "
                     f"{r['nfe_per_example']:.0f} | {r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def row_specs() -> list[tuple]:
    """(solver, time, tol, density_tol, pcoeff, icoeff) of each row: --rows as given, else the
    product of --solvers, --tols, --times and --density_tols (integral controller, 0/1)."""
    if FLAGS.rows:
        specs = []
        for text in FLAGS.rows:
            parts = text.split("/")
            if len(parts) != 6:
                raise app.UsageError(
                    f"--rows entry {text!r}: use solver/time/tol/density_tol/pcoeff/icoeff."
                )
            specs.append((parts[0], parts[1], *(float(p) for p in parts[2:])))
        return specs
    return [(solver, time_var, float(tol), float(dtol), 0.0, 1.0)
            for solver in FLAGS.solvers for tol in FLAGS.tols for time_var in FLAGS.times
            for dtol in FLAGS.density_tols]  # fmt: skip


def reference_from(path: str, meta: dict) -> dict:
    """The reference row of an earlier run's ode_nll.json, if it measured the same checkpoint,
    examples and trace (else its per-example figures would not line up with this run's)."""
    with open(path) as f:
        earlier = json.load(f)
    for key in ("workdir", "step", "examples", "trace", "reference_tol"):
        if earlier["meta"].get(key) != meta[key]:
            raise app.UsageError(
                f"--reference_json={path}: its {key} is {earlier['meta'].get(key)!r}, this "
                f"run's {meta[key]!r}; solve the reference again (leave the flag out)."
            )
    ref = earlier["reference"]
    asked = dict(solver=FLAGS.reference_solver, density_tol=FLAGS.reference_density_tol)
    for key, value in asked.items():
        if ref[key] != value:
            raise app.UsageError(
                f"--reference_json={path}: its reference {key} is {ref[key]!r}, not {value!r}."
            )
    return ref


def main(argv):
    del argv
    config = FLAGS.config
    config.eval.estimator = "ode"  # its options: the config's eval.ode.* (dequantisation, ...)
    run = build_run(config)
    state, step = evaluate.restore_latest(run, FLAGS.workdir)
    params = run.eval_params(state)
    n = FLAGS.max_examples
    size = run.dataset.split_size(run.config.eval.split)
    meta = dict(date=str(datetime.date.today()), machine=f"{platform.machine()} CPU, "
                f"{os.cpu_count()} cores", workdir=FLAGS.workdir, step=int(step),
                trace=FLAGS.trace, reference_tol=FLAGS.reference_tol,
                examples=size if n < 0 else min(n, size))  # fmt: skip
    specs = row_specs()
    for solver, time_var, tol, density_tol, pcoeff, icoeff in specs:
        # The estimator's own option check, before the reference's minutes of solving: a bad
        # row is one message, not a traceback after the reference.
        options = row_options(run, time_var, tol, solver, density_tol, pcoeff, icoeff)
        try:
            ESTIMATORS.check("ode", options)
        except ValueError as e:
            raise app.UsageError(f"row {solver}/{time_var}/{tol:g}/{density_tol:g}: {e}") from e
    if FLAGS.reference_json:
        ref = reference_from(FLAGS.reference_json, meta)
    else:
        ref = solve(run, params, "t", FLAGS.reference_tol, n, FLAGS.reference_solver,
                    FLAGS.reference_density_tol)  # fmt: skip
    print("reference", {k: v for k, v in ref.items() if k != "per_example"}, flush=True)
    rows = []
    for solver, time_var, tol, density_tol, pcoeff, icoeff in specs:
        row = solve(run, params, time_var, tol, n, solver, density_tol, pcoeff, icoeff)
        rows.append(with_errors(row, ref))
        print({k: v for k, v in rows[-1].items() if k != "per_example"}, flush=True)
    table = markdown(rows, ref, meta)
    print(table)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, f"{FLAGS.name}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(FLAGS.out, f"{FLAGS.name}.json"), "w") as f:
        json.dump({"meta": meta, "reference": ref, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    runtime.setup()
    app.run(main)
