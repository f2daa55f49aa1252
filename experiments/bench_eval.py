"""ELBO evaluation throughput A/B in one process (issue 14, target 2): key implementation,
eval batch size, compute dtype and attention form, on the benchmark's reduced U-Net.

  python -m experiments.bench_eval                      # all CASES, 2 rounds
  python -m experiments.bench_eval --cases=base,rbg --rounds=3 --out=/tmp/eval.json

Every case is compiled first; then the cases are timed round-robin (`--rounds` times, each a
median of `--calls` calls), so load on a shared machine hits them alike. Figures: images/s
(median over rounds), its ratio to the `base` case of the same round, and the bits/dim of one
fixed 64-image batch against `base`'s.

"Trained-like" parameters: the fresh network's zero-initialised output layers make every
network output 0, which would hide any dtype error; so each model parameter gets
N(0, 0.02^2) noise added (fixed seed), which makes the prediction depend on every layer.
"""

import json
import statistics
import sys
import time

import jax
import numpy as np

from experiments.bench import configs
from experiments.bench.costs import random_batch
from vdm import parallel, runtime
from vdm.run.setup import KeyStream, build_run

# name -> (config overrides, key implementation of the eval draws, eval batch size)
CASES = {
    "base": ({}, "threefry2x32", 64),
    "rbg": ({}, "rbg", 64),
    "unsafe_rbg": ({}, "unsafe_rbg", 64),
    "batch128": ({}, "threefry2x32", 128),
    "batch256": ({}, "threefry2x32", 256),
    "deferred": ({"model.attention": "deferred_norm"}, "threefry2x32", 64),
    "bf16": ({"model.dtype": "bfloat16"}, "threefry2x32", 64),
    "bf16_rbg_256": ({"model.dtype": "bfloat16"}, "rbg", 256),
}
SEED = 0
CHECK_BATCH = 64


def eval_key(impl: str) -> jax.Array:
    """The EVAL stream's root key (vdm/run/setup.py root_key) under a key implementation."""
    return jax.random.fold_in(jax.random.key(SEED, impl=impl), int(KeyStream.EVAL))


def trained_like(params, scale: float = 0.02):
    leaves, tree = jax.tree.flatten(params["model"])
    rng = np.random.default_rng(1)
    noisy = [x + scale * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    return {**params, "model": jax.tree.unflatten(tree, noisy)}


def build_case(name: str, params=None):
    overrides, impl, batch_size = CASES[name]
    cfg = configs.with_overrides(configs.get_config(), overrides)
    run = build_run(cfg)
    if params is None:
        params = trained_like(run.init_state().params)
    fn = jax.jit(lambda p, b, k: run.model.loss_terms(p, b, k, train=False)["bpd"])
    local = random_batch(run, batch_size, seed=1)
    batch = parallel.global_batch(local, run.mesh)
    check = parallel.global_batch({k: v[:CHECK_BATCH] for k, v in local.items()}, run.mesh)
    key = eval_key(impl)
    tick = time.perf_counter()
    fn(params, batch, key).block_until_ready()
    first = time.perf_counter() - tick
    bpd = fn(params, check, key)
    return params, {
        "fn": fn,
        "batch": batch,
        "key": key,
        "n": batch_size,
        "first_call_s": first,
        "bpd": np.asarray(bpd, np.float64),
        "impl": impl,
    }


def main(argv) -> None:
    opts = dict(a.lstrip("-").split("=", 1) for a in argv if "=" in a)
    names = opts.get("cases", ",".join(CASES)).split(",")
    if names[0] != "base":
        names = ["base", *names]
    rounds, calls = int(opts.get("rounds", 2)), int(opts.get("calls", 3))
    params, built = None, {}
    for name in names:
        params, built[name] = build_case(name, params)
        print(f"built {name}: first call {built[name]['first_call_s']:.1f} s", flush=True)
    rates = {n: [] for n in names}
    ratios = {n: [] for n in names}
    for r in range(rounds):
        this = {}
        for name in names:
            c = built[name]
            c["fn"](params, c["batch"], c["key"]).block_until_ready()
            ts = []
            for _ in range(calls):
                tick = time.perf_counter()
                c["fn"](params, c["batch"], c["key"]).block_until_ready()
                ts.append(time.perf_counter() - tick)
            this[name] = c["n"] / statistics.median(ts)
            rates[name].append(this[name])
        for name in names:
            ratios[name].append(this[name] / this["base"])
        print(f"round {r}: " + ", ".join(f"{n} {v:.1f}/s" for n, v in this.items()), flush=True)
    base = built["base"]
    rows = {}
    print(f"\nELBO eval, reduced U-Net, {rounds} rounds x median of {calls} calls")
    print("| case | key impl | batch | images/s | vs base | mean bpd - base (64 images) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        c = built[name]
        same_draws = c["impl"] == base["impl"]
        diff = float(np.mean(c["bpd"]) - np.mean(base["bpd"]))
        max_diff = float(np.max(np.abs(c["bpd"] - base["bpd"]))) if same_draws else None
        rows[name] = {
            "impl": c["impl"],
            "batch": c["n"],
            "images_per_s": statistics.median(rates[name]),
            "ratio": statistics.median(ratios[name]),
            "rates": rates[name],
            "mean_bpd": float(np.mean(c["bpd"])),
            "mean_bpd_diff": diff,
            "max_abs_bpd_diff_per_example": max_diff,
        }
        note = "" if same_draws else " (other draws)"
        print(
            f"| {name} | {c['impl']} | {c['n']} | {rows[name]['images_per_s']:.1f} | "
            f"{rows[name]['ratio']:.2f}x | {diff:+.2e}{note} |"
        )
    if "out" in opts:
        with open(opts["out"], "w") as f:
            json.dump({"cases": {n: CASES[n] for n in names}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    runtime.setup()
    main(sys.argv[1:])
