"""Evaluation: the likelihood of a run's parameters on the whole eval split with every
estimator `config.eval.estimator` names (vdm/estimators.py), and `--mode=eval` on a
checkpoint, which also writes one JSON record per estimator.

The eval split is covered exactly once (padding masked out) with the EVAL key stream, so the
figures are deterministic for a given checkpoint and device count.
"""

import functools
import json

import jax
import numpy as np
from etils import epath

from vdm import parallel
from vdm.estimators import ESTIMATORS
from vdm.run.checkpoint import CheckpointError
from vdm.run.setup import KeyStream, Run
from vdm.sampling import likelihood


@functools.lru_cache(maxsize=8)
def _estimate_fn(model, name: str, options: tuple, batch_sharding):
    # One jitted estimator per (model, estimator, options), so periodic evals compile once.
    def estimate(params, batch, key):
        return ESTIMATORS.build(
            name, dict(options), model=model, params=params, batch=batch, key=key,
            batch_sharding=batch_sharding,
        )  # fmt: skip

    return jax.jit(estimate)


def estimate(run: Run, params, name: str, *, max_examples: int | None = None) -> dict:
    """One registered estimator over the eval split: {'bpd', 'bpd_stderr', terms, ...}."""
    options = tuple(sorted(run.estimators.get(name, {}).items()))
    fn = _estimate_fn(run.model, name, options, parallel.batch_sharding(run.mesh))
    batches = (parallel.global_batch(b, run.mesh) for b in run.eval_batches(max_examples))
    return likelihood.evaluate_estimate(
        lambda b, k: fn(params, b, k),
        batches,
        key=run.key(KeyStream.EVAL),
        num_draws=run.config.eval.num_draws,
    )


def true_bpd(run: Run, max_examples: int | None = None) -> float:
    """The data distribution's own NLL of the eval split in bits/dim (known densities)."""
    cap = run.config.eval.max_examples if max_examples is None else max_examples
    batches = run.dataset.eval_batches(batch_size=1024, max_examples=cap)
    x = [b["x"][b["mask"] > 0] for b in batches]
    nll = -run.info.log_prob(np.concatenate(x))
    return float(np.mean(nll) / (run.model.num_dims * np.log(2.0)))


def evaluate(run: Run, params, *, max_examples: int | None = None) -> dict:
    """Every configured estimator over the eval split, and the schedule endpoints.

    Args:
      run: the Run.
      params: the parameters to evaluate (EMA ones, normally).
      max_examples: cap on examples; None = config.eval.max_examples (-1 = all).

    Returns:
      Dict of floats named 'eval/...': the ELBO's as 'eval/bpd', 'eval/bpd_stderr',
      'eval/diffusion_bpd', ...; any other estimator's as 'eval/<name>_bpd', ...
    """
    out = {}
    if "elbo" in run.estimators:
        out.update(_evaluate_elbo(run, params, max_examples))
    for name in run.estimators:
        if name != "elbo":
            result = estimate(run, params, name, max_examples=max_examples)
            out.update({f"eval/{name}_{k}": float(v) for k, v in result.items()})
    g0, g1 = run.model.endpoints(params)
    out["eval/gamma_0"], out["eval/gamma_1"] = float(g0), float(g1)
    if run.info.log_prob is not None:
        out["eval/true_bpd"] = true_bpd(run, max_examples)
        for name in run.estimators:
            key = "eval/bpd" if name == "elbo" else f"eval/{name}_bpd"
            gap = "eval/bpd_gap" if name == "elbo" else f"eval/{name}_bpd_gap"
            out[gap] = out[key] - out["eval/true_bpd"]
    return out


def _evaluate_elbo(run: Run, params, max_examples: int | None) -> dict:
    # The registered elbo estimator, reduced with the ELBO's own term breakdown.
    terms = _estimate_fn(run.model, "elbo", (), parallel.batch_sharding(run.mesh))
    batches = (parallel.global_batch(b, run.mesh) for b in run.eval_batches(max_examples))
    result = likelihood.evaluate_elbo(
        lambda b, k: terms(params, b, k),
        batches,
        key=run.key(KeyStream.EVAL),
        num_draws=run.config.eval.num_draws,
    )
    return {f"eval/{k}": float(np.asarray(v)) for k, v in result.items() if np.ndim(v) == 0}


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
    """Every configured estimator on the latest checkpoint.

    Writes workdir/eval_<step>.json (all metrics) and one record per estimator,
    workdir/eval/<step>-<estimator>[-<dequantization>].json, with the options and data named.

    Returns:
      The eval metrics (floats), plus 'step'.
    """
    state, step = restore_latest(run, workdir)
    metrics = evaluate(run, run.eval_params(state))
    metrics["step"] = step
    if jax.process_index() == 0:
        path = epath.Path(workdir) / f"eval_{step}.json"
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        for name, options in run.estimators.items():
            record = _record(run, metrics, step, name, options)
            tag = "-".join([str(step), name] + ([options["dequantization"]]
                           if "dequantization" in options else []))  # fmt: skip
            out = epath.Path(workdir) / "eval" / f"{tag}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2) + "\n")
            print(
                f"Step {step}, {name}: test bits/dim {record['bpd']:.4f} "
                f"+- {record['bpd_stderr']:.4f}; written to {out}"
            )
    return metrics


def _record(run: Run, metrics: dict, step: int, name: str, options: dict) -> dict:
    """One estimator's figures, settings and data, as written to workdir/eval/."""
    others = tuple(f"eval/{n}_" for n in run.estimators if n != name and n != "elbo")
    prefix = "eval/" if name == "elbo" else f"eval/{name}_"
    figures = {
        k[len(prefix) :]: v
        for k, v in metrics.items()
        if k.startswith(prefix) and not k.startswith(others)
    }
    if "num_examples" in figures:
        figures["num_examples"] = int(figures["num_examples"])
    return {
        "estimator": name,
        "options": options,
        **figures,
        "step": step,
        "use_ema": bool(run.config.eval.use_ema),
        "num_draws": int(run.config.eval.num_draws),
        "dataset": run.info.name,
        "vocab_size": run.info.vocab_size,
        "units": "bits per dimension of the data as stored (its own vocabulary)",
    }
