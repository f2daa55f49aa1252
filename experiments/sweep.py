"""Config sweeps: expand a grid of overrides into `vdm.main` runs, run them, tabulate results.

A sweep file is a Python file with plain data:

  CONFIG = "configs/digits.py"            # config file[:arg]
  FIXED = {"train.num_steps": 1000}        # applied to every run (optional)
  PRODUCT = {"optim.learning_rate": [1e-3, 3e-4], "model.n_layers": [2, 4]}  # all combinations
  ZIP = {"model.n_embd": [32, 64], "model.norm_groups": [8, 16]}  # varied together (optional)

The runs are the Cartesian product of PRODUCT's lists with ZIP's lists taken in lockstep. Each
run gets its own workdir under --base, named from the values that vary, and its overrides are
saved there as sweep.json. `print` and `run` first parse every run's overrides against the
locked config, so a misspelt key fails before anything trains.

Run from the repository root; the action comes first, then the sweep file, flags anywhere:

  python -m experiments.sweep print experiments/sweeps/digits_lr.py --base=runs/sweep
  python -m experiments.sweep run experiments/sweeps/digits_lr.py --base=runs/sweep
  python -m experiments.sweep collect --base=runs/sweep   # writes results.md and results.csv

`run` goes through the runs one after another and skips those whose workdir is DONE, so an
interrupted sweep is continued by running the same command (an unfinished run resumes from its
checkpoint); it stops at the first failed run unless given --keep_going. `collect` reads every
run's metrics.jsonl and tabulates the final and best eval bits/dim, steps and wall time.
"""

import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments.sweep_report import to_csv, to_markdown
from vdm.run import logs as logging_utils

SWEEP_RECORD = "sweep.json"
ACTIONS = ("print", "run", "collect")

flags.DEFINE_string("base", None, "Directory holding one workdir per run (required).")
flags.DEFINE_bool("keep_going", False, "run: continue after a failed run.")
FLAGS = flags.FLAGS


def expand(product: dict | None = None, zipped: dict | None = None, fixed: dict | None = None):
    """The list of override dicts of a grid.

    Args:
      product: key -> list of values; every combination is a run.
      zipped: key -> list of values, all lists of one length; the i-th values go together.
      fixed: key -> value added to every run.

    Returns:
      A list of {dotted key: value} dicts, product-major; a PRODUCT or ZIP value replaces a
      FIXED one for the same key.

    Raises:
      ValueError: ZIP lists differ in length, or a key is in both PRODUCT and ZIP.
    """
    product, zipped, fixed = product or {}, zipped or {}, fixed or {}
    both = set(product) & set(zipped)
    if both:
        raise ValueError(f"Keys in both PRODUCT and ZIP: {sorted(both)}.")
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
    """A workdir name built from the values of the keys that vary across the sweep.

    Args:
      overrides: one run's {dotted key: value}.
      varying: the keys that differ between runs, in the sweep file's order.

    Returns:
      e.g. "learning_rate=0.001,n_layers=4": each key's last component, unless two varying
      keys share it (model.dropout, data.dropout), in which case the full dotted keys are used.
    """
    short = [k.split(".")[-1] for k in varying]
    labels = short if len(set(short)) == len(short) else varying
    parts = [f"{label}={overrides[k]}" for label, k in zip(labels, varying, strict=True)]
    # Values such as tuples or paths carry spaces and slashes; keep names one path component.
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts) or "run")


