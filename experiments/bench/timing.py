"""Wall-clock measurement: medians of blocking calls, and the dense-matmul reference.

Step times are medians of wall-clock intervals each ended by `block_until_ready`, after
warm-up calls. Because the machine may be shared, the benchmark times a dense matmul right after
every timed train step and reports each step as a fraction of its neighbouring matmul figure
(`paired_with_matmul`): both drift together, so their ratio holds still.
"""

import statistics
import time

import jax
import jax.numpy as jnp


def median_time(fn, *, warmup: int = 1, steps: int = 5, budget_s: float = 60.0, min_steps: int = 2):
    """Median seconds of `fn()` (which must block) over up to `steps` calls after warm-up.

    Stops early once `min_steps` calls are timed and `budget_s` has passed, so one slow
    variant cannot eat the whole run.

    Returns:
      (median seconds, number of calls timed).
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


def paired_with_matmul(fn, *, steps: int, budget_s: float) -> tuple[list, list]:
    """Times `fn()` (which must block), each call followed by a short matmul measurement.

    No warm-up: call `fn` once before. Stops after `steps` calls, or once at least two are
    timed and `budget_s` has passed.

    Returns:
      (seconds of each call, matmul FLOP/s measured right after each).
    """
    times, peaks, end = [], [], time.perf_counter() + budget_s
    while len(times) < steps and (len(times) < 2 or time.perf_counter() < end):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
        peaks.append(matmul_flops(steps=3))
    return times, peaks
