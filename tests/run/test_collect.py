"""The table of `python -m vdm.collect` of a workdir's eval records beside the published numbers."""

import json

import pytest

from vdm.run import eval_records, eval_table
from vdm.run.eval_records import Job

FACTS = {
    "use_ema": True,
    "num_draws": 1,
    "split": "eval",
    "split_name": "test",
    "dataset": {"name": "cifar10"},
}


def _write(workdir, job: Job, step: int, bpd: float, **extra):
    figures = {"bpd": bpd, "bpd_stderr": 0.01, "num_examples": 10000, **extra}
    rec = eval_records.record(job, figures, step=step, run_facts=FACTS, accounting="bits per x")
    path = workdir / "eval" / f"{job.tag(step)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_table_lists_every_record_next_to_the_published_numbers(tmp_path):
    _write(tmp_path, Job("ode", {"dequantization": "uniform"}), 10, 2.70,
           num_steps_mean=120.0, num_steps_max=150.0)  # fmt: skip
    _write(tmp_path, Job("elbo", {}, condition="null"), 10, 2.66)
    text = eval_table.table(eval_table.read_records([tmp_path]), "configs/cifar10.py")
    assert text.startswith("Published (configs/cifar10.py): 2.65, 2.637 bits/dim.")
    rows = [ln for ln in text.splitlines() if ln.startswith(f"| {tmp_path}")]
    assert len(rows) == 2
    assert "| elbo | decoder | -log p(x) | 2.6600 ± 0.0100 | 10000 |" in rows[0]
    assert "| ode | uniform |" in rows[1] and "| 120.0/150 |" in rows[1]
    assert "cifar10/test" in rows[1]
    assert "elbo/decoder: bits per x" in text


def test_a_workdir_without_records_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="run --mode=eval"):
        eval_table.read_records([tmp_path])


def test_record_names_keep_settings_that_change_the_figure_apart():
    assert Job("elbo", {}).tag(5) == "5-elbo-decoder"
    assert (
        Job("elbo", {"proposal": "adaptive"}, "null").tag(5) == "5-elbo-decoder-adaptive_t-uncond"
    )
    assert Job("ode", {"dequantization": "uniform", "num_samples": 4}).tag(5) == "5-ode-uniform-k4"
    assert Job("ode", {"dequantization": "none"}, discrete=False).tag(5) == "5-ode-none"
