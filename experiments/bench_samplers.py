"""Cost and quality of every sampler on an exact Gaussian denoiser, per step count.

Why: the samplers differ in network evaluations per step and in how fast their discretisation
error falls, so "how many steps" has a different answer for each. With the exact denoiser
(vdm.core.oracles) the only errors are the sampler's own and Monte-Carlo noise, and the true
distribution is known, so quality can be measured rather than eyeballed.

Data: x ~ N(mu, S) in D dimensions, S = Q diag(lam) Q^T with eigenvalues log-spaced over
[0.05, 2] and a random rotation Q. The denoiser is oracles.gaussian_eps in S's eigenbasis
(isotropic noise commutes with Q, so this is exact and avoids a batched D x D solve per call);
it is checked against the full-covariance oracle before anything is timed. The schedule is
fixed_linear(-13.3, 10): gamma_max = 10 makes q(z_1) = N(0, I) to 5e-5, so the prior mismatch
of gamma_max = 5 does not hide the discretisation error. Samples go through samplers.sample
(continuous decoder included).

Per (sampler, steps): NFE per sample (denoiser calls counted at run time with a host callback,
exact for the adaptive ODE too), wall time per image and images/s (jitted, one warm-up, median
of --repeats runs, each ended by block_until_ready), and W2: the 2-Wasserstein distance between
the Gaussian fitted to the samples and the true one. Even exact samples give W2 > 0 at finite
N, so the table has that floor (mean and spread over 8 independent exact draws), and a sampler
"reaches" 1000-step ancestral quality at the first step count whose W2 is within 2 floor
standard deviations of that reference.

Usage, from the repository root:
  python -m experiments.bench_samplers [--samples=4096] [--dims=16] [--steps=10,25,...]
      [--repeats=3] [--out=DIR]
Prints Markdown and writes samplers.md and samplers.json to --out (experiments/results).

Part (ii), a trained digits model (experiments/bench_digits.py): with
--digits_workdir=DIR (a workdir trained by the README quick start), digits FID vs NFE for
every sampler at --digits_steps, written to samplers_digits.md/.json; --oracle=false skips the
Gaussian part (and leaves samplers.md as it is). A workdir trained with overrides takes the
same ones on --digits_config (a class-conditional model, with guided rows:
--digits_config.model.num_classes=10 --digits_name=samplers_digits_guided).
"""

import datetime
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.bench.gaussian_oracle import SCHEDULE, count_nfe, problem, w2_gaussian
from vdm import runtime
from vdm.sampling import samplers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (label, registry name, options); adaptive ODE rows run once, their grid is their own.
FIXED = [
    ("ancestral", "ancestral", {}),
    ("ddpm", "ddpm", {}),
    ("ddim eta=0", "ddim", {"eta": 0.0}),
    ("sde (Euler-Maruyama)", "sde", {}),
    ("pc (ancestral + 1 Langevin)", "pc", {"corrector_steps": 1, "snr": 0.1}),
    ("ode heun", "ode", {"solver": "heun"}),
    ("ode heun in log-SNR", "ode", {"solver": "heun", "time": "log_snr"}),
    ("DPM-Solver++ 2M", "dpm_solver", {"order": 2}),
    ("DPM-Solver++ 3M", "dpm_solver", {"order": 3}),
    ("UniPC 2 (bh2)", "unipc", {"order": 2}),
    ("UniPC 3 (bh2)", "unipc", {"order": 3}),
    ("langevin (2 per level)", "langevin", {"steps_each": 2}),
]
ADAPTIVE = [(f"ode tsit5 tol={tol:g}", "ode", {"solver": "tsit5", "rtol": tol, "atol": tol})
            for tol in (1e-2, 1e-4)]  # fmt: skip
ADAPTIVE_FIRST_STEPS = 10  # the adaptive solvers' first step is 1/10

flags.DEFINE_integer("samples", 4096, "Samples per sampling run (the batch).")
flags.DEFINE_integer("dims", 16, "Dimension D of the test Gaussian.")
flags.DEFINE_list(
    "steps",
    ["10", "15", "25", "50", "100", "250", "1000"],
    "Step counts of the fixed-grid samplers, comma-separated; the largest is the reference.",
)
flags.DEFINE_integer("repeats", 3, "Timed runs per (sampler, steps) after one warm-up.")
flags.DEFINE_string("out", RESULTS, "Directory for samplers.md and samplers.json.")
flags.DEFINE_bool("oracle", True, "Run part (i), the Gaussian oracle.")
flags.DEFINE_string("digits_workdir", None, "A trained digits workdir: run part (ii).")
# A config file flag: --digits_config.model.num_classes=10 for a class-conditional workdir.
config_flags.DEFINE_config_file(
    "digits_config", "configs/digits.py", "The config that workdir was trained by."
)
flags.DEFINE_list("digits_steps", ["10", "20", "50"], "Step counts of part (ii).")
flags.DEFINE_integer("digits_num", 297, "Samples per FID (the test split has 297 images).")
flags.DEFINE_integer("digits_seeds", 2, "Sampling seeds per row of part (ii).")
flags.DEFINE_integer("digits_ref_seeds", 4, "Sampling seeds of the ancestral reference row.")
flags.DEFINE_integer("digits_ref_steps", 1000, "Steps of the ancestral reference row.")
flags.DEFINE_string("digits_name", "samplers_digits", "File name (no suffix) of part (ii)'s table.")
flags.register_validator(
    "steps",
    lambda v: bool(v) and all(s.isdigit() and int(s) > 0 for s in v),
    "--steps must be a comma-separated list of positive integers.",
)
FLAGS = flags.FLAGS


