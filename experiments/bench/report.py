"""The benchmark's Markdown: the full tables (experiments/results/benchmark.md) and the short
performance section it can write into the README between the benchmark markers.

Kept free of flags and of JAX, so tests and other tools can format or rewrite without
importing the benchmark's command line.
"""

README_START = "<!-- benchmark.py: start -->"
README_END = "<!-- benchmark.py: end -->"


def _fmt(value, scale=1.0, digits=1, unit=""):
    if value is None:
        return "n/a"
    return f"{value * scale:,.{digits}f}{unit}"


def _mib(value):
    return _fmt(value, 1 / 2**20, 0)


def train_table(rows: dict) -> str:
    """The train-step table: one row per variant of `measure_train` records."""
    lines = [
        "| variant | compile (s) | step (ms) | images/s | GFLOP/step | GFLOP/s | "
        "matmul GFLOP/s | of matmul | MFU | temp MiB | args MiB | device peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.0f} | "
            f"{r['images_per_s']:.1f} | {_fmt(r['flops_per_step'], 1e-9)} | "
            f"{_fmt(r['achieved_flops'], 1e-9)} | {r['matmul_flops'] * 1e-9:.0f} | "
            f"{_fmt(r['fraction_of_matmul'], 100, 0, '%')} | {_fmt(r.get('mfu'), 100, 1, '%')} | "
            f"{_mib(r.get('temp_bytes'))} | "
            f"{_mib(r.get('argument_bytes'))} | {_mib(r.get('device_peak_bytes'))} |"
        )
    return "\n".join(lines)


def markdown(record: dict) -> str:
    """The whole benchmark record as Markdown (benchmark.md)."""
    env = record["environment"]
    out = [
        "# VDM benchmark\n",
        f"{env['date']}; {env['devices']} x {env['device_kind']} ({env['platform']}), "
        f"{env['cpu_count']} host cores, jax {env['jax']}. Config: {record['config_name']} "
        f"({env['model']}). Allocator: {env.get('allocator', 'n/a')}; XLA_FLAGS: "
        f"`{env.get('xla_flags') or 'none'}`. MFU: XLA's FLOPs per step / step time / "
        f"{_fmt(env.get('peak_flops'), 1e-12, 0, ' TFLOP/s')} per device (stated peak; "
        "n/a on a CPU without --peak_flops). Medians of block_until_ready-ended steps after a "
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
    if record.get("input"):
        out += ["\n## Input pipeline\n\n" + input_line(record["input"])]
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


def input_line(rec: dict) -> str:
    """The input pipeline's host time per batch against the step, or why it was skipped."""
    if "skipped" in rec:
        return f"Real data pipeline not measured here ({rec['skipped']})."
    return (
        f"Real data pipeline (read, augment, place on the mesh), {rec['batches']} batches: "
        f"{rec['input_ms_per_batch']:.1f} ms per batch on the host against a "
        f"{rec['step_ms']:.0f} ms train step; input wait per step (the excess over the step, "
        f"which asynchronous dispatch hides): {rec['wait_ms_per_step']:.1f} ms."
    )


def readme_section(record: dict) -> str:
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
    """Replaces the text between README_START and README_END in `path` with `section`.

    Raises:
      ValueError: the file lacks either marker (the file is then left as it was).
    """
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} markers to replace.")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{README_START}\n{section}\n{README_END}{tail}")
