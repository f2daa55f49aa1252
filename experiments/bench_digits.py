"""Digits FID vs NFE for the samplers, on a trained digits workdir (bench_samplers' part ii).

Why: the Gaussian oracle measures a sampler's own error with an exact denoiser; a trained
network's error changes which sampler is best, so the samplers are also compared on the model
the README quick start trains, with the digits classifier's features (vdm/metrics/features.py).

For each (sampler, steps): NFE per sample (counted as the network runs), sampling seconds
(compiled program, one run), and digits FID of `--digits_num` samples against the test split,
mean and std over `--digits_seeds` sampling seeds. The noise floor is the FID of random
subsets of the same size of the *training* images against the test split (real digits: what
a perfect sampler would score at that sample size). Guided rows are added only for a
class-conditional model.

Usage (bench_samplers runs this when --digits_workdir is given):
  python -m experiments.bench_samplers --oracle=false --digits_workdir=runs/digits
"""

import dataclasses
import datetime
import json
import os
import platform

import jax
import numpy as np

from vdm.data import memory
from vdm.metrics import frechet
from vdm.model import SamplerSpec
from vdm.run import sample_metrics
from vdm.run.evaluate import restore_latest
from vdm.run.setup import build_run

# (label, sampler, options); the adaptive ODE ignores the step count (its first step 1/steps).
SAMPLERS = [
    ("ancestral", "ancestral", {}),
    ("ddim eta=0", "ddim", {"eta": 0.0}),
    ("ode heun", "ode", {"solver": "heun"}),
    ("ode heun in log-SNR", "ode", {"solver": "heun", "time": "log_snr"}),
    ("DPM-Solver++ 2M", "dpm_solver", {"order": 2}),
    ("DPM-Solver++ 3M", "dpm_solver", {"order": 3}),
    ("UniPC 2 (bh2)", "unipc", {"order": 2}),
    ("UniPC 3 (bh2)", "unipc", {"order": 3}),
]
# The adaptive PF-ODE at a tight tolerance is the limit every deterministic solver converges
# to: its FID is what the model's ODE gives, whatever the solver.
ADAPTIVE = [(f"ode tsit5 tol={tol:g}", "ode", {"solver": "tsit5", "rtol": tol, "atol": tol})
            for tol in (1e-3, 1e-5)]  # fmt: skip


def load(config, workdir):
    """(run, EMA params, step) of a trained digits workdir."""
    run = build_run(config)
    state, step = restore_latest(run, workdir)
    return run, run.eval_params(state), step


def score(run, params, net, reference, label, name, opts, steps, num, seeds, guidance=1.0):
    """One row: NFE, seconds and FID (mean, std over seeds) of one sampler setting."""
    fids, kids, accs = [], [], []
    for seed in seeds:
        spec = SamplerSpec(sampler=name, steps=steps, options=opts, guidance=guidance, num=num)
        r = dataclasses.replace(run, seed=seed, sampler=spec)
        samples, timing = sample_metrics.timed_samples(r, params, spec)
        q = sample_metrics.quality(r, net, reference, samples, spec)
        fids.append(q["fid"])
        kids.append(q["kid"])
        accs.append(q["class_accuracy"])
    row = dict(sampler=label, steps=steps, guidance=guidance, nfe=timing["nfe"],
               seconds=timing["sample_seconds"], fid=float(np.mean(fids)),
               fid_std=float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
               kid=float(np.mean(kids)), seeds=len(seeds),
               class_accuracy=None if accs[0] is None else float(np.mean(accs)))  # fmt: skip
    print(row, flush=True)
    return row


def real_floor(net, reference, num, draws=8):
    """FID of `draws` random train subsets of `num` images against the reference."""
    train = memory.digits("train")["x"]
    rng = np.random.default_rng(0)
    fids = [frechet.fid(net.embed(train[rng.choice(len(train), num, replace=False)])[0],
                        reference["features"]) for _ in range(draws)]  # fmt: skip
    return float(np.mean(fids)), float(np.std(fids, ddof=1))


