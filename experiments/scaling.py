"""Train-step time vs number of devices (issue 14, target 4), on simulated CPU devices.

  python -m experiments.scaling                       # 1, 2, 4, 8 devices, the reduced U-Net
  python -m experiments.scaling --devices=1,8 --steps=2 --config.model.n_layers=2

Each device count runs in its own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N (plus the project's XLA:CPU flag), so the
data-parallel step is compiled for an N-device mesh (the batch split over devices, gradients
all-reduced) exactly as on N real devices. Simulated devices share this machine's cores: the
table shows the communication pattern's overhead (compile time, collectives, per-device
dispatch), not a speed-up. Writes experiments/results/scaling.md (and .json) unless --out is
empty.
"""

import json
import os
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "bench", "configs.py"), "Config file; default: the reduced U-Net."
)
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Simulated device counts.")
flags.DEFINE_integer("steps", 3, "Timed train steps per device count (after one warm-up).")
flags.DEFINE_string("out", os.path.join(HERE, "results", "scaling"), "Output stem ('' = none).")
flags.DEFINE_string("child", "", "Internal: run one device count and print its JSON record.")
FLAGS = flags.FLAGS


def child() -> dict:
    """This process's device count: compile and time the config's train step."""
    import statistics
    import time

    import jax

    from experiments.bench.costs import compile_train, memory_of

    c = compile_train(FLAGS.config)
    holder = [c.state]

    def step():
        holder[0], metrics = c.compiled(holder[0], c.batch, c.key)
        jax.block_until_ready(metrics)
        return metrics

    metrics = step()  # warm-up
    times = []
    for _ in range(FLAGS.steps):
        tick = time.perf_counter()
        metrics = step()
        times.append(time.perf_counter() - tick)
    loss = {k: float(v) for k, v in metrics.items() if k in ("train/loss", "train/bpd")}
    return {
        "devices": jax.device_count(),
        "compile_s": c.compile_s,
        "step_s": statistics.median(times),
        "times": times,
        "metrics": loss,
        **memory_of(c.compiled),
    }


def main(argv):
    del argv
    if FLAGS.child:
        print("RECORD " + json.dumps(child()), flush=True)
        return
    from experiments.bench.runs import machine
    from vdm import runtime

    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--devices", "--out"))]
    rows = []
    for n in FLAGS.devices:
        flags_env = os.environ.get("XLA_FLAGS", "")
        env = dict(
            os.environ,
            XLA_FLAGS=f"{flags_env} --xla_force_host_platform_device_count={int(n)}".strip(),
        )
        env["XLA_FLAGS"] = runtime.xla_flags(env["XLA_FLAGS"], _jaxlib_version())
        cmd = [sys.executable, "-m", "experiments.scaling", f"--child={n}", *passthrough]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{n} devices failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RECORD ") :]))
        print(f"{n} devices: {rows[-1]}", flush=True)
    cfg = FLAGS.config
    m = cfg.model
    head = (
        f"# Train-step time vs simulated CPU devices\n\n"
        f"Machine: {machine()}; all devices simulated on its cores "
        f"(`--xla_force_host_platform_device_count`), so this is the data-parallel program's "
        f"overhead, not a speed-up. Model {m.type} n_embd={m.n_embd} n_layers={m.n_layers}, "
        f"global batch {cfg.data.batch_size}, {FLAGS.steps} timed steps (median) after one "
        f"warm-up, one subprocess per row, run one after another on a shared machine.\n\n"
        f"Command: `python -m experiments.scaling {' '.join(sys.argv[1:])}`\n\n"
    )
    table = [
        "| devices | per-device batch | compile s | step s | vs 1 device | temp MiB | "
        "last step's metrics |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = rows[0]["step_s"]
    for r in rows:
        temp = r.get("temp_bytes")
        table.append(
            f"| {r['devices']} | {cfg.data.batch_size // r['devices']} | {r['compile_s']:.1f} | "
            f"{r['step_s']:.2f} | {r['step_s'] / base:.2f}x | "
            f"{temp / 2**20 if temp else float('nan'):.0f} | "
            + ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
            + " |"
        )
    text = head + "\n".join(table) + "\n"
    print(text)
    if FLAGS.out:
        with open(FLAGS.out + ".md", "w") as f:
            f.write(text)
        with open(FLAGS.out + ".json", "w") as f:
            json.dump({"command": sys.argv, "machine": machine(), "rows": rows}, f, indent=1)


def _jaxlib_version() -> str:
    import jaxlib.version

    return jaxlib.version.__version__


if __name__ == "__main__":
    app.run(main)
