"""What an evaluation writes: its jobs' names, their results records, and the finished
batches of an interrupted pass.

One job is one estimator (with its options) under one conditioning of a class-conditional
model. Its record is workdir/eval/<step>-<estimator>-<dequantization>[-cond|-uncond].json with
the figures, the settings, the data and a one-line statement of the accounting. While
`--mode=eval` runs, the rows of its finished batches (vdm.core.split_stats) are saved under
workdir/eval/partial/, named by the job and a fingerprint of every setting that fixes the
figures, so a relaunch with the same settings resumes where the last one stopped and any other
setting starts its own file (nothing is overwritten or silently reset).

Only process 0 writes; files are replaced atomically (write then rename).
"""

import dataclasses
import hashlib
import json

import jax
from etils import epath

from vdm import data
from vdm.data import tfds_images

# What each conditioning of a class-conditional model estimates.
LIKELIHOODS = {
    "": "-log p(x)",
    "label": "-log p(x | y): conditional on the example's label",
    "null": "-log p(x): unconditional, through the null label (trained by label dropout)",
}
_SUFFIX = {"": "", "label": "-cond", "null": "-uncond"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One estimate of a split.

    Attributes:
      estimator: a vdm.estimators.ESTIMATORS name.
      options: its options.
      condition: '' (unconditional model), 'label' or 'null'.
      discrete: whether the data are integer-valued (the ELBO's decoder is its dequantisation).
    """

    estimator: str
    options: dict
    condition: str = ""
    discrete: bool = True

    @property
    def dequantization(self) -> str:
        """The dequantisation the figure uses ('decoder' for the ELBO of discrete data)."""
        if "dequantization" in self.options:
            return str(self.options["dequantization"])
        return "decoder" if self.discrete else "none"

    @property
    def prefix(self) -> str:
        """Metric name prefix: 'eval/' for the ELBO, 'eval/<estimator>_' otherwise, with
        'uncond_' before it for the null-label estimate."""
        name = "" if self.estimator == "elbo" else f"{self.estimator}_"
        return "eval/" + ("uncond_" if self.condition == "null" else "") + name

    def tag(self, step: int) -> str:
        """The record's file stem, e.g. '2000-ode-uniform', '2000-elbo-decoder-uncond';
        settings that change what the figure is get their own records: importance-sampled
        times ('-adaptive_t') and K > 1 importance-weighted ODE draws ('-k4')."""
        extra = ""
        if self.options.get("proposal", "uniform") != "uniform":
            extra += f"-{self.options['proposal']}_t"
        if int(self.options.get("num_samples", 1)) > 1:
            extra += f"-k{int(self.options['num_samples'])}"
        return f"{step}-{self.estimator}-{self.dequantization}{extra}{_SUFFIX[self.condition]}"


def elbo_accounting(vocab_size: int | None) -> str:
    """One line saying what the ELBO's bits/dim count."""
    if vocab_size is None:
        return "bits per dimension of a continuous density; VDM's ELBO, no dequantisation"
    return (
        f"bits per {vocab_size}-valued sub-pixel (log2 of the data's own vocabulary); VDM's "
        "ELBO with its discretised decoder at gamma_0 (no separate dequantisation)"
    )


def record(job: Job, figures: dict, *, step: int, run_facts: dict, accounting: str) -> dict:
    """The JSON record of one job.

    Args:
      job: the Job.
      figures: merge_rows' output (bpd, bpd_stderr, num_examples, terms, steps), plus
        'true_bpd' / 'bpd_gap' for known densities.
      step: the checkpoint step.
      run_facts: {'use_ema', 'num_draws', 'split', 'dataset' (info_record)}.
      accounting: the one-line statement of what the bits/dim count.
    """
    main = ("bpd", "bpd_stderr", "num_examples", "num_steps_mean", "num_steps_max")
    main += ("true_bpd", "bpd_gap")
    return {
        "estimator": job.estimator,
        "dequantization": job.dequantization,
        "likelihood": LIKELIHOODS[job.condition],
        "accounting": accounting,
        **{k: figures[k] for k in main if k in figures},
        "terms": {k: v for k, v in figures.items() if k not in main},
        "options": job.options,
        "step": step,
        **run_facts,
    }


def write_json(path: epath.Path, value) -> None:
    """Writes JSON atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)  # atomic, over an earlier version


class PartialRows:
    """The finished batches' rows of one job's pass, kept in the workdir until it completes."""

    def __init__(self, workdir, tag: str, fingerprint: dict):
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self.path = epath.Path(workdir) / "eval" / "partial" / f"{tag}-{digest[:10]}.json"
        self.fingerprint = fingerprint

    def load(self) -> list[dict]:
        """The rows saved by an earlier launch with the same settings ([] if none)."""
        if not self.path.exists():
            return []
        try:
            saved = json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"The partial evaluation {self.path} is corrupt ({err}); move it aside to start "
                "this evaluation again."
            ) from None
        return list(saved["rows"])

    def save(self, rows: list[dict]) -> None:
        """Replaces the saved rows."""
        write_json(self.path, {"fingerprint": self.fingerprint, "rows": rows})

    def remove(self) -> None:
        """Drops the file once the job's record is written."""
        if jax.process_index() == 0 and self.path.exists():
            self.path.unlink()


def run_facts(run) -> dict:
    """The settings and data every record of a run states."""
    split = run.config.eval.split
    details = run.info.details
    dataset = data.info_record(run.info)
    if details.get("source") == "tfds":
        # Which version a number is on matters (e.g. the two downsampled ImageNets).
        dataset["tfds_name"] = tfds_images.full_name(
            details["tfds_name"], details.get("data_dir", run.config.data.data_dir)
        )
    return {
        "use_ema": bool(run.config.eval.use_ema),
        "num_draws": int(run.config.eval.num_draws),
        "split": split,
        "split_name": details.get("train_split" if split == "train" else "eval_split", split),
        "dataset": dataset,
    }