def run_one(denoise, name, opts, steps, shape, repeats, target):
    mu, cov_sqrt, cov = target

    def draw(seed):
        return samplers.sample(name, denoise, SCHEDULE, {}, jax.random.key(seed), shape,
                               vocab_size=None, steps=steps, **opts)  # fmt: skip

    jax.block_until_ready(draw(0))  # compile + warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(draw(r + 1))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    nfe = count_nfe(denoise, name, opts, steps, shape)
    return {
        "nfe": nfe,
        "ms_per_image": 1e3 * sec / shape[0],
        "images_per_s": shape[0] / sec,
        "w2": w2_gaussian(x, mu, cov_sqrt, cov),
    }


def markdown(rows, floor, ref, first, samples: int, dims: int) -> str:
    lines = [
        f"# Sampler benchmark ({samples} samples, D = {dims}, exact Gaussian denoiser)",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU, jax {jax.__version__}, backend "
        f"{jax.default_backend()}, {os.cpu_count()} cores (shared). W2 of exact samples "
        f"(Monte-Carlo floor): {floor[0]:.4f} +- {floor[1]:.4f}; 1000-step ancestral: "
        f"{ref:.4f}. NFE are per sample; adaptive rows ignore the step count.",
        "",
        "| sampler | steps | NFE | ms / image | images / s | W2 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['ms_per_image']:.4f} | "
                     f"{r['images_per_s']:.0f} | {r['w2']:.4f} |")  # fmt: skip
    lines += ["", "First step count within 2 floor std of 1000-step ancestral W2:", "",
              "| sampler | steps | NFE |", "|---|---:|---:|"]  # fmt: skip
    for label, hit in first.items():
        lines.append(f"| {label} | {hit['steps'] if hit else '-'} | {hit['nfe'] if hit else '-'} |")
    return "\n".join(lines) + "\n"


def digits_part():
    from experiments import bench_digits

    bench_digits.run_digits(FLAGS.digits_config, FLAGS.digits_workdir, FLAGS.out,
                            steps_list=[int(s) for s in FLAGS.digits_steps], num=FLAGS.digits_num,
                            seeds=range(1, FLAGS.digits_seeds + 1),
                            ref_seeds=range(1, FLAGS.digits_ref_seeds + 1),
                            ref_steps=FLAGS.digits_ref_steps,
                            table_name=FLAGS.digits_name)  # fmt: skip


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.digits_workdir:
        digits_part()
    if FLAGS.oracle:
        oracle_part()


def oracle_part():
    steps_list = [int(s) for s in FLAGS.steps]
    mu, q, lam, denoise = problem(FLAGS.dims)
    cov = (q * lam) @ q.T
    target = (mu, (q * np.sqrt(lam)) @ q.T, cov)
    shape = (FLAGS.samples, FLAGS.dims)
    rng = np.random.default_rng(1)
    exact = [w2_gaussian(mu + rng.normal(size=shape) * np.sqrt(lam) @ q.T, *target)
             for _ in range(8)]  # fmt: skip
    floor = (float(np.mean(exact)), float(np.std(exact, ddof=1)))

    rows = []
    runs = [(label, name, opts, steps) for label, name, opts in FIXED for steps in steps_list]
    runs += [(label, name, opts, ADAPTIVE_FIRST_STEPS) for label, name, opts in ADAPTIVE]
    for label, name, opts, steps in runs:
        res = run_one(denoise, name, opts, steps, shape, FLAGS.repeats, target)
        rows.append(dict(sampler=label, steps=steps, **res))
        print(rows[-1], flush=True)

    ref_rows = [r for r in rows if r["sampler"] == "ancestral" and r["steps"] == max(steps_list)]
    ref = ref_rows[0]["w2"]
    first = {}
    for label, _, _ in FIXED + ADAPTIVE:
        hits = [r for r in rows if r["sampler"] == label and r["w2"] <= ref + 2 * floor[1]]
        first[label] = min(hits, key=lambda r: r["steps"]) if hits else None

    table = markdown(rows, floor, ref, first, FLAGS.samples, FLAGS.dims)
    print(table)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "samplers.md"), "w") as f:
        f.write(table)
    meta = {"samples": FLAGS.samples, "dims": FLAGS.dims, "repeats": FLAGS.repeats,
            "schedule": "fixed_linear(-13.3, 10)", "jax": jax.__version__,
            "backend": jax.default_backend(), "w2_exact_floor": floor, "w2_reference": ref,
            "first_reaching": {k: v and v["steps"] for k, v in first.items()}}  # fmt: skip
    with open(os.path.join(FLAGS.out, "samplers.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    runtime.setup()  # tcmalloc and XLA:CPU flags, as `python -m vdm.main` runs
    app.run(main)
