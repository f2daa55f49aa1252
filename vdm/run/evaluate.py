"""Evaluation: the likelihood of a run's parameters on a whole split with every estimator
`config.eval.estimator` names (vdm/estimators.py), for every conditioning of a
class-conditional model (`config.eval.condition`), and `--mode=eval` on a checkpoint, which
writes one record per job (vdm/run/eval_records.py), shows progress and resumes an
interrupted pass without redoing its finished batches.

The split is covered exactly once (padding masked out) with the EVAL key stream and
independent times per example, so the figures are deterministic for a given checkpoint and
their standard errors treat examples as the independent draws they are.
"""

import dataclasses
import functools
import time

import jax
import numpy as np
from etils import epath

from vdm import estimators, parallel
from vdm.core import split_stats
from vdm.estimators import ESTIMATORS
from vdm.run import eval_records
from vdm.run.checkpoint import CheckpointError
from vdm.run.eval_records import Job, PartialRows
from vdm.run.setup import KeyStream, Run


@functools.lru_cache(maxsize=8)
def estimator_fn(model, name: str, options: tuple, batch_sharding):
    """The jitted (params, batch, key, time_hist) -> per-example figures of estimator `name`
    with `options` (sorted (key, value) pairs); cached per (model, estimator, options), so
    periodic evals compile once."""

    def estimate(params, batch, key, time_hist):
        return ESTIMATORS.build(
            name, dict(options), model=model, params=params, batch=batch, key=key,
            batch_sharding=batch_sharding, time_hist=time_hist,
        )  # fmt: skip

    return jax.jit(estimate)


def jobs(run: Run) -> list[Job]:
    """Every (estimator, conditioning) pair the config asks for, ELBO first."""
    names = sorted(run.estimators, key=lambda n: n != "elbo")
    discrete = run.info.vocab_size is not None
    return [
        Job(name, dict(run.estimators[name]), condition, discrete)
        for name in names
        for condition in (run.conditions or ("",))
    ]


def _conditioned(batches, job: Job, num_classes: int):
    # The null-label estimate is the same pass with every label replaced by the null label.
    for batch in batches:
        if job.condition == "null":
            batch = dict(batch, label=np.full_like(batch["label"], num_classes))
        yield batch


class _Progress:
    """A progress line (examples, examples/s, ETA) every `every` seconds on process 0."""

    def __init__(self, name: str, total: int | None, done: int, every: float):
        self.name, self.total, self.every = name, total, every
        self.start_done, self.start = done, time.monotonic()
        self.last = self.start

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def report(self, done: int) -> None:
        self.last = now = time.monotonic()
        rate = (done - self.start_done) / max(now - self.start, 1e-9)
        line = f"eval {self.name}: {done}"
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            line += f"/{self.total} examples ({100 * done / self.total:.0f}%), ETA {eta:.0f} s"
        else:
            line += " examples"
        if jax.process_index() == 0:
            print(f"{line}, {rate:.1f} examples/s", flush=True)


