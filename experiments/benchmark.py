"""Training, evaluation and sampling throughput of a VDM config on the devices JAX sees.

Run from the repository root:

  python -m experiments.benchmark                                    # CPU default, < 5 min
  python -m experiments.benchmark --config=configs/cifar10.py --steps=50 --budget_s=120
  python -m experiments.benchmark --depths=8,16,32 --variants=       # scan compile vs depth
  python -m experiments.benchmark --config.model.conv_grad=patches --variants=f32
  python -m experiments.benchmark --readme=README.md                 # also update the README

For each variant of the config (`--variants`, names in experiments/bench/configs.py VARIANTS,
each a set of config overrides) it reports the train step's compile time, median step time and
images/s, XLA's FLOPs per step, the achieved FLOP/s and that as a fraction of a dense matmul
timed just after each step, and memory (XLA's per-executable analysis; the device's peak where
the backend reports one). For the first variant it also reports ELBO evaluation images/s,
per-sampler images/s of the actual network at `--sample_steps`, (`--profile`) the share of
step time by op category, and the real input pipeline's host time per batch against the step
(`--input_batches`: the input wait per step; reported as skipped where the dataset is not
prepared). `--compile_variants` are compiled but not run (compile time and
memory of scan/remat without minutes of slow CPU steps). `--depths` compiles (without running)
the CIFAR-10 network's train step at those depths, unrolled and scanned. `--ceiling` times a
lone 3x3 convolution and its gradients.

Writes experiments/results/benchmark.json (every figure, with the environment) and
benchmark.md (the tables). With `--readme=README.md` it also replaces the README's performance
section (the text between its benchmark markers) with this run's summary; by default no README
is touched. Parameters are freshly initialised and batches are random data of the dataset's
shape: throughput does not depend on either.
"""

import datetime
import json
import os
import platform
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from experiments.bench import configs, costs, profiling, report, throughput
from vdm import runtime

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "bench", "configs.py")

config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file[:arg]; default: the reduced U-Net."
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
flags.DEFINE_float(
    "peak_flops",
    0.0,
    "Peak FLOP/s of one device for model FLOP utilisation (MFU = XLA's FLOPs per step / step "
    "time / this); 0 = the data-sheet dense bf16 peak of a known GPU/TPU "
    "(experiments/bench/costs.py PEAK_BF16_FLOPS), none on a CPU.",
)
flags.DEFINE_bool(
    "eval_each",
    False,
    "Also time the ELBO evaluation of every variant (its record's 'eval'), right after its "
    "train steps, for A/B comparisons of evaluation in one run.",
)
flags.DEFINE_integer(
    "input_batches",
    20,
    "Batches of the config's real data pipeline to time against the first variant's step "
    "(the input wait per step); 0 = skip. Skipped with the reason if the data is not here.",
)
flags.DEFINE_string("out", os.path.join(HERE, "results", "benchmark"), "Output path stem.")
flags.DEFINE_string(
    "readme",
    "",
    "Markdown file (e.g. README.md) whose performance section, between the benchmark markers, "
    "is replaced by this run's summary; empty (the default) writes no README.",
)
FLAGS = flags.FLAGS


def environment(config) -> dict:
    """The machine, software and model the figures were measured on."""
    dev = jax.devices()[0]
    m = config.model
    return {
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
    }


def main(argv):
    del argv
    config = FLAGS.config
    record = {
        "command": " ".join(["python", "-m", "experiments.benchmark", *sys.argv[1:]]),
        "config_name": os.path.relpath(_config_arg()),
        "environment": environment(config),
        "config": config.to_dict(),
        "train": {},
    }
    peak = FLAGS.peak_flops or costs.stated_peak_flops(jax.devices()[0].device_kind)
    record["environment"]["peak_flops"] = peak
    first = None
    for i, name in enumerate(FLAGS.variants):
        cfg = configs.with_overrides(config, configs.VARIANTS[name])
        rec, run, state = throughput.measure_train(
            cfg, steps=FLAGS.steps, budget_s=FLAGS.budget_s, profile=FLAGS.profile and i == 0
        )
        if cfg.model.scan and "f32" in record["train"]:
            # XLA's cost analysis counts a while loop's body once, not once per iteration, so
            # a scanned network's FLOPs come from the unrolled f32 variant (the same math;
            # remat's recomputation is then not counted).
            _rescale_flops(rec, record["train"]["f32"]["flops_per_step"])
        # XLA's FLOPs are those of the compiled (per-device, under SPMD) program.
        rec["mfu"] = rec["achieved_flops"] / peak if peak and rec["achieved_flops"] else None
        if FLAGS.eval_each:
            rec["eval"] = throughput.measure_eval(
                run, state.params, steps=3, budget_s=FLAGS.budget_s
            )
        if "time_breakdown" in rec:
            record["time_breakdown"] = rec.pop("time_breakdown")
        record["train"][name] = rec
        print(f"train {name}: {rec}", flush=True)
        if first is None:
            first = (run, state.params)
            if FLAGS.input_batches > 0:
                record["input"] = throughput.measure_input(
                    run, batches=FLAGS.input_batches, step_s=rec["step_s"]
                )
                print(f"input pipeline: {record['input']}", flush=True)
        del state
    if first is not None:
        run, params = first
        record["eval"] = throughput.measure_eval(run, params, steps=5, budget_s=FLAGS.budget_s)
        record["samplers"] = {}
        for name in FLAGS.samplers:
            record["samplers"][name] = throughput.measure_sampler(
                run, params, name, steps=FLAGS.sample_steps, num=FLAGS.sample_num
            )
            print(f"sampler {name}: {record['samplers'][name]}", flush=True)
        shape = run.info.shape
        if FLAGS.ceiling and shape and len(shape) == 3:
            record["conv_ceiling"] = profiling.conv_ceiling(
                config.model.n_embd, config.data.batch_size, shape[0]
            )
    record["compiled"] = {}
    for name in FLAGS.compile_variants:
        rec = costs.compile_only(configs.with_overrides(config, configs.VARIANTS[name]))
        record["compiled"][name] = rec
        print(f"compiled {name}: {rec}", flush=True)
    record["depths"] = []
    for depth in FLAGS.depths:
        for scan in (False, True):
            cfg = configs.with_overrides(
                configs.depth_config(), {"model.n_layers": int(depth), "model.scan": scan}
            )
            rec = costs.compile_only(cfg)
            rec.update(n_layers=int(depth), variant="scan" if scan else "unrolled")
            record["depths"].append(rec)
            print(f"depth {depth} scan={scan}: {rec}", flush=True)
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(record, f, indent=1, default=str)
    table = report.markdown(record)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(table)
    print(table)
    if FLAGS.readme:
        report.update_readme(FLAGS.readme, report.readme_section(record))
        print(f"Updated the performance section of {FLAGS.readme}.")


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
    return DEFAULT_CONFIG


if __name__ == "__main__":
    runtime.setup()  # tcmalloc and XLA:CPU flags, as `python -m vdm.main` runs
    app.run(main)