def markdown(rows, floor, meta) -> str:
    ref = rows[0]  # ancestral at the reference step count
    lines = [
        f"# Digits FID vs NFE ({meta['num']} samples vs the {meta['reference_num']} test images)",
        "",
        f"{meta['date']}, {meta['machine']}, jax {jax.__version__}. Model: {meta['model']} "
        f"(step {meta['step']}, EMA). Features: the digits classifier (64-d, test accuracy "
        f"{meta['classifier_test_accuracy']:.3f}). FID is the mean (std) over {meta['seeds']} "
        f"sampling seeds. Noise floor (random train subsets of {meta['num']} real digits): "
        f"{floor[0]:.2f} +- {floor[1]:.2f}. {meta['guidance_note']}",
        "",
        "| sampler | guidance | steps | NFE | s / run | FID | FID std | KID | class acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        std = "-" if r["fid_std"] is None else f"{r['fid_std']:.2f}"
        acc = r.get("class_accuracy")
        acc = "-" if acc is None else f"{acc:.3f}"
        lines.append(f"| {r['sampler']} | {r.get('guidance', 1.0):g} | {r['steps']} | "
                     f"{r['nfe']} | {r['seconds']:.2f} | {r['fid']:.2f} | {std} | "
                     f"{r['kid']:.1f} | {acc} |")  # fmt: skip
    # With one reference seed its spread is unknown: the real-digits floor's std stands in.
    std, what = (ref["fid_std"], "seed") if ref["fid_std"] else (floor[1], "noise-floor")
    band = ref["fid"] + 2 * std
    lines += ["", f"At most 2 {what} std above {ref['steps']}-step ancestral "
              f"(FID <= {band:.2f}), fewest NFE first:", ""]  # fmt: skip
    hits = sorted((r for r in rows if r["fid"] <= band), key=lambda r: r["nfe"])
    lines += [f"- {r['sampler']}, {r['steps']} steps: NFE {r['nfe']}, FID {r['fid']:.2f}"
              for r in hits] or ["- none"]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_digits(
    config,
    workdir,
    out_dir,
    *,
    steps_list,
    num,
    seeds,
    ref_seeds,
    ref_steps=1000,
    table_name="samplers_digits",
):
    """Scores every sampler x step count; writes <table_name>.md and .json to out_dir."""
    run, params, step = load(config, workdir)
    net = sample_metrics.build_features(run, workdir)
    reference = sample_metrics.reference_stats(run, workdir, net)
    rows = [score(run, params, net, reference, "ancestral", "ancestral", {}, ref_steps, num,
                  ref_seeds)]  # fmt: skip
    # A class-conditional model: unguided (0: through the null label), conditional (1) and
    # guided (3, Ho & Salimans' w' = 2). The adaptive ODE rows at guidance 1 only.
    guidances = (1.0, 0.0, 3.0) if run.model.num_classes else (1.0,)
    for guidance in guidances:
        for label, name, opts in SAMPLERS:
            for steps in steps_list:
                rows.append(score(run, params, net, reference, label, name, opts, steps, num,
                                  seeds, guidance))  # fmt: skip
        for label, name, opts in ADAPTIVE if guidance == 1.0 else ():
            rows.append(score(run, params, net, reference, label, name, opts, 10, num, seeds,
                              guidance))  # fmt: skip
    floor = real_floor(net, reference, num)
    meta = dict(date=str(datetime.date.today()), machine=f"{platform.machine()} CPU, "
                f"{os.cpu_count()} cores (shared)", model=f"{workdir}", step=int(step), num=num,
                reference_num=reference["num"], seeds=len(seeds), floor=floor,
                classifier_test_accuracy=net.details["classifier_test_accuracy"],
                guidance_note=("Class-conditional: guidance 0 (unguided, the null label), 1 "
                               "(conditional) and 3; class acc. = the digits classifier's "
                               "accuracy on the classes asked for (cycling 0-9)."
                               if run.model.num_classes else
                               "The model is unconditional (model.num_classes = 0): no guided "
                               "rows."))  # fmt: skip
    table = markdown(rows, floor, meta)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{table_name}.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, f"{table_name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows
