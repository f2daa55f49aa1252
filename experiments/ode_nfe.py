"""PF-ODE likelihood of the digits checkpoint integrated in t vs in log-SNR: steps and bits/dim.

Why: the ODE NLL's cost is its adaptive solver's steps (each a few network evaluations with a
vector-Jacobian product). In gamma = -log SNR time gamma'(t) drops out of the velocity, so a
schedule whose slope varies is not the solver's problem; this measures whether that saves
steps at equal bits/dim on a real (learned-schedule) checkpoint.

Each (time, rtol) runs `python -m vdm.main --mode=eval --config.eval.estimator=ode` on a fresh
copy of the checkpoint (records never resume from each other) and reads its eval record.

Usage, from the repository root:
  python -m experiments.ode_nfe [--ckpt=/work/assets/qs_digits] [--examples=16]
      [--rtols=1e-2,1e-3] [--out=experiments/results/ode_nfe.md]
"""

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("ckpt", "/work/assets/qs_digits", "Trained digits workdir (read only).")
flags.DEFINE_integer("examples", 16, "eval.max_examples.")
flags.DEFINE_list("rtols", ["1e-2", "1e-3"], "Solver tolerances (rtol = atol).")
flags.DEFINE_string("out", "experiments/results/ode_nfe.md", "Markdown output.")
FLAGS = flags.FLAGS

# Tsit5 is first-same-as-last: about 6 velocity evaluations per (accepted or rejected) step.
EVALS_PER_STEP = 6


def one(time_var: str, rtol: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "w")
        shutil.copytree(FLAGS.ckpt, work)
        shutil.rmtree(os.path.join(work, "eval"), ignore_errors=True)
        cmd = [sys.executable, "-m", "vdm.main", "--config=configs/digits.py",
               f"--workdir={work}", "--mode=eval", "--config.eval.estimator=ode",
               f"--config.eval.max_examples={FLAGS.examples}",
               f"--config.eval.ode.time={time_var}", f"--config.eval.ode.rtol={rtol}",
               f"--config.eval.ode.atol={rtol}"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        (path,) = glob.glob(os.path.join(work, "eval", "*-ode-*.json"))
        rec = json.load(open(path))
    return {"time": time_var, "rtol": rtol, "bpd": rec["bpd"], "se": rec["bpd_stderr"],
            "steps": rec["num_steps_mean"], "wall_s": wall}  # fmt: skip


def main(argv):
    del argv
    rows = [one(tv, r) for r in FLAGS.rtols for tv in ("t", "log_snr")]
    cpu = platform.processor() or platform.machine()
    lines = [
        f"# PF-ODE NLL of {FLAGS.ckpt}: time variable t vs log-SNR",
        "",
        f"{FLAGS.examples} eval examples, decoder dequantisation, Hutchinson trace (1 "
        f"Rademacher probe), tsit5, rtol = atol; {cpu}, {os.cpu_count()} cores, shared and "
        "loaded. Steps are the adaptive solver's (accepted + rejected) per batch; NFE ~ "
        f"{EVALS_PER_STEP} x steps velocity+VJP evaluations.",
        "",
        "| time | rtol | steps | ~NFE | bits/dim | stderr | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['time']} | {r['rtol']} | {r['steps']:.0f} | "
                     f"{EVALS_PER_STEP * r['steps']:.0f} | {r['bpd']:.4f} | {r['se']:.4f} | "
                     f"{r['wall_s']:.0f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    with open(FLAGS.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
