"""Tests of the benchmark's measurements (experiments/bench): XLA's cost and memory queries on
this backend, the timed and profiled train step, and the README rewrite. Speed itself is
measured by `python -m experiments.benchmark`, not asserted here."""

import numpy as np
import pytest
import train_helpers as th

from experiments.bench import costs, report, throughput
from vdm import parallel
from vdm.run.setup import build_run

UNET = th.UNET  # the two-block U-Net on digits (tests/train_helpers.py)


def test_benchmark_cost_and_memory_queries():
    # The tiny MLP's train step (2.3 MFLOP): the queries do not depend on the network, and the
    # U-Net's step is compiled by the next test already (this one took twice as long with it).
    rec = costs.compile_only(th.load_config())
    assert rec["flops_per_step"] > 1e6 and rec["compile_s"] > 0
    assert rec["temp_bytes"] >= 0 and rec["argument_bytes"] > 0
    run = build_run(th.load_config(**UNET))
    batch = costs.random_batch(run, 8)
    assert batch["x"].shape == (8, 8, 8, 1) and batch["x"].dtype == np.uint8
    placed = parallel.global_batch(batch, run.mesh)
    assert placed["x"].shape == (8, 8, 8, 1)


def test_benchmark_train_measurement_and_profile_see_the_convolutions():
    rec, _, _ = throughput.measure_train(
        th.load_config(**UNET), steps=2, budget_s=0.0, profile=True
    )
    assert rec["steps_timed"] == 2 and rec["step_s"] > 0
    assert 0 < rec["fraction_of_matmul"] < 2 and rec["matmul_flops"] > 1e8
    shares = rec["time_breakdown"]
    assert abs(sum(shares.values()) - 1) < 1e-6
    # Convolutions finish on worker threads ("end: NAME" events): they must be counted.
    assert shares.get("convolution", 0) > 0.05, shares
    assert "group norm" in shares and "attention" in shares


def test_benchmark_rewrites_only_the_readme_section(tmp_path):
    readme = tmp_path / "README.md"
    start, end = report.README_START, report.README_END
    readme.write_text(f"# Title\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    report.update_readme(str(readme), "| new | table |")
    assert readme.read_text() == f"# Title\n\nbefore\n{start}\n| new | table |\n{end}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- benchmark.py: start -->"):
        report.update_readme(str(plain), "x")
    assert plain.read_text() == "no markers\n"


def test_input_pipeline_is_timed_or_skipped_with_its_reason(tmp_path):
    run = build_run(th.load_config(**UNET))
    rec = throughput.measure_input(run, batches=3, step_s=10.0)
    assert rec["batches"] == 3 and 0 < rec["input_ms_per_batch"] < 1e4
    assert rec["wait_ms_per_step"] == 0.0  # a 10 s step hides any digits batch
    assert "ms per batch" in report.input_line(rec)
    # CIFAR-10 not prepared in this data_dir (as on this machine: nothing is downloaded).
    config = th.load_config(**dict(UNET, data__name="cifar10", data__data_dir=str(tmp_path)))
    skipped = throughput.measure_input(build_run(config), batches=3, step_s=1.0)
    assert "cifar10" in skipped["skipped"], skipped
    assert "not measured here" in report.input_line(skipped)
