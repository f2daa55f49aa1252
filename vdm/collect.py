"""A table of every likelihood record in one or more workdirs, next to the published numbers.

  python -m vdm.collect runs/cifar10 --config=configs/cifar10.py
  python -m vdm.collect runs/a runs/b --output=results.md

Reads workdir/eval/*.json (written by `--mode=eval`, vdm/run/eval_records.py) and prints one
markdown row per record: step, estimator, dequantisation, what is estimated (-log p(x|y) or
-log p(x)), bits/dim with its standard error, examples, draws, solver steps, split and EMA,
then each record's accounting line once. With --config, the numbers the config's docstring
states (its first paragraph, e.g. "2.65 bits/dim") are printed above the table for comparison.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("config", None, "Config file whose docstring states the published numbers.")
flags.DEFINE_string("output", None, "Also write the table to this file.")
FLAGS = flags.FLAGS

_COLUMNS = (
    "workdir", "step", "estimator", "dequantization", "likelihood", "bits/dim", "examples",
    "draws", "NFE mean/max", "split", "EMA",
)  # fmt: skip
_NUMBER = re.compile(r"(\d+\.\d+)\s*(?:bits/dim|\))")


def published(config_path: str) -> tuple[str, list[str]]:
    """(the first paragraph of a config file's docstring, the bits/dim figures it states)."""
    path = Path(config_path.split(":")[0])
    if not path.is_file():
        raise FileNotFoundError(f"--config={config_path!r}: no such file.")
    spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = (module.__doc__ or "").strip().split("\n\n")[0]
    text = " ".join(first.split())
    return text, _NUMBER.findall(text)


def read_records(workdirs) -> list[tuple[str, dict]]:
    """(workdir, record) for every eval record, in workdir order then step order."""
    out = []
    for workdir in workdirs:
        folder = Path(workdir) / "eval"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: run --mode=eval on {workdir} first.")
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        records.sort(key=lambda r: (r["step"], r["estimator"] != "elbo", r["estimator"]))
        out += [(str(workdir), r) for r in records]
    return out


def _row(workdir: str, r: dict) -> list[str]:
    steps = "-"
    if "num_steps_mean" in r:
        steps = f"{r['num_steps_mean']:.1f}/{r['num_steps_max']:.0f}"
    return [
        workdir,
        str(r["step"]),
        r["estimator"],
        r["dequantization"],
        r["likelihood"].split(":")[0],
        f"{r['bpd']:.4f} ± {r['bpd_stderr']:.4f}",
        str(r["num_examples"]),
        str(r["num_draws"]),
        steps,
        f"{r['dataset']['name']}/{r.get('split_name', r['split'])}",
        "yes" if r["use_ema"] else "no",
    ]


def table(records, config_path: str | None = None) -> str:
    """The markdown text: published numbers (with a config), the table, the accountings."""
    lines = []
    if config_path:
        text, numbers = published(config_path)
        figures = ", ".join(numbers) if numbers else "none stated"
        lines += [f"Published ({config_path}): {figures} bits/dim. {text}", ""]
    lines.append("| " + " | ".join(_COLUMNS) + " |")
    lines.append("|" + "---|" * len(_COLUMNS))
    lines += ["| " + " | ".join(_row(w, r)) + " |" for w, r in records]
    accountings = sorted({f"{r['estimator']}/{r['dequantization']}: {r['accounting']}"
                          for _, r in records})  # fmt: skip
    if accountings:
        lines += ["", "Accounting:"] + [f"- {a}" for a in accountings]
    return "\n".join(lines) + "\n"


def main(argv):
    workdirs = argv[1:]
    if not workdirs:
        raise app.UsageError("Name at least one workdir: python -m vdm.collect WORKDIR ...")
    try:
        text = table(read_records(workdirs), FLAGS.config)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        sys.exit(f"vdm.collect: {err}")
    print(text, end="")
    if FLAGS.output:
        Path(FLAGS.output).write_text(text)


if __name__ == "__main__":
    app.run(main)