def load_sweep(path: str) -> tuple[str, list[dict], list[str]]:
    """Reads a sweep file.

    Args:
      path: a Python file defining CONFIG and optionally FIXED, PRODUCT and ZIP.

    Returns:
      (config file[:arg], the runs' override dicts, the keys that vary between runs).

    Raises:
      ValueError: CONFIG is missing, or an upper-case name is none of the known ones (a
        misspelt PRODUCT would otherwise silently shrink the sweep to one run).
    """
    spec = runpy.run_path(path)
    unknown = {k for k in spec if k.isupper()} - {"CONFIG", "FIXED", "PRODUCT", "ZIP"}
    if unknown or "CONFIG" not in spec:
        raise ValueError(f"{path}: needs CONFIG; knows FIXED, PRODUCT, ZIP; got {sorted(unknown)}.")
    product, zipped = spec.get("PRODUCT", {}), spec.get("ZIP", {})
    runs = expand(product, zipped, spec.get("FIXED", {}))
    varying = [k for k in [*product, *zipped] if len({repr(r[k]) for r in runs}) > 1]
    return spec["CONFIG"], runs, varying


def commands(config: str, runs: list[dict], varying: list[str], base: str):
    """The `vdm.main` command line of every run.

    Args:
      config: config file[:arg] passed as --config.
      runs: override dicts from `expand`.
      varying: keys that name the workdirs (see `run_name`).
      base: directory that holds one workdir per run.

    Returns:
      A list of (workdir, overrides, argv) tuples, in the order of `runs`.

    Raises:
      ValueError: two runs would share a workdir.
    """
    out = []
    for overrides in runs:
        workdir = os.path.join(base, run_name(overrides, varying))
        argv = [sys.executable, "-m", "vdm.main", f"--config={config}", f"--workdir={workdir}"]
        argv += [f"--config.{k}={v}" for k, v in overrides.items()]
        out.append((workdir, overrides, argv))
    workdirs = [w for w, _, _ in out]
    if len(set(workdirs)) != len(workdirs):
        dup = sorted({w for w in workdirs if workdirs.count(w) > 1})
        raise ValueError(f"Runs would share a workdir: {dup}; list each value once.")
    return out


def check_overrides(config: str, runs: list[dict]) -> None:
    """Parses every run's overrides as `vdm.main` would, before any run starts.

    A misspelt key or a badly typed value in the last run of a sweep should fail now, not
    after hours of earlier runs.

    Args:
      config: config file[:arg], relative to the current directory as on the command line.
      runs: override dicts from `expand`.

    Raises:
      ValueError: naming the run's overrides and the parser's message (which names the key).
    """
    for overrides in runs:
        argv = ["vdm.main", f"--config={config}"]
        argv += [f"--config.{k}={v}" for k, v in overrides.items()]
        # A fresh FlagValues per run: override flags are defined while parsing and would
        # otherwise leak between runs; sys_argv stops config_flags reading this process's argv.
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
        )
        try:
            flag_values(argv)
        except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
            # config_flags wraps the locked config's KeyError in an AttributeError; unwrap the
            # message so that it reads as text, not as nested reprs.
            message = e
            while isinstance(message, BaseException) and message.args:
                message = message.args[0]
            raise ValueError(f"Bad override in run {overrides}: {message}") from e


def run_all(cmds, runner=subprocess.run, keep_going: bool = False) -> tuple[list, list]:
    """Runs the commands one after another, skipping runs whose workdir has a DONE file.

    Args:
      cmds: (workdir, overrides, argv) tuples from `commands`.
      runner: called as runner(argv, check=True); a test passes a fake.
      keep_going: after a failed run, go on with the next instead of stopping the sweep.

    Returns:
      (workdirs that ran to completion, workdirs whose command failed).
    """
    ran, failed = [], []
    for workdir, overrides, argv in cmds:
        if logging_utils.is_done(workdir):
            print(f"skip (done): {workdir}")
            continue
        os.makedirs(workdir, exist_ok=True)
        # collect() reads the overrides back, so the table has one column per swept key.
        with open(os.path.join(workdir, SWEEP_RECORD), "w") as f:
            json.dump(overrides, f, indent=2)
        print(f"run: {shlex.join(argv)}", flush=True)
        try:
            runner(argv, check=True)
        except subprocess.CalledProcessError as e:
            if not keep_going:
                raise
            print(f"FAILED (exit {e.returncode}): {workdir}", flush=True)
            failed.append(workdir)
            continue
        ran.append(workdir)
    return ran, failed


