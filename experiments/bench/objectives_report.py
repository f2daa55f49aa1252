"""Statistics and Markdown of experiments/objectives.py: means over seeds with their standard
errors, each variant's seed-paired difference to the baseline, and the results tables.

Kept free of flags and of JAX, so tests can check the tables on made-up figures.
"""

import json
import math
import os

BASELINE = "vdm"

# (column header, summary key, format) of the summary table, in order.
SUMMARY_COLUMNS = [
    ("seeds", "n", "{:d}"),
    ("bits/dim", "bpd_mean", "{:.4f}"),
    ("s.e.", "bpd_se", "{:.4f}"),
    (f"- {BASELINE}", "diff_mean", "{:+.4f}"),
    ("s.e. of diff", "diff_se", "{:.4f}"),
    ("per-example var", "var_mean", "{:.3f}"),
    ("wall (s)", "wall_mean", "{:.0f}"),
]
RUN_COLUMNS = ["variant", "seed", "bits/dim", "eval s.e.", "per-example var", "examples",
               "wall (s)"]  # fmt: skip


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None for one value: no spread to estimate)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(runs: dict) -> dict:
    """Across-seed figures per variant.

    Args:
      runs: {variant: {seed: {'bpd', 'bpd_stderr', 'per_example_var', 'wall_s', ...}}}.

    Returns:
      {variant: {'n', 'bpd_mean', 'bpd_se', 'var_mean', 'wall_mean', 'diff_mean', 'diff_se',
      'diff_se_kind'}}. The difference to the baseline is paired over the seeds both have; its
      s.e. is the spread of the paired differences over seeds ('seeds') with two or more, else
      the two runs' eval s.e.s combined ('eval only'). The diff fields are None for the baseline
      itself and without a baseline run.
    """
    out = {}
    base = runs.get(BASELINE, {})
    for variant, by_seed in runs.items():
        if not by_seed:
            continue  # no run of this variant yet
        bpd = [r["bpd"] for r in by_seed.values()]
        mean, se = _mean_se(bpd)
        row = {
            "n": len(bpd),
            "bpd_mean": mean,
            "bpd_se": se,
            "var_mean": _mean_se([r["per_example_var"] for r in by_seed.values()])[0],
            "wall_mean": _mean_se([r["wall_s"] for r in by_seed.values()])[0],
            "diff_mean": None,
            "diff_se": None,
            "diff_se_kind": None,
        }
        shared = [s for s in by_seed if s in base] if variant != BASELINE else []
        if shared:
            diffs = [by_seed[s]["bpd"] - base[s]["bpd"] for s in shared]
            row["diff_mean"], row["diff_se"] = _mean_se(diffs)
            row["diff_se_kind"] = "seeds"
            if row["diff_se"] is None:
                s = shared[0]
                row["diff_se"] = math.hypot(by_seed[s]["bpd_stderr"], base[s]["bpd_stderr"])
                row["diff_se_kind"] = "eval only"
        out[variant] = row
    return out


def _cell(fmt: str, value) -> str:
    return "n/a" if value is None else fmt.format(value)


def _params(record: dict) -> str:
    """Which parameters the record evaluated (records before use_ema existed used the EMA)."""
    return "EMA" if record.get("use_ema", True) else "raw (eval.use_ema=False)"


def markdown(record: dict) -> str:
    """The results: the setting, the per-run table and the across-seed summary."""
    seeds = record["seeds"]
    lines = [
        "# Training objectives: test bits/dim after a short run",
        "",
        f"{record['date']}; {record['machine']}; jax {record['jax']}. Config "
        f"`{record['config']}`, {record['steps']} steps, seeds {', '.join(map(str, seeds))}; "
        f"full test split ELBO (eval/bpd) with the {_params(record)} parameters, "
        f"{record['num_draws']} (t, eps) "
        "draws per example, uniform evaluation times for every variant.",
        "",
        f"Command: `{record['command']}`",
        "",
    ]
    if not record.get("complete", True):
        lines += [
            "**Incomplete record**: the invocation was still running or was stopped; the tables "
            "hold the runs finished so far.",
            "",
        ]
    if record.get("reused"):
        lines += [
            f"Runs {', '.join(record['reused'])} were kept from an earlier invocation in the same "
            "setting (--reuse); their wall times are of that invocation's machine load.",
            "",
        ]
    if 2 <= len(seeds) < 5:
        lines += [
            f"{len(seeds)} seeds: each s.e. across seeds rests on {len(seeds) - 1} degree(s) of "
            "freedom, so it is itself very uncertain (a 95% interval is several s.e. wide).",
            "",
        ]
    if record.get("use_ema", True) is False:
        lines += [
            "Raw (not EMA) parameters, eval.use_ema=False: at optim.ema_rate="
            f"{record.get('ema_rate')} the EMA's horizon (about 1/(1 - rate) steps) is not short "
            "against the run, so EMA figures would still carry the initialisation and favour "
            "forms that start closer to right (experiments/results/base_measure.md). These are "
            "short-run figures, not converged ones.",
            "",
        ]
    elif record.get("ema_rate") is not None:
        lines += [
            f"EMA parameters after {record['steps']} steps at optim.ema_rate="
            f"{record['ema_rate']}: they still carry part of the initialisation (see "
            "experiments/results/base_measure.md), which favours output forms that start "
            "closer to right; these are short-run figures, not converged ones.",
            "",
        ]
    if len(seeds) < 2:
        lines += [
            "One seed: the differences' s.e. is the two eval s.e.s combined, with no "
            "seed-to-seed spread in it, so a difference below about 2 s.e. is no conclusion and "
            "even a larger one may not survive other seeds. (That eval s.e. is also "
            "conservative for a comparison: it is mostly the spread over test examples, and "
            "every variant is evaluated on the same examples with the same draws, so much of it "
            "is shared; the per-example values needed for a paired s.e. are not recorded.)",
            "",
        ]
    lines += ["| variant | overrides |" + "".join(f" {h} |" for h, _, _ in SUMMARY_COLUMNS)]
    lines += ["|---|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for variant, row in record["summary"].items():
        over = " ".join(f"`{k}={v}`" for k, v in record["variants"][variant].items()) or "(none)"
        cells = "".join(f" {_cell(fmt, row[key])} |" for _, key, fmt in SUMMARY_COLUMNS)
        lines.append(f"| {variant} | {over} |{cells}")
    lines += [
        "",
        "per-example var: s.e.^2 x examples, the variance over test examples of their "
        "draw-averaged ELBO: the spread between examples plus the estimator's own (t, eps) "
        "variance divided by the draws, not the estimator's variance alone. wall: training "
        "with its compilation and final eval.",
        "",
        "| " + " | ".join(RUN_COLUMNS) + " |",
        "|---|" + "---:|" * (len(RUN_COLUMNS) - 1),
    ]
    for variant, by_seed in record["runs"].items():
        for seed, r in by_seed.items():
            lines.append(
                f"| {variant} | {seed} | {r['bpd']:.4f} | {r['bpd_stderr']:.4f} | "
                f"{r['per_example_var']:.3f} | {r['num_examples']} | {r['wall_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def write(record: dict, table: str, stem: str) -> None:
    """Writes stem.json (the record) and stem.md (the table), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(table)
