"""Checkpoints with orbax's CheckpointManager: async saves, retention, verified restore.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`; `state` is the train state pytree
(StandardSave, so it restores onto any mesh/device count), `meta` a small JSON record (step,
elapsed wall time, the config). Retention keeps the latest K steps plus the one with the lowest
eval bits/dim. Orbax writes each step to a temporary directory and renames it when complete, so
a kill mid-save leaves no half checkpoint among the finalised ones (temporaries are cleaned at
start-up).

Restoring verifies what it reads (the step recorded inside matches the directory, every array
is finite). A checkpoint that fails to restore is moved aside to `<workdir>/checkpoints.corrupt`
and the previous one is used; if none restores, `CheckpointError` is raised. A run never starts
from scratch while a checkpoint directory holds steps.
"""

import contextlib
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from vdm.errors import UserError
from vdm.run import checkpoint_files

BEST_METRIC = "eval/bpd"


def _metric(metrics) -> float:
    # Saves without an eval carry {} and rank last.
    return float(metrics.get(BEST_METRIC, float("inf")))


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint could be restored, or a checkpoint failed verification."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, unwritable workdir, ...)."""


def _shapes(tree) -> dict[str, tuple]:
    """'a/b/c' -> shape of every array leaf, keyed alike for a saved tree of dicts and a
    live state of dataclasses (orbax stores both as nested dicts of field names)."""

    def name(entry) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(name(e) for e in path): tuple(leaf.shape) for path, leaf in leaves}


def _all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, np.inexact)]
    if not leaves:
        return True
    flags = jax.jit(
        lambda xs: jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in xs]))
    )(leaves)
    return bool(flags)


