"""The non-training modes of `vdm.main`: evaluate or sample from a run's latest checkpoint.

Both restore onto the current device mesh (any device count) with the same verified,
fall-back-on-corruption restore as training, and refuse to run without a checkpoint.
"""

import json

import jax
import numpy as np
from absl import logging
from etils import epath

from vdm import optim, outputs
from vdm.checkpoint import CheckpointError, Checkpoints
from vdm.experiment import Experiment
from vdm.train import eval_params, state_shardings


def restore_latest(config, workdir):
    """(experiment, state, step) from the workdir's latest good checkpoint.

    Raises:
      CheckpointError: the workdir holds no restorable checkpoint.
    """
    exp = Experiment.build(config)
    optimizer = optim.make_optimizer(config.optim)
    ckpts = Checkpoints(workdir, keep=config.train.keep_ckpts)
    try:
        target, _ = state_shardings(exp, optimizer)
        found = ckpts.restore(target)
    finally:
        ckpts.close()
    if found is None:
        raise CheckpointError(f"No checkpoint in {ckpts.directory}; train first.")
    state, _, step = found
    return exp, state, step


def evaluate_checkpoint(config, workdir) -> dict:
    """Full-split ELBO of the latest checkpoint; writes workdir/eval_<step>.json.

    Returns:
      The eval metrics (floats), plus 'step'.
    """
    exp, state, step = restore_latest(config, workdir)
    metrics = exp.evaluate(eval_params(config, state))
    metrics["step"] = step
    if jax.process_index() == 0:
        path = epath.Path(workdir) / f"eval_{step}.json"
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(
            f"Step {step}: test bits/dim {metrics['eval/bpd']:.4f} "
            f"+- {metrics.get('eval/bpd_stderr', float('nan')):.4f}; written to {path}"
        )
    return metrics


def sample_checkpoint(config, workdir) -> str:
    """Samples (config.sample) from the latest checkpoint; writes samples_<step>.png/.npy.

    Returns:
      The path of the PNG.
    """
    exp, state, step = restore_latest(config, workdir)
    samples = exp.sample(eval_params(config, state))
    s = config.sample
    name = f"samples_{step}_{s.sampler}_{s.steps}"
    if s.guidance:
        name += f"_w{s.guidance:g}"
    path = str(epath.Path(workdir) / f"{name}.png")
    if jax.process_index() == 0:
        outputs.save_samples(path, samples, exp.info.vocab_size)
        np.save(path[:-4] + ".npy", samples)
        print(f"Wrote {len(samples)} samples from step {step} to {path}")
    logging.info("Sampled %d examples with %s (%d steps).", len(samples), s.sampler, s.steps)
    return path
