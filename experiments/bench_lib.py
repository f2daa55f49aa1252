"""Measurements behind experiments/benchmark.py, and its built-in default config.

Every figure comes from the devices JAX sees in this process. Step times are medians of
wall-clock intervals each ended by `block_until_ready`, after warm-up calls; FLOPs are XLA's own
cost analysis of the compiled executable, so "achieved FLOP/s" counts what XLA says the program
does (recomputation from remat included), not a hand count of the model. Because the machine may
be shared, a dense matmul is timed right after every timed train step and each step is reported
as a fraction of its neighbouring matmul figure.

As a config file (`--config=experiments/bench_lib.py`, the default) this module gives the
reduced VDM U-Net of the CPU target: 64 channels, 8 blocks per side, 32x32x3, batch 32.
"""

import collections
import glob
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdm import optim, parallel as sharding
from vdm.sampling import samplers
from vdm.run import loop as train
from vdm.config_defaults import base_config, finalize
from vdm.experiment import Experiment

# Named config variants: each is a set of overrides applied on top of the chosen config.
VARIANTS = {
    "f32": {},
    "patches": {"model.conv_grad": "patches"},
    "bf16": {"model.dtype": "bfloat16"},
    "scan": {"model.scan": True},
    "scan_patches": {"model.scan": True, "model.conv_grad": "patches"},
    "remat": {"model.remat": True},
    "scan_remat": {"model.scan": True, "model.remat": True},
    "steps4": {"train.steps_per_call": 4},
}


def get_config(arg=None):
    """The reduced VDM U-Net on CIFAR-10-shaped random data (no dataset is read)."""
    del arg
    c = base_config()
    c.data.name = "cifar10"
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.model.update(type="vdm_unet", n_embd=64, n_layers=8, dropout=0.1)
    return finalize(c)


def depth_config():
    """The CIFAR-10 paper network (128 channels, batch 128) for the compile-vs-depth sweep."""
    c = get_config()
    c.data.batch_size = 128
    c.model.n_embd = 128
    c.model.n_layers = 32
    return c


def with_overrides(config, overrides: dict):
    """A copy of a locked config with dotted-key overrides applied (unknown keys raise)."""
    config = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def median_time(fn, *, warmup: int = 1, steps: int = 5, budget_s: float = 60.0, min_steps: int = 2):
    """Median seconds of `fn()` (which must block) over up to `steps` calls after warm-up.

    Stops early once `min_steps` calls are timed and `budget_s` has passed, so one slow
    variant cannot eat the whole run. Returns (median, number timed).
    """
    for _ in range(warmup):
        fn()
    times, end = [], time.perf_counter() + budget_s
    while len(times) < steps and (len(times) < min_steps or time.perf_counter() < end):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times), len(times)


def matmul_flops(n: int = 2048, dtype=jnp.float32, steps: int = 7) -> float:
    """Measured FLOP/s of one dense n x n matmul on the default device (the reference)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    t, _ = median_time(lambda: f(a, b).block_until_ready(), warmup=2, steps=steps, budget_s=5)
    return 2.0 * n**3 / t


def flops_of(compiled) -> float | None:
    """Total FLOPs from XLA's cost analysis (a dict, or a list of one dict in older jax)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def memory_of(compiled) -> dict:
    """Executable memory (XLA's analysis) and the device's peak so far where it reports one."""
    out = {}
    analysis = compiled.memory_analysis()
    for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
        if analysis is not None and hasattr(analysis, name):
            out[name.replace("_size_in_bytes", "_bytes")] = int(getattr(analysis, name))
    stats = jax.devices()[0].memory_stats()  # None on CPU
    out["device_peak_bytes"] = int(stats["peak_bytes_in_use"]) if stats else None
    return out


