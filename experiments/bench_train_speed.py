"""Train-step speed of the reduced VDM U-Net before and after the speed switches, A/B in one run.

  python -m experiments.bench_train_speed                        # every SETTING, 2 rounds
  python -m experiments.bench_train_speed --settings=before_glibc,after_mimalloc --rounds=3
  python -m experiments.bench_train_speed --set=model.attention=deferred_norm   # on top of all

A setting is a set of process switches (environment variables read before JAX starts: the
allocator vdm/runtime.py preloads, its Threefry lowering) and config overrides
(model.skip_join, model.fused_norm_swish), so every setting runs in its own subprocess, the
settings in turn, `--rounds` times round-robin.
The first setting listed is the reference: each figure is also given as the speed-up over it
within the same round, which is what survives a shared machine's drift.

Each child builds the benchmark's reduced U-Net (experiments/bench/configs.py: 64 channels,
8 layers, batch 32, 32x32x3, float32, dropout 0.1), takes the first train step from the same
fresh state, batch and key and reports its loss and gradient norm (the switches claim the same
random bits and the same function, so these must agree to float rounding across settings),
then times `--steps` steps (each followed by a matmul, as experiments.benchmark does) and the
ELBO evaluation at the config's eval batch. The allocator column is what the child really
loaded (a setting that names one that is not installed runs on glibc, and says so).

Writes `--out`.json (every figure and the environment) and `--out`.md (the table).
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (environment, config overrides). "before" is the network as it was before this
# change (up blocks on the concatenated skip) with jax's rolled Threefry lowering; glibc is
# what a pip-only machine ran then. "after" adds the split skips, "threefry" the unrolled
# lowering (vdm/runtime.py item 4), and "after_mimalloc_threefry" is today's default on a
# pip-only machine. Each names its Threefry lowering, so the table keeps its meaning whatever
# the default.
BEFORE = {"model.skip_join": "concat", "model.fused_norm_swish": False}
ROLLED = {"VDM_THREEFRY_UNROLLED": "0"}
UNROLLED = {"VDM_THREEFRY_UNROLLED": "1"}
DEFAULT_ENV = {**UNROLLED, "VDM_ALLOCATOR": "mimalloc"}  # today's default on a pip-only machine
KEEP_EXPANDER = {"XLA_FLAGS": "--xla_disable_hlo_passes=none"}
SETTINGS = {
    "before_glibc": ({**ROLLED, "VDM_ALLOCATOR": "system"}, BEFORE),
    "before_tcmalloc": ({**ROLLED, "VDM_ALLOCATOR": "tcmalloc"}, BEFORE),
    "after_glibc": ({**ROLLED, "VDM_ALLOCATOR": "system"}, {}),
    "after_tcmalloc": ({**ROLLED, "VDM_ALLOCATOR": "tcmalloc"}, {}),
    "after_mimalloc": ({**ROLLED, "VDM_ALLOCATOR": "mimalloc"}, {}),
    "after_mimalloc_threefry": (DEFAULT_ENV, {}),
    "after_tcmalloc_threefry": ({**UNROLLED, "VDM_ALLOCATOR": "tcmalloc"}, {}),
    # model.remat, and XLA:CPU's barrier expander left on (a user's own
    # --xla_disable_hlo_passes replaces vdm/runtime.py's; no pass is named "none").
    "remat": (DEFAULT_ENV, {"model.remat": True}),
    "keep_barrier_expander": ({**DEFAULT_ENV, **KEEP_EXPANDER}, {}),
    "remat_keep_barrier_expander": ({**DEFAULT_ENV, **KEEP_EXPANDER}, {"model.remat": True}),
    # Today's default less the fused swish(GroupNorm): that switch alone.
    "unfused_norm_swish": (DEFAULT_ENV, {"model.fused_norm_swish": False}),
}

flags.DEFINE_list("settings", list(SETTINGS), "Settings to run; the first is the reference.")
flags.DEFINE_integer("rounds", 2, "Round-robin passes over the settings.")
flags.DEFINE_integer("steps", 4, "Timed train steps per child (after the first, untimed one).")
flags.DEFINE_float("budget_s", 40.0, "Stop timing a child's steps after this long (>= 2 steps).")
flags.DEFINE_multi_string("set", [], "key=value config override applied to every setting.")
flags.DEFINE_string("out", os.path.join(HERE, "results", "train_speed"), "Output path stem.")
flags.DEFINE_string("child", "", "Internal: run one setting (JSON) in this process.")
FLAGS = flags.FLAGS


def _parse(value: str):
    # Command-line override values: bools, ints, floats, else the string.
    if value in ("True", "False", "true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def child(overrides: dict, steps: int, budget_s: float) -> dict:
    """One setting in this process: first-step loss, timed steps, ELBO evaluation."""
    import jax

    from experiments.bench import configs, costs, throughput, timing
    from vdm import runtime

    config = configs.with_overrides(configs.get_config(), overrides)
    c = costs.compile_train(config)
    holder = [c.state]

    def step():
        # The state is donated: thread it through so every call sees a live buffer.
        holder[0], metrics = c.compiled(holder[0], c.batch, c.key)
        return jax.block_until_ready(metrics)

    first = step()  # also the warm-up
    times, peaks = timing.paired_with_matmul(step, steps=steps, budget_s=budget_s)
    flops = costs.flops_of(c.compiled)
    evaluation = throughput.measure_eval(c.run, holder[0].params, steps=3, budget_s=budget_s)
    step_s = statistics.median(times)
    return {
        "allocator": runtime.loaded_allocator(),
        "threefry_unrolled": "while"
        not in jax.jit(lambda k: jax.random.bits(k, (8,))).lower(jax.random.key(0)).as_text(),
        "compile_s": c.compile_s,
        "first_loss": float(first["train/loss"]),
        "first_grad_norm": float(first["train/grad_norm"]),
        "step_s": step_s,
        "steps_timed": len(times),
        "images_per_s": config.data.batch_size / step_s,
        "fraction_of_matmul": statistics.median(
            flops / t / p for t, p in zip(times, peaks, strict=True)
        )
        if flops
        else None,
        "eval_images_per_s": evaluation["images_per_s"],
        **costs.memory_of(c.compiled),
    }


def run_setting(name: str, common: dict) -> dict:
    """One subprocess under SETTINGS[name] (+ the common overrides); its record or an error."""
    env_vars, overrides = SETTINGS[name]
    spec = json.dumps({"overrides": {**overrides, **common}})
    cmd = [sys.executable, "-m", "experiments.bench_train_speed", f"--child={spec}",
           f"--steps={FLAGS.steps}", f"--budget_s={FLAGS.budget_s}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VDM_ALLOCATOR_REEXEC")}
    proc = subprocess.run(cmd, env={**env, **env_vars}, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarise(names: list, results: dict) -> list:
    """Per setting: medians over rounds, and per-round speed-ups over the first setting."""
    ref = names[0]
    rows = []
    for name in names:
        good = [r for r in results[name] if "error" not in r]
        if not good:
            rows.append({"setting": name, "error": results[name][0]["error"]})
            continue
        speedups = [
            base["step_s"] / r["step_s"]
            for r, base in zip(results[name], results[ref], strict=True)
            if "error" not in r and "error" not in base
        ]
        ref_loss = next((r["first_loss"] for r in results[ref] if "error" not in r), None)
        med = lambda key, rs=good: statistics.median(r[key] for r in rs)
        rows.append({
            "setting": name,
            "allocator": good[0]["allocator"],
            "threefry_unrolled": good[0]["threefry_unrolled"],
            "step_s": med("step_s"),
            "step_s_rounds": [r["step_s"] for r in good],
            "speedup_rounds": speedups,
            "speedup": statistics.median(speedups) if speedups else None,
            "fraction_of_matmul": med("fraction_of_matmul"),
            "eval_images_per_s": med("eval_images_per_s"),
            "temp_bytes": good[0].get("temp_bytes"),
            "first_loss": good[0]["first_loss"],
            "loss_diff": abs(good[0]["first_loss"] - ref_loss) if ref_loss is not None else None,
            "first_grad_norm": good[0]["first_grad_norm"],
        })  # fmt: skip
    return rows


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [
        "# Train-step speed before and after the speed switches (issue 14)",
        "",
        f"{env['date']}; {env['cpu']}, {env['cpu_count']} cores, jax {env['jax']}. Reduced VDM "
        f"U-Net (experiments/bench/configs.py: 64 ch, 8 layers, batch 32, 32x32x3, float32, "
        f"dropout 0.1){', overrides ' + str(record['common']) if record['common'] else ''}. "
        f"{record['rounds']} rounds round-robin, one subprocess per setting and round; "
        f"speed-up = the reference's step time / this setting's, in the same round.",
        "",
        f"Command: `{record['command']}`",
        "",
        "| setting | allocator | threefry | step ms (rounds) | speed-up vs "
        f"{record['settings'][0]} (rounds) | of matmul | ELBO images/s | temp MiB | "
        "first-step loss | loss diff |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        if "error" in row:
            lines.append(f"| {row['setting']} | failed: {' '.join(row['error'])[-200:]} |")
            continue
        rounds = ", ".join(f"{t * 1000:.0f}" for t in row["step_s_rounds"])
        ups = ", ".join(f"{s:.2f}" for s in row["speedup_rounds"])
        temp = f"{row['temp_bytes'] / 2**20:,.0f}" if row["temp_bytes"] else "n/a"
        lines.append(
            f"| {row['setting']} | {row['allocator']} | "
            f"{'unrolled' if row['threefry_unrolled'] else 'rolled'} | {rounds} | "
            f"**{row['speedup']:.2f}x** ({ups}) | {row['fraction_of_matmul']:.0%} | "
            f"{row['eval_images_per_s']:.1f} | {temp} | {row['first_loss']:.6f} | "
            f"{row['loss_diff']:.1e} |"
        )
    lines.append("")
    lines.append("Settings (environment; config overrides):")
    for name in record["settings"]:
        env_vars, overrides = SETTINGS[name]
        lines.append(f"- {name}: {env_vars}; {overrides or 'defaults'}")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv):
    del argv
    if FLAGS.child:
        spec = json.loads(FLAGS.child)
        rec = child(spec["overrides"], FLAGS.steps, FLAGS.budget_s)
        print("RESULT " + json.dumps(rec), flush=True)
        return
    unknown = [n for n in FLAGS.settings if n not in SETTINGS]
    if unknown:
        raise app.UsageError(f"Unknown settings {unknown}; choose from {sorted(SETTINGS)}.")
    common = {}
    for item in FLAGS.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set takes key=value, got {item!r}.")
        common[key] = _parse(value)
    names = list(FLAGS.settings)
    results = {n: [] for n in names}
    for r in range(FLAGS.rounds):
        for name in names:
            rec = run_setting(name, common)
            results[name].append(rec)
            print(f"round {r} {name}: {json.dumps(rec)}", flush=True)
    import jax

    record = {
        "command": " ".join(["python", "-m", "experiments.bench_train_speed", *sys.argv[1:]]),
        "environment": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
        },
        "settings": names,
        "common": common,
        "rounds": FLAGS.rounds,
        "results": results,
        "rows": summarise(names, results),
    }
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    table = markdown(record)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(table)
    print(table)
    if any("error" in row for row in record["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    from vdm import runtime

    runtime.setup()  # the allocator re-run and XLA:CPU flags, as `python -m vdm.main` runs
    app.run(main)
