"""Evaluation: the full-split ELBO of a run's parameters, and `--mode=eval` on a checkpoint.

The eval split is covered exactly once (padding masked out) with the EVAL key stream, so the
figure is deterministic for a given checkpoint and device count.
"""

import functools
import json

import jax
import numpy as np
from etils import epath

from vdm import parallel
from vdm.run.checkpoint import CheckpointError
from vdm.run.setup import KeyStream, Run
from vdm.sampling import likelihood


@functools.lru_cache(maxsize=8)
def _eval_terms(model):
    # One jitted function per model, so periodic evals compile once.
    return jax.jit(lambda p, b, k: model.loss_terms(p, b, k, train=False))


def true_bpd(run: Run, max_examples: int | None = None) -> float:
    """The data distribution's own NLL of the eval split in bits/dim (known densities)."""
    x = [b["x"][b["mask"] > 0] for b in run.dataset.eval_batches(
        batch_size=1024, max_examples=run.config.eval.max_examples
        if max_examples is None else max_examples)]  # fmt: skip
    nll = -run.info.log_prob(np.concatenate(x))
    return float(np.mean(nll) / (run.model.num_dims * np.log(2.0)))


def evaluate(run: Run, params, *, max_examples: int | None = None) -> dict:
    """Full-split ELBO in bits/dim (with breakdown) and the schedule endpoints.

    Args:
      run: the Run.
      params: the parameters to evaluate (EMA ones, normally).
      max_examples: cap on examples; None = config.eval.max_examples (-1 = all).

    Returns:
      Dict of floats named 'eval/...'.
    """
    terms = _eval_terms(run.model)
    batches = (parallel.global_batch(b, run.mesh) for b in run.eval_batches(max_examples))
    result = likelihood.evaluate_elbo(
        lambda b, k: terms(params, b, k),
        batches,
        key=run.key(KeyStream.EVAL),
        num_draws=run.config.eval.num_draws,
    )
    out = {}
    for name, value in result.items():
        if np.ndim(value) == 0:
            out[f"eval/{name}"] = float(np.asarray(value))
    g0, g1 = run.model.endpoints(params)
    out["eval/gamma_0"], out["eval/gamma_1"] = float(g0), float(g1)
    if run.info.log_prob is not None:
        out["eval/true_bpd"] = true_bpd(run, max_examples)
        out["eval/bpd_gap"] = out["eval/bpd"] - out["eval/true_bpd"]
    return out


def restore_latest(run: Run, workdir):
    """(state, step) from the workdir's latest good checkpoint, on the run's mesh.

    Raises:
      CheckpointError: the workdir holds no restorable checkpoint.
    """
    ckpts = run.checkpoints(workdir)
    try:
        found = ckpts.restore(run.abstract_state)
    finally:
        ckpts.close()
    if found is None:
        raise CheckpointError(f"No checkpoint in {ckpts.directory}; train first.")
    state, _, step = found
    return state, step


def evaluate_checkpoint(run: Run, workdir) -> dict:
    """Full-split ELBO of the latest checkpoint; writes workdir/eval_<step>.json.

    Returns:
      The eval metrics (floats), plus 'step'.
    """
    state, step = restore_latest(run, workdir)
    metrics = evaluate(run, run.eval_params(state))
    metrics["step"] = step
    if jax.process_index() == 0:
        path = epath.Path(workdir) / f"eval_{step}.json"
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(
            f"Step {step}: test bits/dim {metrics['eval/bpd']:.4f} "
            f"+- {metrics.get('eval/bpd_stderr', float('nan')):.4f}; written to {path}"
        )
    return metrics
