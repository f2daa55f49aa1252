"""Config sweeps: expand a grid of overrides into `vdm.main` runs, run them, tabulate results.

A sweep file is a Python file with plain data:

  CONFIG = "configs/digits.py"            # config file[:arg]
  FIXED = {"train.num_steps": 1000}        # applied to every run (optional)
  PRODUCT = {"optim.learning_rate": [1e-3, 3e-4], "model.n_layers": [2, 4]}  # all combinations
  ZIP = {"model.n_embd": [32, 64], "model.norm_groups": [8, 16]}  # varied together (optional)

The runs are the Cartesian product of PRODUCT's lists with ZIP's lists taken in lockstep. Each
run gets its own workdir under --base, named from the values that vary, and its overrides are
saved there as sweep.json.

  python experiments/sweep.py print experiments/sweeps/digits_lr.py --base=runs/sweep
  python experiments/sweep.py run experiments/sweeps/digits_lr.py --base=runs/sweep
  python experiments/sweep.py collect --base=runs/sweep   # writes results.md and results.csv

`run` goes through the runs one after another and skips those whose workdir is DONE, so an
interrupted sweep is continued by running the same command (an unfinished run resumes from its
checkpoint). `collect` reads every run's metrics.jsonl.
"""

import argparse
import csv
import io
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

from vdm import logging_utils

SWEEP_RECORD = "sweep.json"


def expand(product: dict | None = None, zipped: dict | None = None, fixed: dict | None = None):
    """The list of override dicts of a grid.

    Args:
      product: key -> list of values; every combination is a run.
      zipped: key -> list of values, all lists of one length; the i-th values go together.
      fixed: key -> value added to every run.

    Returns:
      A list of {dotted key: value} dicts, product-major.
    """
    product, zipped, fixed = product or {}, zipped or {}, fixed or {}
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ValueError(f"ZIP lists must have one length; got {sorted(lengths)}.")
    zip_rows = [
        dict(zip(zipped, vals, strict=True)) for vals in zip(*zipped.values(), strict=True)
    ] or [{}]
    runs = []
    for combo in itertools.product(*product.values()):
        for row in zip_rows:
            runs.append({**fixed, **dict(zip(product, combo, strict=True)), **row})
    return runs


def run_name(overrides: dict, varying: list[str]) -> str:
    """A workdir name from the varying keys' last components and values."""
    parts = [f"{k.split('.')[-1]}={overrides[k]}" for k in varying] or ["run"]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def load_sweep(path: str) -> tuple[str, list[dict], list[str]]:
    """(config, list of override dicts, varying keys) of a sweep file."""
    spec = runpy.run_path(path)
    unknown = set(k for k in spec if k.isupper()) - {"CONFIG", "FIXED", "PRODUCT", "ZIP"}
    if unknown or "CONFIG" not in spec:
        raise ValueError(f"{path}: needs CONFIG; knows FIXED, PRODUCT, ZIP; got {sorted(unknown)}.")
    product, zipped = spec.get("PRODUCT", {}), spec.get("ZIP", {})
    runs = expand(product, zipped, spec.get("FIXED", {}))
    return spec["CONFIG"], runs, list(product) + list(zipped)


def commands(config: str, runs: list[dict], varying: list[str], base: str):
    """[(workdir, overrides, argv)] for every run."""
    out = []
    for overrides in runs:
        workdir = os.path.join(base, run_name(overrides, varying))
        argv = [sys.executable, "-m", "vdm.main", f"--config={config}", f"--workdir={workdir}"]
        argv += [f"--config.{k}={v}" for k, v in overrides.items()]
        out.append((workdir, overrides, argv))
    return out


def run_all(cmds, runner=subprocess.run) -> list[str]:
    """Runs each command whose workdir is not DONE; returns the workdirs it ran."""
    ran = []
    for workdir, overrides, argv in cmds:
        if logging_utils.is_done(workdir):
            print(f"skip (done): {workdir}")
            continue
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, SWEEP_RECORD), "w") as f:
            json.dump(overrides, f, indent=2)
        print(f"run: {shlex.join(argv)}", flush=True)
        runner(argv, check=True)
        ran.append(workdir)
    return ran


def collect(base: str) -> list[dict]:
    """One row per run directory under `base` that has a metrics.jsonl."""
    rows = []
    for name in sorted(os.listdir(base)):
        workdir = os.path.join(base, name)
        if not os.path.exists(os.path.join(workdir, logging_utils.METRICS_FILE)):
            continue
        records = logging_utils.read_metrics(workdir)
        evals = [r for r in records if isinstance(r.get("eval/bpd"), float)]
        row = {"run": name}
        sweep_file = os.path.join(workdir, SWEEP_RECORD)
        if os.path.exists(sweep_file):
            with open(sweep_file) as f:
                row.update(json.load(f))
        row.update(
            final_bpd=evals[-1]["eval/bpd"] if evals else None,
            best_bpd=min(r["eval/bpd"] for r in evals) if evals else None,
            steps=max((r["step"] for r in records), default=0),
            wall_time_s=max((r.get("wall_time", 0.0) for r in records), default=0.0),
            done=logging_utils.is_done(workdir),
        )
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    """A Markdown table of collect()'s rows (columns in first-seen order)."""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """collect()'s rows as CSV text."""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["print", "run", "collect"])
    parser.add_argument("sweep", nargs="?", help="sweep file (print, run)")
    parser.add_argument("--base", required=True, help="directory holding one workdir per run")
    args = parser.parse_args(argv)
    if args.action == "collect":
        rows = collect(args.base)
        for name, text in (("results.md", to_markdown(rows)), ("results.csv", to_csv(rows))):
            with open(os.path.join(args.base, name), "w") as f:
                f.write(text)
        print(to_markdown(rows), end="")
        return
    if not args.sweep:
        parser.error(f"{args.action} needs a sweep file")
    cmds = commands(*load_sweep(args.sweep), args.base)
    if args.action == "print":
        for _, _, argv in cmds:
            print(shlex.join(argv))
    else:
        run_all(cmds)


if __name__ == "__main__":
    main()
