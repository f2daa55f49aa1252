"""Compile time and train-step time of the VDM U-Net, unrolled vs nn.scan, on the local device.

Why: unrolled, XLA compiles every one of the 2 n_layers + 3 ResNet blocks separately, so
compile time grows with depth; model.scan compiles one down block and one up block. On XLA:CPU
a scan was seen to select a slow convolution layout, so the step time must be measured too.

The step is forward + backward of a mean-squared error against random targets (dropout on),
jitted; compile time is `lower(...).compile()`, step time the median over a few steps after one
warm-up, each ended by block_until_ready. Parameters are random draws in the shapes from
jax.eval_shape (a real init would cost another compile and change nothing timed here).

Usage:
  python experiments/bench_scan_compile.py [--layers 8 16 32] [--n_embd 32] [--batch 2]
Prints a Markdown table and writes it to experiments/results/scan_compile.md.
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdm import nets
from vdm.config_defaults import base_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scan_compile.md")


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


def markdown(rows, args) -> str:
    header = (
        f"# VDM U-Net: compile and step time, unrolled vs nn.scan\n\n"
        f"{datetime.date.today()}, {platform.machine()} with {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch}, 32x32x3, "
        f"n_embd {args.n_embd}, GroupNorm(8), dropout 0.1. Step = forward + backward of an "
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--n_embd", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max_step_s", type=float, default=20.0, help="time cap for timed steps")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    rows = []
    for n_layers in args.layers:
        for variant in ("unrolled", "scan"):
            result = measure(
                n_layers, args.n_embd, args.batch, variant == "scan", args.steps, args.max_step_s
            )
            rows.append({"n_layers": n_layers, "variant": variant, **result})
            print(f"done: n_layers {n_layers} {variant} {result}", flush=True)
    table = markdown(rows, args)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)


if __name__ == "__main__":
    from vdm import runtime

    runtime.setup()  # tcmalloc and XLA:CPU flags, as `python -m vdm.main` runs
    main()