def estimate(
    run: Run,
    params,
    job: Job,
    *,
    max_examples: int | None = None,
    partial: PartialRows | None = None,
    progress: str | None = None,
    time_hist=None,
) -> dict:
    """One job over config.eval.split: merge_rows' {'bpd', 'bpd_stderr', terms, ...}.

    Batch i uses fold_in(EVAL key, i) whatever was done before, so a pass resumed from
    `partial` gives the figures of an uninterrupted one. Rows stay on the devices (no host
    sync) unless `partial` or `progress` asks for progress lines and saves of the finished
    batches (after the first batch, then every config.eval.report_every seconds).

    Args:
      run: the Run.
      params: the parameters to evaluate.
      job: the estimator, options and conditioning.
      max_examples: cap on examples; None = config.eval.max_examples (-1 = all).
      partial: where finished batches are saved and resumed from (--mode=eval).
      progress: a name for progress lines; None prints none.
      time_hist: the train state's per-t loss histogram (for an adaptive time proposal).
    """
    options = tuple(sorted(job.options.items()))
    fn = estimator_fn(run.model, job.estimator, options, parallel.batch_sharding(run.mesh))
    key, draws = run.key(KeyStream.EVAL), run.config.eval.num_draws
    rows = partial.load() if partial else []
    done = len(rows)
    if done and jax.process_index() == 0:
        print(f"eval {progress or job.estimator}: resuming after {done} finished batches "
              f"({partial.path})", flush=True)  # fmt: skip
    cap = run.config.eval.max_examples if max_examples is None else max_examples
    total = run.dataset.split_size(run.config.eval.split)
    total = total if total is None or cap < 0 else min(total, cap)
    meter = None
    if partial or progress:
        count = int(sum(r["count"] for r in rows))
        meter = _Progress(progress or job.estimator, total, count, run.config.eval.report_every)
    pending = []
    batches = _conditioned(run.eval_batches(max_examples), job, run.model.num_classes)
    for i, batch in enumerate(batches):
        if i < done:
            continue  # finished by an earlier launch: its row is in `rows`
        b = parallel.global_batch(batch, run.mesh)
        row = split_stats.batch_row(
            lambda bb, k: fn(params, bb, k, time_hist), b, jax.random.fold_in(key, i), draws
        )
        if meter is None:
            pending.append(row)  # fetched together after the last batch: no host syncs
            continue
        # Progress lines and partial saves need each batch's figures as it finishes; a kill
        # loses at most the batches finished since the last save (report_every seconds).
        rows += split_stats.fetch_rows([row])
        if meter.due() or i == done:
            if partial:
                partial.save(rows)
            meter.report(int(sum(r["count"] for r in rows)))
    rows += split_stats.fetch_rows(pending)
    return split_stats.merge_rows(rows)


def true_bpd(run: Run, condition: str = "", max_examples: int | None = None) -> float:
    """The data distribution's own NLL of the split in bits/dim (known densities):
    -log p(x | y) for condition 'label', -log p(x) otherwise."""
    cap = run.config.eval.max_examples if max_examples is None else max_examples
    batches = list(
        run.dataset.eval_batches(batch_size=1024, max_examples=cap, split=run.config.eval.split)
    )
    real = [b["mask"] > 0 for b in batches]
    x = np.concatenate([b["x"][m] for b, m in zip(batches, real, strict=True)])
    if condition == "label":
        labels = np.concatenate([b["label"][m] for b, m in zip(batches, real, strict=True)])
        nll = -run.info.log_prob_given(x, labels)
    else:
        nll = -run.info.log_prob(x)
    return float(np.mean(nll) / (run.model.num_dims * np.log(2.0)))


def _with_truth(run: Run, job: Job, figures: dict, max_examples) -> dict:
    if run.info.log_prob is None or (job.condition == "label" and not run.info.log_prob_given):
        return figures
    truth = true_bpd(run, job.condition, max_examples)
    return dict(figures, true_bpd=truth, bpd_gap=figures["bpd"] - truth)


def evaluate(run: Run, params, *, max_examples: int | None = None, time_hist=None) -> dict:
    """Every configured job over config.eval.split, and the schedule endpoints.

    Args:
      run: the Run.
      params: the parameters to evaluate (EMA ones, normally).
      max_examples: cap on examples; None = config.eval.max_examples (-1 = all).
      time_hist: the train state's per-t loss histogram (eval.elbo.proposal=adaptive).

    Returns:
      Dict of floats named by each job's prefix: the ELBO's as 'eval/bpd', 'eval/bpd_stderr',
      'eval/diffusion_bpd', ...; another estimator's as 'eval/<name>_bpd', ...; a
      class-conditional model's null-label figures as 'eval/uncond_bpd', 'eval/uncond_<name>_bpd'.
      Known densities add 'true_bpd' and 'bpd_gap' under each prefix (like for like:
      -log p(x | y) for the conditional figures, -log p(x) for the others).
    """
    out = {}
    for job in jobs(run):
        figures = estimate(run, params, job, max_examples=max_examples, time_hist=time_hist)
        figures = _with_truth(run, job, figures, max_examples)
        out.update({job.prefix + k: float(v) for k, v in figures.items()})
    g0, g1 = run.model.endpoints(params)
    out["eval/gamma_0"], out["eval/gamma_1"] = float(g0), float(g1)
    return out


