"""Training, evaluation and sampling throughput of a VDM config on the devices JAX sees.

  python experiments/benchmark.py                                     # CPU default, < 5 min
  python experiments/benchmark.py --config=configs/cifar10.py --steps=50 --budget_s=120
  python experiments/benchmark.py --depths=8,16,32 --variants=       # scan compile vs depth
  python experiments/benchmark.py --config.model.conv_grad=patches --variants=f32

For each variant of the config (`--variants`, names in bench_lib.VARIANTS, each a set of config
overrides) it reports the train step's compile time, median step time and images/s, XLA's FLOPs
per step, the achieved FLOP/s and that as a fraction of a dense matmul timed just before it,
and memory (XLA's per-executable analysis; the device's peak where the backend reports one).
For the first variant it also reports ELBO evaluation images/s, per-sampler images/s of the
actual network at `--sample_steps`, and (`--profile`) the share of step time by op category.
`--compile_variants` are compiled but not run (compile time and memory of scan/remat without
minutes of slow CPU steps). `--depths` compiles (without running) the CIFAR-10 network's train
step at those depths, unrolled and scanned. `--ceiling` times a lone 3x3 convolution and its
gradients.

Writes experiments/results/benchmark.json (every figure, with the environment) and
benchmark.md (the tables). Parameters are freshly initialised and batches are random data of the
dataset's shape: throughput does not depend on either.
"""

import datetime
import json
import os
import platform
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402

from experiments import bench_lib  # noqa: E402
from vdm import runtime  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "bench_lib.py"), "Config file[:arg]; default: reduced U-Net."
)
flags.DEFINE_list("variants", ["f32", "patches"], "Variants to time.")
flags.DEFINE_list(
    "compile_variants", ["scan", "remat", "scan_remat"], "Variants only compiled (time, memory)."
)
flags.DEFINE_integer("steps", 5, "Timed train steps per variant (after one warm-up).")
flags.DEFINE_float("budget_s", 30.0, "Stop timing a variant after this long (>= 2 steps).")
flags.DEFINE_list("samplers", ["ancestral", "ddim", "sde", "pc", "ode_euler"], "Samplers.")
flags.DEFINE_integer("sample_steps", 10, "Grid steps per sampler.")
flags.DEFINE_integer("sample_num", 8, "Images per sampler call.")
flags.DEFINE_list("depths", [], "CIFAR-10 depths whose train-step compile time to report.")
flags.DEFINE_bool("profile", True, "Profile one step of the first variant (time by op kind).")
flags.DEFINE_bool("ceiling", True, "Time a lone conv and its gradients vs the matmul.")
flags.DEFINE_string("out", os.path.join(HERE, "results", "benchmark"), "Output path stem.")
flags.DEFINE_string(
    "readme",
    os.path.join(os.path.dirname(HERE), "README.md"),
    "Markdown file whose performance section (between the benchmark markers) is replaced by "
    "this run's summary; '' leaves it alone.",
)
FLAGS = flags.FLAGS


def _fmt(value, scale=1.0, digits=1, unit=""):
    if value is None:
        return "n/a"
    return f"{value * scale:,.{digits}f}{unit}"


def _mib(value):
    return _fmt(value, 1 / 2**20, 0)


def train_table(rows) -> str:
    lines = [
        "| variant | compile (s) | step (ms) | images/s | GFLOP/step | GFLOP/s | "
        "matmul GFLOP/s | of matmul | temp MiB | args MiB | device peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.0f} | "
            f"{r['images_per_s']:.1f} | {_fmt(r['flops_per_step'], 1e-9)} | "
            f"{_fmt(r['achieved_flops'], 1e-9)} | {r['matmul_flops'] * 1e-9:.0f} | "
            f"{_fmt(r['fraction_of_matmul'], 100, 0, '%')} | {_mib(r.get('temp_bytes'))} | "
            f"{_mib(r.get('argument_bytes'))} | {_mib(r.get('device_peak_bytes'))} |"
        )
    return "\n".join(lines)


