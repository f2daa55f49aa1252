"""Compile time and train-step time of the VDM U-Net, unrolled vs nn.scan, on the local device.

Why: unrolled, XLA compiles every one of the 2 n_layers + 3 ResNet blocks separately, so
compile time grows with depth; model.scan compiles one down block and one up block. On XLA:CPU
a scan was seen to select a slow convolution layout, so the step time must be measured too.

The step is forward + backward of a mean-squared error against random targets (dropout on),
jitted; compile time is `lower(...).compile()`, step time the median over a few steps after one
warm-up, each ended by block_until_ready. Parameters are random draws in the shapes from
jax.eval_shape (a real init would cost another compile and change nothing timed here).

Usage, from the repository root:
  python -m experiments.bench_scan_compile [--layers=8,16,32] [--n_embd=32] [--batch=2]
      [--steps=5] [--max_step_s=20] [--out=FILE]
Prints a Markdown table and writes it to --out (experiments/results/scan_compile.md).
"""

import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vdm import nets, runtime
from vdm.config_defaults import base_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scan_compile.md")

flags.DEFINE_list("layers", ["8", "16", "32"], "n_layers values to compare, comma-separated.")
flags.DEFINE_integer("n_embd", 32, "Channels of the U-Net.")
flags.DEFINE_integer("batch", 2, "Batch size of the timed step.")
flags.DEFINE_integer("steps", 5, "Timed steps per configuration (after one warm-up).")
flags.DEFINE_float("max_step_s", 20.0, "Time cap for the timed steps (at least two are timed).")
flags.DEFINE_string("out", RESULTS, "Markdown file to write the table to.")
flags.register_validator(
    "layers",
    lambda v: bool(v) and all(s.isdigit() and int(s) > 0 for s in v),
    "--layers must be a comma-separated list of positive integers.",
)
FLAGS = flags.FLAGS


def build(n_layers: int, n_embd: int, scan: bool):
    cfg = base_config().model
    cfg.update(n_layers=n_layers, n_embd=n_embd, norm_groups=8, dropout=0.1, scan=scan)
    return nets.build_network(cfg, gamma_min=-13.3, gamma_max=5.0)


def random_params(model, z, gamma_t, seed: int = 0):
    shapes = jax.eval_shape(model.init, jax.random.key(0), z, gamma_t)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)


def measure(n_layers: int, n_embd: int, batch: int, scan: bool, steps: int, max_step_s: float):
    """Returns a dict of timings (seconds) for one configuration."""
    model = build(n_layers, n_embd, scan)
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    target = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
    gamma_t = jnp.linspace(-10.0, 4.0, batch)
    params = random_params(model, z, gamma_t)

    def loss(params, key):
        pred = model.apply({"params": params}, z, gamma_t, train=True, rngs={"dropout": key})
        return jnp.mean(jnp.square(pred - target))

    step = jax.jit(jax.value_and_grad(loss))
    key = jax.random.key(2)
    start = time.perf_counter()
    lowered = step.lower(params, key)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    jax.block_until_ready(compiled(params, key))  # warm-up
    times = []
    budget_end = time.perf_counter() + max_step_s
    while len(times) < steps and (len(times) < 2 or time.perf_counter() < budget_end):
        key = jax.random.fold_in(key, len(times))
        tick = time.perf_counter()
        jax.block_until_ready(compiled(params, key))
        times.append(time.perf_counter() - tick)
    return {
        "params": nets.count_params(params),
        "trace_lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "step_s": statistics.median(times),
        "steps_timed": len(times),
    }


def markdown(rows, *, batch: int, n_embd: int) -> str:
    header = (
        f"# VDM U-Net: compile and step time, unrolled vs nn.scan\n\n"
        f"{datetime.date.today()}, {platform.machine()} with {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {batch}, 32x32x3, "
        f"n_embd {n_embd}, GroupNorm(8), dropout 0.1. Step = forward + backward of an "
        f"MSE, jitted, median over the timed steps after one warm-up. The machine is shared, so "
        f"timings are noisy (about +-10%).\n\n"
        "| n_layers | variant | params | trace+lower (s) | compile (s) | step (ms) | steps |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['n_layers']} | {r['variant']} | {r['params']:,} | {r['trace_lower_s']:.2f} | "
        f"{r['compile_s']:.2f} | {1000 * r['step_s']:.0f} | {r['steps_timed']} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    rows = []
    for n_layers in [int(n) for n in FLAGS.layers]:
        for variant in ("unrolled", "scan"):
            result = measure(
                n_layers,
                FLAGS.n_embd,
                FLAGS.batch,
                variant == "scan",
                FLAGS.steps,
                FLAGS.max_step_s,
            )
            rows.append({"n_layers": n_layers, "variant": variant, **result})
            print(f"done: n_layers {n_layers} {variant} {result}", flush=True)
    table = markdown(rows, batch=FLAGS.batch, n_embd=FLAGS.n_embd)
    print(table)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        f.write(table)


if __name__ == "__main__":
    runtime.setup()  # tcmalloc and XLA:CPU flags, as `python -m vdm.main` runs
    app.run(main)