class Checkpoints:
    """The run's checkpoint directory.

    Args:
      workdir: run directory; checkpoints live in `workdir/checkpoints`.
      keep: how many of the latest checkpoints to keep (the best by eval bits/dim is kept too).
      async_save: write in a background thread (the device-to-host copy still blocks).
    """

    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True):
        workdir = epath.Path(workdir)
        if not workdir.is_absolute():  # orbax rejects relative paths (e.g. --workdir=runs/x)
            workdir = epath.Path(os.path.abspath(workdir))
        self.directory = workdir / "checkpoints"
        self.corrupt_directory = workdir / "checkpoints.corrupt"
        policy = cm.AnyPreservationPolicy(
            [
                cm.LatestN(max(1, int(keep))),
                cm.BestN(
                    get_metric_fn=_metric,
                    reverse=True,  # sorted high to low, the last (kept) one is the lowest
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=_metric,  # makes orbax store each step's metrics (read back on restart)
            best_mode="min",
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._pending = None  # step of the save that may still be running in the background
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def all_steps(self) -> list[int]:
        """Finalised checkpoint steps, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalised step, or None."""
        return self._mngr.latest_step()

    def path(self, step: int) -> str:
        """Directory of the checkpoint at `step`."""
        return str(self.directory / str(step))

    def save(self, step: int, state, meta: Mapping, metrics: Mapping | None = None) -> None:
        """Starts saving `state` at `step` (returns once the arrays are copied off-device).

        Args:
          step: the train step the state has reached.
          state: the train state pytree; must be finite (the caller checks).
          meta: JSON-serialisable record stored beside it.
          metrics: eval metrics (with 'eval/bpd') for keep-best retention, or None.
        """
        if step in self._mngr.all_steps():
            return  # already saved (e.g. final step equals a periodic save)
        best = {}
        if metrics and BEST_METRIC in metrics:
            best = {BEST_METRIC: float(metrics[BEST_METRIC])}
        if self._pending is not None:  # a failure of the previous save is reported as its own
            with self._saving(self._pending):
                self._mngr.wait_until_finished()
            self._pending = None
        with self._saving(step):
            self._mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave(dict(meta, step=int(step))),
                ),
                metrics=best,
                force=True,
            )
        self._pending = step

    @contextlib.contextmanager
    def _saving(self, step: int):
        """Turns any failure of a save (here or in orbax's background thread, which reports
        it at the next call) into a CheckpointSaveError naming the step and what is left."""
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError, tensorstore's ValueError, ...
            self._pending = None
            raise CheckpointSaveError(
                f"Saving checkpoint step {step} to {self.directory} failed: "
                f"{type(e).__name__}: {e}. {self.describe_latest()} (its unfinished temporary "
                "directory is not among the finalised steps and is removed at the next start)."
            ) from e

    def check(self) -> None:
        """Raises CheckpointSaveError if a background save has failed (does not block)."""
        with self._saving(self._pending or -1):
            self._mngr.check_for_errors()

    def describe_latest(self) -> str:
        """'Last complete checkpoint: DIR (step N).' read from disk (safe from any thread)."""
        return checkpoint_files.describe_latest(self.directory)

    def _restore_step(self, step: int, target):
        restored = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        state, meta = restored["state"], dict(restored["meta"])
        if int(meta.get("step", -1)) != step:
            raise CheckpointError(f"metadata records step {meta.get('step')}, not {step}")
        if not _all_finite(state):
            raise CheckpointError("it holds non-finite values")
        return state, meta

    def restore(self, target, step: int | None = None):
        """Restores the newest checkpoint that verifies, onto the shardings in `target`.

        Args:
          target: pytree of ShapeDtypeStruct with shardings (see sharding.with_shardings).
          step: restore exactly this step (no fallback); None = latest with fallback.

        Returns:
          (state, meta, step), or None when the directory holds no checkpoint.

        Raises:
          CheckpointError: checkpoints exist but none restores.
        """
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"No checkpoint for step {step} in {self.directory}.")
            steps = [step]
        if not steps:
            return None
        mismatch = self.shape_mismatch(steps[-1], target)
        if mismatch:
            shown = "; ".join(mismatch[:8]) + ("; ..." if len(mismatch) > 8 else "")
            raise CheckpointError(
                f"The checkpoint {self.path(steps[-1])} does not fit this config: "
                f"{len(mismatch)} arrays differ ({shown}). Relaunch with the config it was "
                "trained with (the workdir's config.json), or use a new workdir."
            )
        failures = []
        for s in reversed(steps):
            try:
                state, meta = self._restore_step(s, target)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                logging.error("Checkpoint %s failed to restore: %r", self.path(s), e)
                failures.append((s, e))
                continue
            if failures:
                self._quarantine([f for f, _ in failures])
            logging.info("Restored checkpoint %s.", self.path(s))
            return state, meta, s
        detail = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures)
        raise CheckpointError(
            f"No checkpoint in {self.directory} could be restored ({detail}). Refusing to start "
            "from scratch: move the directory away to do that deliberately."
        )

    def shape_mismatch(self, step: int, target) -> list[str]:
        """'path: checkpoint SHAPE vs config SHAPE' for every array whose shape or presence
        differs between the saved state at `step` and `target` (empty when they fit, or when
        the metadata is unreadable: the restore attempt then reports the damage)."""
        try:
            # Read by the item's own handler: a manager that has not saved in this process
            # does not know the item's handler and gives no metadata for it.
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        except Exception:  # noqa: BLE001 - a damaged checkpoint is the restore loop's business
            return []
        have = _shapes(getattr(saved, "tree", saved))
        want = _shapes(target)
        return [
            f"{k}: checkpoint {have.get(k, 'absent')} vs config {want.get(k, 'absent')}"
            for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)
        ]

    def _quarantine(self, steps) -> None:
        """Moves unreadable checkpoints aside so new saves at those steps do not collide."""
        if jax.process_index() == 0:
            self.corrupt_directory.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for s in steps:
                dest = self.corrupt_directory / f"{s}-{stamp}"
                (self.directory / str(s)).rename(dest)
                logging.warning("Moved unreadable checkpoint %s to %s.", self.path(s), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vdm_checkpoint_quarantine")
        self._mngr.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk.

        Raises:
          CheckpointSaveError: a pending save failed.
        """
        with self._saving(self._pending or -1):
            self._mngr.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Waits for pending saves and releases the manager.

        Raises:
          CheckpointSaveError: a pending save failed (the manager is released all the same).
        """
        try:
            self.wait()
        finally:
            self._mngr.close()
