"""Images per second of a run's train step, its ELBO evaluation and its samplers, and the
host cost of its real input pipeline.

All three go through the public pieces of a Run (vdm/run/setup.py): the compiled train step
(`Run.compiled_steps`), the model's `loss_terms` and `sample`, and the run's key streams.
Parameters are freshly initialised and batches are random data of the dataset's shape:
throughput depends on neither.
"""

import statistics
import time

import jax
import ml_collections

from experiments.bench.costs import compile_train, flops_of, memory_of, random_batch
from experiments.bench.profiling import profile_breakdown
from experiments.bench.timing import median_time, paired_with_matmul
from vdm import parallel
from vdm.model import SamplerSpec
from vdm.run.setup import KeyStream, Run

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


def measure_train(config: ml_collections.ConfigDict, *, steps: int, budget_s: float,
                  profile: bool = False):  # fmt: skip
    """Compile time, cost, memory, step time and images/s of the config's train step.

    Each timed step is followed by a timed matmul, and the step's fraction of the matmul is
    taken pair by pair: on a shared machine both drift together, so their ratio holds still.

    Args:
      config: the locked config.
      steps: calls to time after one warm-up (each runs train.steps_per_call steps).
      budget_s: stop timing after this long once two calls are timed.
      profile: also profile one call (the record's time_breakdown).

    Returns:
      (record, the Run, the state after the timed steps).
    """
    c = compile_train(config)
    holder = [c.state]

    def run():
        # The state is donated: thread it through so every call sees a live buffer.
        holder[0], metrics = c.compiled(holder[0], c.batch, c.key)
        jax.block_until_ready(metrics)

    k = c.steps_per_call
    flops = flops_of(c.compiled)
    run()  # warm-up
    times, peaks = paired_with_matmul(run, steps=steps, budget_s=budget_s)
    step_s, peak = statistics.median(times), statistics.median(peaks)
    images = config.data.batch_size * k
    rec = {
        "compile_s": c.compile_s,
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
        **memory_of(c.compiled),
    }
    if profile:
        rec["time_breakdown"] = profile_breakdown(c.compiled, run)
    return rec, c.run, holder[0]


def measure_eval(run: Run, params, *, steps: int, budget_s: float) -> dict:
    """Images/s of the ELBO (bits/dim) evaluation at config.data.eval_batch_size.

    Returns:
      Dict with batch, images_per_s, batch_s and batches_timed.
    """
    n = run.config.data.eval_batch_size
    batch = parallel.global_batch(random_batch(run, n, seed=1), run.mesh)
    fn = jax.jit(lambda p, b, k: run.model.loss_terms(p, b, k, train=False)["bpd"])
    key = run.key(KeyStream.EVAL)
    t, timed = median_time(
        lambda: fn(params, batch, key).block_until_ready(), steps=steps, budget_s=budget_s
    )
    return {"batch": n, "images_per_s": n / t, "batch_s": t, "batches_timed": timed}


def measure_sampler(run: Run, params, name: str, *, steps: int, num: int) -> dict:
    """Images/s of one SAMPLER_SPECS sampler on the actual network at `steps` grid steps.

    The first call (compile and run) is timed separately; the rate is from one more call.

    Returns:
      Dict with steps, network_evals, num, images_per_s, seconds and compile_and_first_s.
    """
    sampler, options, evals = SAMPLER_SPECS[name]
    spec = SamplerSpec(sampler=sampler, steps=steps, options=options, num=num)
    fn = jax.jit(lambda p, k: run.model.sample(p, k, spec))
    key = run.key(KeyStream.SAMPLE)
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


def measure_input(run: Run, *, batches: int, step_s: float) -> dict:
    """Host milliseconds per training batch of the run's real data pipeline (read, augment,
    place on the mesh: what the train loop does between steps) against the step time.

    Steps are dispatched asynchronously, so the host reads the next batch while the device
    runs the current step: the device waits only for the part above the step time.

    Args:
      run: the Run (its dataset must be available: a TFDS dataset prepared, files present).
      batches: batches to time after the first (which starts the pipeline).
      step_s: the train step's seconds, for the wait.

    Returns:
      Dict with input_ms_per_batch, step_ms, wait_ms_per_step (max(0, input - step)) and
      batches; or {'skipped': the reason} when the dataset cannot be read here.
    """
    try:
        stream = run.train_batches(0)
        parallel.global_batch(next(stream), run.mesh)  # starts the pipeline (threads, files)
    except Exception as err:  # noqa: BLE001 - any unreadable dataset is reported, not raised
        return {"skipped": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    start = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(parallel.global_batch(next(stream), run.mesh))
    input_ms = 1e3 * (time.perf_counter() - start) / batches
    return {
        "input_ms_per_batch": input_ms,
        "step_ms": 1e3 * step_s,
        "wait_ms_per_step": max(0.0, input_ms - 1e3 * step_s),
        "batches": batches,
    }
