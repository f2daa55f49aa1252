"""The benchmarked train step, compiled from `build_run`, and what XLA says it costs.

FLOPs are XLA's own cost analysis of the compiled executable, so "achieved FLOP/s" counts what
XLA says the program does (recomputation from remat included), not a hand count of the model.
Memory is XLA's per-executable analysis, plus the device's peak where the backend reports one.
Batches are random data of the dataset's shape: the step's cost does not depend on the content.
"""

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from vdm import parallel
from vdm.run.setup import KeyStream, Run, build_run

# Dense (no sparsity) bf16 tensor peak FLOP/s per device, by a substring of device_kind
# (vendors' data sheets; first match wins, so the more specific names come first).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
)


def stated_peak_flops(device_kind: str) -> float | None:
    """The data-sheet dense bf16 peak FLOP/s of one device of this kind, or None if unknown
    (CPUs: pass --peak_flops)."""
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def flops_of(compiled) -> float | None:
    """Total FLOPs from XLA's cost analysis (a dict, or a list of one dict in older jax)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
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


def random_batch(run: Run, batch_size: int, seed: int = 0) -> dict:
    """A host batch of uniform random data of the dataset's shape (the step ignores content).

    Args:
      run: the Run (its dataset's shape, vocabulary and classes; the model's cond_aug).
      batch_size: examples.
      seed: numpy seed.

    Returns:
      Dict of numpy arrays: 'x', and 'label' / 'aug' where the model takes them.
    """
    rng = np.random.default_rng(seed)
    shape = (batch_size, *run.info.shape)
    if run.info.vocab_size:
        x = rng.integers(0, run.info.vocab_size, shape).astype(np.uint8)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    batch = {"x": x}
    if run.info.num_classes:
        batch["label"] = rng.integers(0, run.info.num_classes, (batch_size,)).astype(np.int32)
    if run.model.cond_aug:
        batch["aug"] = np.zeros((batch_size,), np.float32)
    return batch


@dataclasses.dataclass
class CompiledTrain:
    """A compiled train step with everything needed to call it.

    Attributes:
      run: the Run it was built from.
      compiled: the compiled, state-donating function (state, batch, key) -> (state, metrics).
      state: a fresh train state (donated by the first call).
      batch: the device batch (stacked over `steps_per_call` when that is > 1).
      key: the train key stream's root key.
      compile_s: seconds to lower and compile.
      steps_per_call: train steps per call (config.train.steps_per_call, at least 1).
    """

    run: Run
    compiled: Any
    state: Any
    batch: dict
    key: jax.Array
    compile_s: float
    steps_per_call: int


def compile_train(config: ml_collections.ConfigDict) -> CompiledTrain:
    """Builds the config's run, a fresh state and a random batch, and compiles the step."""
    run = build_run(config)
    state = run.init_state()
    k = max(int(config.train.steps_per_call), 1)
    local = random_batch(run, config.data.batch_size)
    if k > 1:
        local = jax.tree.map(lambda a: np.stack([a] * k), local)
    batch = parallel.global_batch(local, run.mesh, stacked=k > 1)
    key = run.key(KeyStream.TRAIN)
    jitted = run.compiled_steps()(k)
    tick = time.perf_counter()
    compiled = jitted.lower(state, batch, key).compile()
    return CompiledTrain(run, compiled, state, batch, key, time.perf_counter() - tick, k)


def compile_only(config: ml_collections.ConfigDict) -> dict:
    """Trace+lower and compile seconds, FLOPs and memory of the train step (nothing is run).

    The step is lowered against the run's abstract state and an abstract batch, so no
    parameters are initialised and no data is placed.

    Returns:
      Dict with trace_lower_s, compile_s, flops_per_step and the `memory_of` fields.
    """
    run = build_run(config)
    batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=parallel.batch_sharding(run.mesh)
        ),
        random_batch(run, config.data.batch_size),
    )
    jitted = run.compiled_steps()(1)
    tick = time.perf_counter()
    lowered = jitted.lower(run.abstract_state, batch, run.key(KeyStream.TRAIN))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {
        "trace_lower_s": lowered_at - tick,
        "compile_s": done - lowered_at,
        "flops_per_step": flops_of(compiled),
        **memory_of(compiled),
    }
