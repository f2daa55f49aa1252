"""Statistics of a per-example likelihood estimate over a whole split.

An estimator maps (batch, key) to per-example [B] figures: 'bpd' and any other additive terms
(bits/dim shares, nats, ...), and optionally a scalar 'num_steps' (solver steps for the batch).
Each example's draws are averaged first, then `batch_row` reduces one batch to a few masked
scalars on the devices, and `merge_rows` combines a split's rows on the host in float64: the
mean bits/dim with its standard error, the mean of every other term, and the step counts.

The spread is carried as each batch's sum of squared deviations about its own mean (M2) and
merged by Chan et al.'s pairwise update, so a long split in float32 loses nothing to
E[x^2] - E[x]^2 cancellation.

Keys are fixed by position: batch i, draw d uses fold_in(fold_in(key, i), d). A fetched row is
a plain dict of floats, so a caller can keep the finished rows of an interrupted pass and
resume it from batch len(rows) with identical figures.
"""

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def draw_average(estimate_fn: Callable, batch: dict, key, num_draws: int = 1):
    """Per-example means of estimate_fn over `num_draws` keys fold_in(key, d).

    Returns:
      (dict of [B] means, [num_draws] solver step counts or None when the estimator has none).
    """
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}.")
    acc, steps = None, []
    for d in range(num_draws):
        out = dict(estimate_fn(batch, jax.random.fold_in(key, d)))
        if "num_steps" in out:
            steps.append(jnp.asarray(out.pop("num_steps"), jnp.float32))
        acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
    mean = jax.tree.map(lambda a: a / num_draws, acc)
    return mean, (jnp.stack(steps) if steps else None)


@jax.jit
def _reduce(per_example: dict, mask):
    # Padding rows may hold anything (even NaN); `where` keeps them out of every sum.
    real = mask > 0
    n = jnp.sum(real.astype(jnp.float32))
    s = jnp.sum(jnp.where(real, per_example["bpd"], 0.0))
    mean = s / jnp.maximum(n, 1.0)
    m2 = jnp.sum(jnp.where(real, jnp.square(per_example["bpd"] - mean), 0.0))
    sums = {k: jnp.sum(jnp.where(real, v, 0.0)) for k, v in per_example.items() if k != "bpd"}
    return {"count": n, "sum": s, "m2": m2, "sums": sums}


def batch_row(estimate_fn: Callable, batch: dict, key, num_draws: int = 1) -> dict:
    """One batch's statistics, still on the devices (nothing is fetched).

    Args:
      estimate_fn: (batch, key) -> {'bpd' [B], other [B] terms, optional scalar 'num_steps'}.
      batch: a batch dict with 'mask' float [B] (1 real, 0 padding).
      key: this batch's key (draw d uses fold_in(key, d)).
      num_draws: Monte-Carlo draws per example, averaged before the spread is taken.

    Returns:
      {'count', 'sum', 'm2', 'sums': {term: masked sum}, ['steps': [num_draws]]}.
    """
    mean, steps = draw_average(estimate_fn, batch, key, num_draws)
    row = _reduce(mean, batch["mask"])
    if steps is not None:
        row["steps"] = steps
    return row


def fetch_rows(rows: list) -> list[dict]:
    """Device rows -> JSON-ready dicts of Python floats (one host transfer for all of them)."""

    def plain(v):
        a = np.asarray(v, np.float64)
        return float(a) if a.ndim == 0 else a.tolist()

    return jax.tree.map(plain, jax.device_get(rows))


def merge_rows(rows: list[dict]) -> dict:
    """A split's figures from its fetched rows (float64).

    Returns:
      {'bpd', 'bpd_stderr', 'num_examples', '<term>' means over real examples,
      'num_steps_mean', 'num_steps_max' (when the rows carry steps)}.

    Raises:
      ValueError: no rows, or no real example among them.
    """
    if not rows:
        raise ValueError("The evaluation got no batches.")
    n_tot, mean, m2 = 0.0, 0.0, 0.0
    for row in rows:
        n = row["count"]
        if n == 0:
            continue
        delta = row["sum"] / n - mean
        n_new = n_tot + n
        m2 += row["m2"] + delta**2 * n_tot * n / n_new
        mean += delta * n / n_new
        n_tot = n_new
    if n_tot == 0:
        raise ValueError("The evaluation saw no real examples (every mask entry was 0).")
    std = np.sqrt(m2 / (n_tot - 1)) if n_tot > 1 else 0.0
    out = {
        "bpd": float(mean),
        "bpd_stderr": float(std / np.sqrt(n_tot)),
        "num_examples": int(round(n_tot)),
    }
    for name in rows[0]["sums"]:
        out[name] = float(sum(r["sums"][name] for r in rows) / n_tot)
    steps = [s for r in rows for s in r.get("steps", [])]
    if steps:
        out["num_steps_mean"], out["num_steps_max"] = float(np.mean(steps)), float(max(steps))
    return out


def evaluate_split(
    estimate_fn: Callable, batches: Iterable[dict], *, key, num_draws: int = 1
) -> dict:
    """merge_rows over every batch, fetched once after the last one is dispatched.

    Args:
      estimate_fn: see batch_row; normally jitted, with batches placed on the devices.
      batches: iterable of batch dicts with 'mask'.
      key: PRNG key; batch i uses fold_in(key, i).
      num_draws: Monte-Carlo draws per example.

    Returns:
      The dict of `merge_rows`.
    """
    rows = [
        batch_row(estimate_fn, b, jax.random.fold_in(key, i), num_draws)
        for i, b in enumerate(batches)
    ]
    return merge_rows(fetch_rows(rows))
