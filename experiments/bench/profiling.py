"""Where a train step's time goes: one profiled step split by op kind, and the speed of the
U-Net's 3x3 convolution measured alone (the ceiling of a conv network on this backend).
"""

import collections
import glob
import re
import tempfile

import jax
from jax import lax

from experiments.bench.timing import matmul_flops, median_time


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

    Args:
      compiled: the compiled step (its HLO text names the ops).
      run: a no-argument function that runs one step and blocks.

    Returns:
      {category: share of the summed op time}, largest first; {} when no trace was written.
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


def conv3x3(x, kernel):
    """The U-Net's convolution: 3x3, stride 1, SAME padding, NHWC input, HWIO kernel."""
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_ceiling(channels: int, batch: int, size: int) -> dict:
    """Speed of the 3x3 convolution and its two gradients, alone, as fractions of a matmul.

    This is the most a conv network's train step can reach on this backend: if every FLOP
    were spent in these convolutions at their isolated speed.

    Args:
      channels: input and output channels (the network's width).
      batch: batch size.
      size: image height and width.

    Returns:
      Dict with matmul_flops (the reference FLOP/s) and forward, input_grad, kernel_grad (each
      that convolution's FLOP/s divided by matmul_flops).
    """
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, channels, channels))
    g = jax.random.normal(jax.random.key(2), x.shape)
    flops = 2.0 * batch * size * size * 9 * channels * channels
    fns = {
        "forward": jax.jit(conv3x3),
        "input_grad": jax.jit(lambda x, w, g: jax.vjp(conv3x3, x, w)[1](g)[0]),
        "kernel_grad": jax.jit(lambda x, w, g: jax.vjp(conv3x3, x, w)[1](g)[1]),
    }
    args = {"forward": (x, w), "input_grad": (x, w, g), "kernel_grad": (x, w, g)}
    peak = matmul_flops()
    out = {"matmul_flops": peak}
    for name, fn in fns.items():
        t, _ = median_time(lambda f=fn, a=args[name]: f(*a).block_until_ready(), steps=5)
        out[name] = flops / t / peak
    return out
