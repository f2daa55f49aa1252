"""float32 vs bfloat16 convolution and matmul speed under XLA:CPU flag settings (issue 14).

XLA_FLAGS only take effect before JAX's backend starts, so every setting runs in its own
subprocess; the settings are run in turn, `--rounds` times round-robin, and each figure is
quoted as GFLOP/s and as a ratio to the same process's float32 figure of the same op (the ratio
is what survives a shared machine's load).

  python -m experiments.bench_cpu_flags                    # all SETTINGS, 2 rounds
  python -m experiments.bench_cpu_flags --settings=project,default --rounds=3

Ops (jit, median of --steps calls after a warm-up): a 3x3 SAME convolution NHWC
[batch, size, size, channels] -> channels (the reduced U-Net's), its input gradient and
kernel gradient, and a square dot. Dtypes: `f32`; `bf16` (bf16 in, bf16 out, as
model.dtype=bfloat16 computes); `bf16_f32acc` (bf16 in, preferred_element_type=float32).
"""

import json
import os
import statistics
import subprocess
import sys
import time

# name -> XLA_FLAGS of that setting (VDM_XLA_CPU_FLAGS=0 keeps `import vdm` from adding its own).
SETTINGS = {
    "project": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "default": "",
    "no_ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot",
    "onednn": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
    "--xla_cpu_use_onednn=true",
    "onednn_dot": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot "
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_dot": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot "
    "--xla_cpu_experimental_xnn_fusion_type=dot",
}
DTYPES = ("f32", "bf16", "bf16_f32acc")


def _child(args) -> dict:
    """Runs the ops in this process (XLA_FLAGS already set) and returns GFLOP/s per op/dtype."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    batch, size, ch, n = args["batch"], args["size"], args["channels"], args["dot_n"]

    def conv(acc):
        def f(x, w):
            return lax.conv_general_dilated(
                x,
                w,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=acc,
            )

        return f

    def timed(fn, *a):
        fn(*a).block_until_ready()
        ts = []
        for _ in range(args["steps"]):
            t = time.perf_counter()
            fn(*a).block_until_ready()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    out = {}
    conv_flops = 2.0 * batch * size * size * 9 * ch * ch
    key = jax.random.key(0)
    for dt in DTYPES:
        in_dt = jnp.float32 if dt == "f32" else jnp.bfloat16
        acc = jnp.float32 if dt == "bf16_f32acc" else None
        f = conv(acc)
        x = jax.random.normal(key, (batch, size, size, ch)).astype(in_dt)
        w = (0.05 * jax.random.normal(key, (3, 3, ch, ch))).astype(in_dt)
        g = jax.random.normal(key, (batch, size, size, ch)).astype(acc or in_dt)
        fns = {
            "conv_fwd": (jax.jit(f), (x, w)),
            "conv_dx": (jax.jit(lambda x, w, g, f=f: jax.vjp(f, x, w)[1](g)[0]), (x, w, g)),
            "conv_dw": (jax.jit(lambda x, w, g, f=f: jax.vjp(f, x, w)[1](g)[1]), (x, w, g)),
        }
        for op, (fn, a) in fns.items():
            out[f"{op}/{dt}"] = conv_flops / timed(fn, *a) / 1e9
        a = jax.random.normal(key, (n, n)).astype(in_dt)
        b = jax.random.normal(jax.random.key(1), (n, n)).astype(in_dt)
        dot = jax.jit(lambda a, b, acc=acc: jnp.dot(a, b, preferred_element_type=acc))
        out[f"dot/{dt}"] = 2.0 * n**3 / timed(dot, a, b) / 1e9
    return out


def run_setting(name: str, args: dict) -> dict:
    """One subprocess under SETTINGS[name]; its figures, or {'error': ...} if it failed."""
    env = dict(os.environ, XLA_FLAGS=SETTINGS[name], VDM_XLA_CPU_FLAGS="0")
    cmd = [sys.executable, "-m", "experiments.bench_cpu_flags", "--child", json.dumps(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    opts = dict(a.lstrip("-").split("=", 1) for a in argv if "=" in a)
    names = opts.get("settings", ",".join(SETTINGS)).split(",")
    args = {
        "batch": int(opts.get("batch", 32)),
        "size": int(opts.get("size", 32)),
        "channels": int(opts.get("channels", 64)),
        "dot_n": int(opts.get("dot_n", 2048)),
        "steps": int(opts.get("steps", 5)),
    }
    rounds = int(opts.get("rounds", 2))
    results = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            rec = run_setting(name, args)
            results[name].append(rec)
            print(f"round {r} {name}: {json.dumps(rec)}", flush=True)
    ops = ("conv_fwd", "conv_dx", "conv_dw", "dot")
    print(f"\nGFLOP/s, median over {rounds} rounds (ratio to the same run's f32), {args}")
    print("| setting | " + " | ".join(f"{o} {d}" for o in ops for d in DTYPES) + " |")
    print("|---|" + "---:|" * (len(ops) * len(DTYPES)))
    for name in names:
        good = [r for r in results[name] if "error" not in r]
        if not good:
            print(f"| {name} | failed: {results[name][0]['error']} |")
            continue
        cells = []
        for o in ops:
            for d in DTYPES:
                med = statistics.median(r[f"{o}/{d}"] for r in good)
                rat = statistics.median(r[f"{o}/{d}"] / r[f"{o}/f32"] for r in good)
                cells.append(f"{med:.0f}" if d == "f32" else f"{med:.0f} ({rat:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "out" in opts:
        with open(opts["out"], "w") as f:
            json.dump({"args": args, "settings": SETTINGS, "results": results}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        main(sys.argv[1:])
