"""A table of every likelihood record in one or more workdirs, next to the published numbers.

  python -m vdm.collect runs/cifar10 --config=configs/cifar10.py
  python -m vdm.collect runs/a runs/b --output=results.md

Reads workdir/eval/*.json (written by `--mode=eval`, vdm/run/eval_records.py) and prints one
markdown row per record: step, estimator, dequantisation, what is estimated (-log p(x|y) or
-log p(x)), bits/dim with its standard error, examples, draws, solver steps, split and EMA,
then each record's accounting line once. With --config, the numbers the config's docstring
states (its first paragraph, e.g. "2.65 bits/dim") are printed above the table for comparison.
"""

import json
import sys
from pathlib import Path

from absl import app, flags

from vdm.run import eval_table

flags.DEFINE_string("config", None, "Config file whose docstring states the published numbers.")
flags.DEFINE_string("output", None, "Also write the table to this file.")
FLAGS = flags.FLAGS


def main(argv):
    workdirs = argv[1:]
    if not workdirs:
        raise app.UsageError("Name at least one workdir: python -m vdm.collect WORKDIR ...")
    try:
        text = eval_table.table(eval_table.read_records(workdirs), FLAGS.config)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        sys.exit(f"vdm.collect: {err}")
    print(text, end="")
    if FLAGS.output:
        Path(FLAGS.output).write_text(text)


if __name__ == "__main__":
    app.run(main)