def restore_latest(run: Run, workdir):
    """(state, step) from the workdir's latest good checkpoint, on the run's mesh.

    Raises:
      CheckpointError: the workdir holds no restorable checkpoint.
    """
    if not (epath.Path(workdir) / "checkpoints").exists():  # before orbax creates it
        raise CheckpointError(
            f"No checkpoint in {workdir}: --mode=eval and --mode=sample read a trained run. "
            "Pass the --workdir of one, or train first (the same command with --mode=train)."
        )
    ckpts = run.checkpoints(workdir)
    try:
        found = ckpts.restore(run.abstract_state)
    finally:
        ckpts.close()
    if found is None:
        raise CheckpointError(
            f"No checkpoint in {ckpts.directory}; train first (the same command with "
            "--mode=train) or pass the --workdir of a trained run."
        )
    state, _, step = found
    return state, step


def evaluate_checkpoint(run: Run, workdir) -> dict:
    """Every configured job on the latest checkpoint, resumable, with a record per job.

    Writes workdir/eval/<step>-<estimator>-<dequantization>[-cond|-uncond].json per job and
    workdir/eval_<step>.json (all metrics); finished batches are kept under
    workdir/eval/partial/ until a job completes, so a relaunch redoes no finished batch.

    Returns:
      The eval metrics (floats), plus 'step'.
    """
    state, step = restore_latest(run, workdir)
    params = run.eval_params(state)
    facts = eval_records.run_facts(run)
    fingerprint = dict(
        facts,
        step=step,
        seed=run.seed,
        eval_batch_size=run.config.data.eval_batch_size,
        max_examples=run.config.eval.max_examples,
        processes=jax.process_count(),
    )
    metrics = {}
    for job in jobs(run):
        tag = job.tag(step)
        partial = eval_records.PartialRows(
            workdir, tag, dict(fingerprint, job=dataclasses.asdict(job))
        )
        figures = estimate(
            run, params, job, partial=partial, progress=tag, time_hist=state.time_hist
        )
        figures = _with_truth(run, job, figures, None)
        metrics.update({job.prefix + k: float(v) for k, v in figures.items()})
        out = epath.Path(workdir) / "eval" / f"{tag}.json"
        accounting = _accounting(job, run.info.vocab_size)
        eval_records.write_json(
            out,
            eval_records.record(
                job, figures, step=step, run_facts=facts, accounting=accounting
            ),  # fmt: skip
        )
        partial.remove()
        if jax.process_index() == 0:
            print(
                f"Step {step}, {tag}: bits/dim {figures['bpd']:.4f} "
                f"+- {figures['bpd_stderr']:.4f} ({eval_records.LIKELIHOODS[job.condition]}); "
                f"written to {out}",
                flush=True,
            )
    g0, g1 = run.model.endpoints(params)
    metrics["eval/gamma_0"], metrics["eval/gamma_1"] = float(g0), float(g1)
    metrics["step"] = step
    eval_records.write_json(epath.Path(workdir) / f"eval_{step}.json", metrics)
    return metrics


def _accounting(job: Job, vocab_size) -> str:
    if job.estimator == "elbo":
        return eval_records.elbo_accounting(vocab_size)
    return "PF-ODE likelihood: " + estimators.accounting(
        job.dequantization, vocab_size, int(job.options.get("num_samples", 1))
    )
