"""Input pipeline under one and several processes (issue 14, target 4): host time spent reading
and placing each step's batch, against the step itself, with 1 and with 2 localhost processes.

Run from the repository root:

  python -m experiments.bench_input                      # digits default, 1 and 2 processes
  python -m experiments.bench_input --steps=200 --set=data.batch_size=256 --out=''

Every process count trains the same config for --steps steps through `python -m vdm.main`
(the real loop and data pipeline; with P > 1, P processes joined by jax.distributed on
127.0.0.1, each loading its 1/P of the global batch). The loop logs, at every log step,
`train/input_ms` (this host's seconds reading and placing batches, per step) and clu's
`steps_per_sec`; the figures here are process 0's medians over the log windows after the
first (which holds compilation). The input pipeline stalls the step only when input_ms
exceeds the step time, because steps are dispatched asynchronously. Localhost processes share
this machine's cores, so the step time is not a multi-host speed-up; what the table shows is
the per-host loading cost as the global batch is split. Writes --out.md and --out.json.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments.bench.runs import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined only when run as a script, as in experiments/soak)."""
    flags.DEFINE_string("config", os.path.join(REPO, "configs", "digits.py"), "Config file.")
    flags.DEFINE_list("processes", ["1", "2"], "Process counts to measure.")
    flags.DEFINE_integer("steps", 100, "Training steps per process count.")
    flags.DEFINE_integer("log_every", 20, "train.log_every: the windows the medians are over.")
    flags.DEFINE_multi_string("set", [], "Further config overrides KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "Where the runs go (default: a temporary directory).")
    flags.DEFINE_integer("timeout_s", 1800, "Limit for one process count's launch.")
    flags.DEFINE_string(
        "out", os.path.join(REPO, "experiments", "results", "input_pipeline"), "Output stem."
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num: int, workdir: str, config: str, steps: int, log_every: int, sets, timeout_s):
    """Trains `config` with `num` processes in `workdir`; returns their exit codes and the
    wall seconds of the whole launch."""
    os.makedirs(workdir, exist_ok=True)
    base = [
        sys.executable, "-m", "vdm.main", f"--config={config}", f"--workdir={workdir}",
        "--tensorboard=false", f"--config.train.num_steps={steps}",
        f"--config.train.log_every={log_every}", f"--config.train.eval_every={steps}",
        f"--config.train.ckpt_every={steps}",
        *[f"--config.{s}" for s in sets],
    ]  # fmt: skip
    extra = [[] for _ in range(num)]
    if num > 1:
        port = _free_port()
        extra = [
            [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num}",
             f"--process_id={i}"]
            for i in range(num)
        ]  # fmt: skip
    start = time.perf_counter()
    procs = []
    for i in range(num):
        log = open(os.path.join(workdir, f"proc{i}.log"), "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([*base, *extra[i]], cwd=REPO, stdout=log, stderr=log), log))
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=timeout_s))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    return codes, time.perf_counter() - start


def summarise(workdir: str, num: int, wall_s: float) -> dict:
    """Process 0's medians over the log windows after the first (see the module docstring)."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    first = min(r["step"] for r in records if "train/input_ms" in r)
    input_ms = [r["train/input_ms"] for r in records if "train/input_ms" in r and r["step"] > first]
    rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
    if not input_ms or len(rates) < 2:
        raise SystemExit(f"{workdir}: too few log windows; raise --steps or lower --log_every")
    step_ms = 1e3 / statistics.median(rates[1:])
    med_input = statistics.median(input_ms)
    return {
        "processes": num,
        "input_ms_per_step": med_input,
        "step_ms": step_ms,
        "input_share": med_input / step_ms,
        "stalls": med_input > step_ms,
        "windows": len(input_ms),
        "wall_s": wall_s,
    }


def report(rows: list[dict], command: str, config: str) -> str:
    lines = [
        "# Input pipeline with 1 and several localhost processes\n",
        f"Machine: {machine()}. Config: {os.path.relpath(config, REPO)}. Command: `{command}`\n",
        "| processes | input ms/step (process 0) | step ms | input / step | stalls the step |"
        " log windows | launch wall s |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['input_ms_per_step']:.2f} | {r['step_ms']:.1f} | "
            f"{100 * r['input_share']:.1f}% | {'yes' if r['stalls'] else 'no'} | "
            f"{r['windows']} | {r['wall_s']:.1f} |"
        )
    lines.append(
        "\nInput ms: host time per step reading and placing this process's share of the global "
        "batch (the loop's `train/input_ms`); step ms: 1000 / clu's steps_per_sec. Medians over "
        "the log windows after the first. Localhost processes share the machine's cores."
    )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="vdm-bench-input-")
    config = os.path.abspath(FLAGS.config)
    rows = []
    for num in [int(p) for p in FLAGS.processes]:
        workdir = os.path.join(root, f"p{num}")
        codes, wall = launch(
            num, workdir, config, FLAGS.steps, FLAGS.log_every, FLAGS.set, FLAGS.timeout_s
        )
        if any(codes):
            tail = open(os.path.join(workdir, "proc0.log")).read()[-3000:]
            raise SystemExit(f"{num} processes: exit codes {codes}\n{tail}")
        rows.append(summarise(workdir, num, wall))
    command = "python -m experiments.bench_input " + " ".join(sys.argv[1:])
    text = report(rows, command.strip(), config)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out + ".md", "w") as f:
            f.write(text)
        with open(FLAGS.out + ".json", "w") as f:
            json.dump({"machine": machine(), "command": command, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