def random_batch(exp: Experiment, batch_size: int, seed: int = 0) -> dict:
    """A batch of uniform random data of the dataset's shape (the step cost ignores content)."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, *exp.info.shape)
    if exp.info.vocab_size:
        x = rng.integers(0, exp.info.vocab_size, shape).astype(np.uint8)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    batch = {"x": x}
    if exp.info.num_classes:
        batch["label"] = rng.integers(0, exp.info.num_classes, (batch_size,)).astype(np.int32)
    if exp.config.model.cond_aug:
        batch["aug"] = np.zeros((batch_size,), np.float32)
    return batch


def build_train(config):
    """(exp, compiled step, state, device batch, key, compile seconds, k steps per call)."""
    exp = Experiment.build(config)
    optimizer = optim.make_optimizer(config.optim)
    _, shardings = train.state_shardings(exp, optimizer)
    state = jax.jit(lambda: train.create_state(exp, optimizer), out_shardings=shardings)()
    k = max(int(config.train.steps_per_call), 1)
    local = random_batch(exp, config.data.batch_size)
    if k > 1:
        local = jax.tree.map(lambda a: np.stack([a] * k), local)
    batch = sharding.global_batch(local, exp.mesh, stacked=k > 1)
    key = exp.root_key(1)
    jitted = train.compile_steps(exp, optimizer, shardings)(k)
    tick = time.perf_counter()
    lowered = jitted.lower(state, batch, key)
    compiled = lowered.compile()
    return exp, compiled, state, batch, key, time.perf_counter() - tick, k


def measure_train(config, *, steps: int, budget_s: float, profile: bool = False) -> dict:
    """Compile time, cost, memory, step time and images/s of the config's train step.

    Each timed step is followed by a timed matmul, and the step's fraction of the matmul is
    taken pair by pair: on a shared machine both drift together, so their ratio holds still.
    """
    exp, compiled, state, batch, key, compile_s, k = build_train(config)
    holder = [state]

    def run():
        # The state is donated: thread it through so every call sees a live buffer.
        holder[0], metrics = compiled(holder[0], batch, key)
        jax.block_until_ready(metrics)

    flops = flops_of(compiled)
    run()  # warm-up
    times, peaks, end = [], [], time.perf_counter() + budget_s
    while len(times) < steps and (len(times) < 2 or time.perf_counter() < end):
        tick = time.perf_counter()
        run()
        times.append(time.perf_counter() - tick)
        peaks.append(matmul_flops(steps=3))
    step_s, peak = statistics.median(times), statistics.median(peaks)
    images = config.data.batch_size * k
    rec = {
        "compile_s": compile_s,
        "step_s": step_s / k,
        "steps_timed": len(times) * k,
        "images_per_s": images / step_s,
        "flops_per_step": flops / k if flops else None,
        "achieved_flops": flops / step_s if flops else None,
        "matmul_flops": peak,
        "fraction_of_matmul": (
            statistics.median([flops / t / p for t, p in zip(times, peaks, strict=True)])
            if flops
            else None
        ),
        "params": int(sum(x.size for x in jax.tree.leaves(holder[0].params))),
        **memory_of(compiled),
    }
    if profile:
        rec["time_breakdown"] = profile_breakdown(compiled, run)
    return rec, exp, holder[0]


def compile_only(config) -> dict:
    """Trace+lower and compile seconds and FLOPs of the train step (nothing is run)."""
    exp = Experiment.build(config)
    optimizer = optim.make_optimizer(config.optim)
    abstract, _ = train.state_shardings(exp, optimizer)
    batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=sharding.batch_sharding(exp.mesh)
        ),
        random_batch(exp, config.data.batch_size),
    )
    _, shardings = train.state_shardings(exp, optimizer)
    jitted = train.compile_steps(exp, optimizer, shardings)(1)
    tick = time.perf_counter()
    lowered = jitted.lower(abstract, batch, exp.root_key(1))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {
        "trace_lower_s": lowered_at - tick,
        "compile_s": done - lowered_at,
        "flops_per_step": flops_of(compiled),
        **memory_of(compiled),
    }


def measure_eval(exp: Experiment, params, *, steps: int, budget_s: float) -> dict:
    """Images/s of the ELBO (bits/dim) evaluation at config.data.eval_batch_size."""
    n = exp.config.data.eval_batch_size
    batch = sharding.global_batch(random_batch(exp, n, seed=1), exp.mesh)
    fn = jax.jit(lambda p, b, k: exp.loss_terms(p, b, k, train=False)["bpd"])
    key = exp.root_key(2)
    t, timed = median_time(
        lambda: fn(params, batch, key).block_until_ready(), steps=steps, budget_s=budget_s
    )
    return {"batch": n, "images_per_s": n / t, "batch_s": t, "batches_timed": timed}


# (registry name, options, network evaluations per grid step) of each benchmarked sampler.
SAMPLER_SPECS = {
    "ancestral": ("ancestral", {}, 1),
    "ddpm": ("ddpm", {}, 1),
    "ddim": ("ddim", {"eta": 0.0}, 1),
    "sde": ("sde", {}, 1),
    "pc": ("pc", {"predictor": "ancestral", "corrector_steps": 1}, 2),
    "ode_euler": ("ode", {"solver": "euler"}, 1),
    "ode_heun": ("ode", {"solver": "heun"}, 2),
}


def measure_sampler(exp: Experiment, params, name: str, *, steps: int, num: int) -> dict:
    """Images/s of one sampler on the actual network at `steps` grid steps (after compiling)."""
    sampler, options, evals = SAMPLER_SPECS[name]

    def run(p, k):
        return samplers.sample(
            sampler,
            exp.denoiser(p["model"]),
            exp.schedule,
            p["schedule"],
            k,
            (num, *exp.info.shape),
            vocab_size=exp.info.vocab_size,
            steps=steps,
            parameterization=exp.config.model.parameterization,
            **options,
        )

    fn = jax.jit(run)
    key = exp.root_key(3)
    tick = time.perf_counter()
    fn(params, key).block_until_ready()
    first = time.perf_counter() - tick
    t, _ = median_time(lambda: fn(params, key).block_until_ready(), warmup=0, steps=1)
    return {
        "steps": steps,
        "network_evals": steps * evals,
        "num": num,
        "images_per_s": num / t,
        "seconds": t,
        "compile_and_first_s": first,
    }


def _op_names(hlo_text: str) -> dict:
    # The instruction name -> the JAX op (with its module path) that produced it.
    pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", re.M)
    return dict(pattern.findall(hlo_text))


def _category(op_name: str) -> str:
    if "attention" in op_name:
        return "attention"
    # Convolutions and their gradients (XLA's or the hand-written patches matmul).
    if re.search(r"conv_general_dilated|/conv_(?:\d|in|out)/", op_name):
        return "convolution"
    if "dot_general" in op_name:
        return "dense"
    if re.search(r"GroupNorm|/norm", op_name):
        return "group norm"
    return "other (activations, dropout, loss, optimiser)"


def profile_breakdown(compiled, run) -> dict:
    """Share of op time per category in one profiled step (XLA:CPU thunk events).

    An op's time runs from its event's start to the end of its "end: NAME" event when it has
    one (convolutions start on the executor thread and finish on an Eigen worker). Ops are
    matched to HLO instructions by name and classified by the JAX op that made them.
    """
    from jax.profiler import ProfileData

    names = _op_names(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            run()
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            return {}
        data = ProfileData.from_file(files[0])
    start, end = {}, {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                name = event.name.removeprefix("end: ")
                if name not in names:
                    continue
                if name == event.name:
                    start[name] = min(start.get(name, event.start_ns), event.start_ns)
                stop = event.start_ns + event.duration_ns
                end[name] = max(end.get(name, stop), stop)
    totals = collections.Counter()
    for name, t0 in start.items():
        totals[_category(names[name])] += end[name] - t0
    whole = sum(totals.values()) or 1
    return {k: v / whole for k, v in totals.most_common()}


def conv_ceiling(channels: int, batch: int, size: int) -> dict:
    """GFLOP/s of the U-Net's 3x3 convolution and its two gradients, alone, vs a matmul.

    This is the most a conv network's train step can reach on this backend: if every FLOP
    were spent in these convolutions at their isolated speed.
    """
    from vdm.nets.layers import _conv3x3

    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, channels, channels))
    g = jax.random.normal(jax.random.key(2), x.shape)
    flops = 2.0 * batch * size * size * 9 * channels * channels
    fns = {
        "forward": jax.jit(_conv3x3),
        "input_grad": jax.jit(lambda x, w, g: jax.vjp(_conv3x3, x, w)[1](g)[0]),
        "kernel_grad": jax.jit(lambda x, w, g: jax.vjp(_conv3x3, x, w)[1](g)[1]),
    }
    args = {"forward": (x, w), "input_grad": (x, w, g), "kernel_grad": (x, w, g)}
    peak = matmul_flops()
    out = {"matmul_flops": peak}
    for name, fn in fns.items():
        t, _ = median_time(lambda f=fn, a=args[name]: f(*a).block_until_ready(), steps=5)
        out[name] = flops / t / peak
    return out