def _is_number(value) -> bool:
    # Non-finite metrics are logged as strings ("nan"); bool is an int subclass.
    return isinstance(value, int | float) and not isinstance(value, bool)


def collect(base: str) -> list[dict]:
    """Summarises every run directory directly under `base` that has a metrics.jsonl.

    Args:
      base: the sweep's base directory.

    Returns:
      One dict per run, sorted by name: run, the swept overrides (from sweep.json), final_bpd
      and its final_bpd_stderr (the last eval), best_bpd (the lowest eval), steps, wall_time_s
      and done. Bits/dim are None for runs that have not evaluated yet.
    """
    if not os.path.isdir(base):
        raise FileNotFoundError(f"No sweep directory {base!r}.")
    rows = []
    for name in sorted(os.listdir(base)):
        workdir = os.path.join(base, name)
        if not os.path.exists(os.path.join(workdir, logging_utils.METRICS_FILE)):
            continue
        records = logging_utils.read_metrics(workdir)
        evals = [r for r in records if _is_number(r.get("eval/bpd"))]
        row = {"run": name}
        sweep_file = os.path.join(workdir, SWEEP_RECORD)
        if os.path.exists(sweep_file):
            with open(sweep_file) as f:
                row.update(json.load(f))
        last = evals[-1] if evals else {}
        row.update(
            final_bpd=last.get("eval/bpd"),
            final_bpd_stderr=last.get("eval/bpd_stderr"),
            best_bpd=min(r["eval/bpd"] for r in evals) if evals else None,
            steps=max((r["step"] for r in records), default=0),
            wall_time_s=max((r.get("wall_time", 0.0) for r in records), default=0.0),
            done=logging_utils.is_done(workdir),
        )
        rows.append(row)
    return rows


def command(action: str, sweep: str | None, base: str, keep_going: bool = False) -> int:
    """Carries out one action of the command line.

    Args:
      action: print (the runs' command lines), run (them, one after another) or collect
        (results.md and results.csv under `base`).
      sweep: the sweep file (print, run); unused by collect.
      base: directory holding one workdir per run.
      keep_going: run: continue after a failed run.

    Returns:
      The exit status: 1 when a run failed under keep_going, else 0.

    Raises:
      app.UsageError: unknown action, no sweep file for print/run, or a bad sweep (a misspelt
        key, clashing workdirs, ...); the command line prints it with the usage, status 2.
    """
    if action not in ACTIONS:
        raise app.UsageError(f"Unknown action {action!r}; use one of {', '.join(ACTIONS)}.", 2)
    if action == "collect":
        rows = collect(base)
        for name, text in (("results.md", to_markdown(rows)), ("results.csv", to_csv(rows))):
            with open(os.path.join(base, name), "w") as f:
                f.write(text)
        print(to_markdown(rows), end="")
        return 0
    if not sweep:
        raise app.UsageError(f"{action} needs a sweep file.", 2)
    try:
        config, runs, varying = load_sweep(sweep)
        check_overrides(config, runs)
        cmds = commands(config, runs, varying, base)
    except ValueError as e:
        raise app.UsageError(str(e), 2) from e
    if action == "print":
        for _, _, run_argv in cmds:
            print(shlex.join(run_argv))
        return 0
    _, failed = run_all(cmds, keep_going=keep_going)
    for workdir in failed:
        print(f"failed: {workdir}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """absl entry point.

    Args:
      argv: what absl leaves after parsing the flags: [program, action, sweep file (print,
        run)].

    Returns:
      The exit status (see `command`).
    """
    args = argv[1:]
    if not args or len(args) > 2:
        raise app.UsageError("Give an action (print|run|collect) and, for print/run, a sweep.", 2)
    if not FLAGS.base:
        raise app.UsageError("--base is required.", 2)
    return command(args[0], args[1] if len(args) > 1 else None, FLAGS.base, FLAGS.keep_going)


if __name__ == "__main__":
    app.run(main)
