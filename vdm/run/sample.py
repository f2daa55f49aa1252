"""Sampling workflows: samples from a run's parameters, `--mode=sample` on a checkpoint, and
the end-of-training outputs (sample grid, schedule plot, DONE)."""

import jax
import numpy as np
from absl import logging
from etils import epath

from vdm import parallel
from vdm.model import SamplerSpec
from vdm.run import logs, pictures
from vdm.run.evaluate import restore_latest
from vdm.run.setup import KeyStream, Run


def draw_samples(run: Run, params, *, key=None, spec: SamplerSpec | None = None) -> np.ndarray:
    """Samples with the run's sampler settings (config.sample unless `spec` is given).

    Returns:
      numpy samples [num, *shape] (int32 for discrete data), replicated on every process.
    """
    spec = run.sampler if spec is None else spec
    key = run.key(KeyStream.SAMPLE) if key is None else key
    fn = jax.jit(
        lambda p, k: run.model.sample(p, k, spec), out_shardings=parallel.replicated(run.mesh)
    )
    return np.asarray(jax.device_get(fn(params, key)))


def sample_checkpoint(run: Run, workdir) -> str:
    """Samples (config.sample) from the latest checkpoint; writes samples_<step>.png/.npy.

    With sample.metrics.enabled it also scores them (vdm/run/sample_metrics.py) and appends
    one JSON record to workdir/sample_metrics.jsonl.

    The name also holds the sampler and steps, and for a class-conditional model a guidance
    weight other than the default 1 (conditional) as _w<guidance>.

    Returns:
      The path of the PNG.
    """
    state, step = restore_latest(run, workdir)
    s = run.sampler
    name = f"samples_{step}_{s.sampler}_{s.steps}"
    if run.model.num_classes and s.guidance != 1.0:  # 1 (conditional) is the default
        name += f"_w{s.guidance:g}"
    path = str(epath.Path(workdir) / f"{name}.png")

    def write(samples):
        if jax.process_index() == 0:
            pictures.save_samples(path, samples, run.info.vocab_size)
            np.save(path[:-4] + ".npy", samples)
            print(f"Wrote {len(samples)} samples from step {step} to {path}")
        logging.info("Sampled %d examples with %s (%d steps).", len(samples), s.sampler, s.steps)

    if run.config.sample.metrics.enabled:
        from vdm.run import sample_metrics  # the feature networks load only when asked for

        sample_metrics.sample_record(run, workdir, state, step, write)
    else:
        write(draw_samples(run, run.eval_params(state)))
    return path


def write_final(run: Run, params, workdir, step: int, writer, wall_time: float, metrics) -> dict:
    """End-of-training outputs: sample grid, schedule plot, DONE; prints where they are.

    Args:
      run: the Run.
      params: the parameters to sample from (EMA normally).
      workdir: run directory.
      step: the final step.
      writer: the run's metric writer (the grid goes to TensorBoard through it).
      wall_time: the run's wall time so far.
      metrics: the final eval metrics, to print.

    Returns:
      Dict of output name -> path.
    """
    workdir = str(workdir)
    primary = jax.process_index() == 0
    paths = {
        "metrics": f"{workdir}/{logs.METRICS_FILE}",
        "checkpoints": f"{workdir}/checkpoints",
    }
    if run.config.train.write_samples:
        samples = draw_samples(run, params)
        if primary:
            paths["samples"] = f"{workdir}/samples.png"
            grid = pictures.save_samples(paths["samples"], samples, run.info.vocab_size)
            np.save(f"{workdir}/samples.npy", samples)
            if grid is not None:
                writer.write_images(step, {"samples": grid[None]})
    if primary:
        paths["schedule"] = f"{workdir}/schedule.png"
        t, gamma = run.model.schedule_curve(params)
        pictures.save_schedule_plot(paths["schedule"], np.asarray(t), np.asarray(gamma))
    logs.write_done(workdir, step, wall_time)
    if primary:
        paths["done"] = f"{workdir}/{logs.DONE_FILE}"
        print(f"Training finished at step {step} in {wall_time:.1f}s.")
        if "eval/bpd" in metrics:
            print(
                f"Test bits/dim (EMA): {metrics['eval/bpd']:.4f} "
                f"+- {metrics.get('eval/bpd_stderr', float('nan')):.4f}"
            )
        print("Outputs:")
        for name, path in paths.items():
            print(f"  {name:12s} {path}")
    return paths