def markdown(record) -> str:
    env = record["environment"]
    out = [
        "# VDM benchmark\n",
        f"{env['date']}; {env['devices']} x {env['device_kind']} ({env['platform']}), "
        f"{env['cpu_count']} host cores, jax {env['jax']}. Config: {record['config_name']} "
        f"({env['model']}). Allocator: {env.get('allocator', 'n/a')}; XLA_FLAGS: "
        f"`{env.get('xla_flags') or 'none'}`. Medians of block_until_ready-ended steps after a "
        "warm-up; FLOPs from XLA's cost analysis; 'of matmul' is the median over steps of the "
        "step's FLOP/s divided by that of a 2048^2 float32 matmul timed right after it (a "
        "shared machine drifts). Scanned variants: XLA counts a loop body once, so their FLOPs "
        "are the unrolled f32 variant's.\n",
        f"Command: `{record['command']}`\n",
        "## Train step\n",
        train_table(record["train"]),
    ]
    if record.get("compiled"):
        out += [
            "\nCompiled only (the step is not run): trace+lower and compile time, XLA's temp "
            "memory.\n",
            "| variant | trace+lower (s) | compile (s) | temp MiB |",
            "|---|---:|---:|---:|",
        ]
        for name, r in record["compiled"].items():
            out.append(
                f"| {name} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | "
                f"{_mib(r.get('temp_bytes'))} |"
            )
    if record.get("time_breakdown"):
        parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in record["time_breakdown"].items())
        out += ["\nTime by op kind (first variant, one profiled step): " + parts + "."]
    if record.get("conv_ceiling"):
        c = record["conv_ceiling"]
        out += [
            "\nLone 3x3 conv of the network's width, as a fraction of the matmul: forward "
            f"{100 * c['forward']:.0f}%, input gradient {100 * c['input_grad']:.0f}%, kernel "
            f"gradient {100 * c['kernel_grad']:.0f}% (matmul {c['matmul_flops'] * 1e-9:.0f} "
            "GFLOP/s)."
        ]
    if record.get("eval"):
        e = record["eval"]
        out += [f"\n## Evaluation\n\nELBO bits/dim at batch {e['batch']}: "]
        out[-1] += f"{e['images_per_s']:.1f} images/s."
    if record.get("samplers"):
        out += [
            "\n## Sampling (the actual network, fresh parameters)\n",
            "| sampler | grid steps | network evals | images | images/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, s in record["samplers"].items():
            out.append(
                f"| {name} | {s['steps']} | {s['network_evals']} | {s['num']} | "
                f"{s['images_per_s']:.2f} |"
            )
    if record.get("depths"):
        out += [
            "\n## Train-step compile time vs depth (CIFAR-10 network, 128 channels)\n",
            "| n_layers | variant | trace+lower (s) | compile (s) | GFLOP/step | temp MiB |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for r in record["depths"]:
            out.append(
                f"| {r['n_layers']} | {r['variant']} | {r['trace_lower_s']:.1f} | "
                f"{r['compile_s']:.1f} | {_fmt(r['flops_per_step'], 1e-9, 0)} | "
                f"{_mib(r.get('temp_bytes'))} |"
            )
    return "\n".join(out) + "\n"


def main(argv):
    del argv
    config = FLAGS.config
    dev = jax.devices()[0]
    m = config.model
    record = {
        "command": " ".join(["python", "experiments/benchmark.py", *sys.argv[1:]]),
        "config_name": os.path.relpath(_config_arg()),
        "environment": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "platform": dev.platform,
            "device_kind": dev.device_kind,
            "devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "jax": jax.__version__,
            "allocator": runtime.loaded_allocator(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "model": f"{m.type} n_embd={m.n_embd} n_layers={m.n_layers}, "
            f"data {config.data.name} batch {config.data.batch_size}",
        },
        "config": config.to_dict(),
        "train": {},
    }
    first = None
    for i, name in enumerate(FLAGS.variants):
        cfg = bench_lib.with_overrides(config, bench_lib.VARIANTS[name])
        rec, exp, state = bench_lib.measure_train(
            cfg, steps=FLAGS.steps, budget_s=FLAGS.budget_s, profile=FLAGS.profile and i == 0
        )
        if cfg.model.scan and "f32" in record["train"]:
            # XLA's cost analysis counts a while loop's body once, not once per iteration, so
            # a scanned network's FLOPs come from the unrolled f32 variant (the same math;
            # remat's recomputation is then not counted).
            _rescale_flops(rec, record["train"]["f32"]["flops_per_step"])
        if "time_breakdown" in rec:
            record["time_breakdown"] = rec.pop("time_breakdown")
        record["train"][name] = rec
        print(f"train {name}: {rec}", flush=True)
        if first is None:
            first = (exp, state.params)
        del state
    if first is not None:
        exp, params = first
        record["eval"] = bench_lib.measure_eval(exp, params, steps=5, budget_s=FLAGS.budget_s)
        record["samplers"] = {}
        for name in FLAGS.samplers:
            record["samplers"][name] = bench_lib.measure_sampler(
                exp, params, name, steps=FLAGS.sample_steps, num=FLAGS.sample_num
            )
            print(f"sampler {name}: {record['samplers'][name]}", flush=True)
        if FLAGS.ceiling and exp.info.shape and len(exp.info.shape) == 3:
            record["conv_ceiling"] = bench_lib.conv_ceiling(
                m.n_embd, config.data.batch_size, exp.info.shape[0]
            )
    record["compiled"] = {}
    for name in FLAGS.compile_variants:
        rec = bench_lib.compile_only(bench_lib.with_overrides(config, bench_lib.VARIANTS[name]))
        record["compiled"][name] = rec
        print(f"compiled {name}: {rec}", flush=True)
    record["depths"] = []
    for depth in FLAGS.depths:
        for scan in (False, True):
            cfg = bench_lib.with_overrides(
                bench_lib.depth_config(), {"model.n_layers": int(depth), "model.scan": scan}
            )
            rec = bench_lib.compile_only(cfg)
            rec.update(n_layers=int(depth), variant="scan" if scan else "unrolled")
            record["depths"].append(rec)
            print(f"depth {depth} scan={scan}: {rec}", flush=True)
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(record, f, indent=1, default=str)
    table = markdown(record)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(table)
    print(table)
    if FLAGS.readme:
        update_readme(FLAGS.readme, readme_section(record))
        print(f"Updated the performance section of {FLAGS.readme}.")


README_START = "<!-- benchmark.py: start -->"
README_END = "<!-- benchmark.py: end -->"


def readme_section(record) -> str:
    """The README's performance summary: machine, train-step table, eval and sampling."""
    env = record["environment"]
    lines = [
        f"Measured by `{record['command']}` on {env['date'][:10]}: {env['devices']} x "
        f"{env['device_kind']} ({env['platform']}, {env['cpu_count']} host cores, "
        f"{env['machine']}), jax {env['jax']}, {env.get('allocator', 'n/a')} allocator; "
        f"{env['model']}. Full record: `experiments/results/benchmark.md`.\n",
        "| variant | compile (s) | step (ms) | images/s | GFLOP/s | of matmul | temp MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in record["train"].items():
        lines.append(
            f"| {name} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.0f} | "
            f"{r['images_per_s']:.1f} | {_fmt(r['achieved_flops'], 1e-9)} | "
            f"{_fmt(r['fraction_of_matmul'], 100, 0, '%')} | {_mib(r.get('temp_bytes'))} |"
        )
    for name, r in record.get("compiled", {}).items():
        lines.append(
            f"| {name} (compiled only) | {r['compile_s']:.1f} | | | | | "
            f"{_mib(r.get('temp_bytes'))} |"
        )
    if record.get("eval"):
        lines.append(f"\nELBO evaluation: {record['eval']['images_per_s']:.1f} images/s.")
    if record.get("samplers"):
        rates = ", ".join(
            f"{k} {v['images_per_s']:.2f} ({v['steps']} steps)"
            for k, v in record["samplers"].items()
        )
        lines.append(f"Sampling, images/s: {rates}.")
    return "\n".join(lines)


def update_readme(path: str, section: str) -> None:
    """Replaces the text between README_START and README_END in `path` with `section`."""
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} markers to replace.")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{README_START}\n{section}\n{README_END}{tail}")


def _rescale_flops(rec: dict, flops: float | None) -> None:
    rec["xla_flops_per_step"] = rec["flops_per_step"]
    rec["flops_per_step"] = flops
    rec["achieved_flops"] = flops / rec["step_s"] if flops else None
    rec["fraction_of_matmul"] = rec["achieved_flops"] / rec["matmul_flops"] if flops else None


def _config_arg() -> str:
    # The --config value as given (path[:arg]), for the record.
    for arg in sys.argv[1:]:
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return os.path.join(HERE, "bench_lib.py")


if __name__ == "__main__":
    from vdm import runtime

    runtime.setup()  # tcmalloc and XLA:CPU flags, as `python -m vdm.main` runs
    app.run(main)
