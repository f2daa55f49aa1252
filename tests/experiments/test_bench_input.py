"""bench_input from the command line: the digits pipeline trained through vdm.main with one and
with two localhost processes, each row read back from the run's own metrics, both tables
written."""

import json
import subprocess
import sys

import pytest
import train_helpers as th

# The suite's small U-Net on the 8x8 digits: the real data pipeline and loop, compiled in
# seconds; no end-of-training samples (the digits config's 250 sampler steps were a quarter
# of this test's time) and a short final evaluation.
SMALL = [f"{k.replace('__', '.')}={v}" for k, v in th.UNET.items()] + [
    "train.write_samples=false",
    "eval.max_examples=32",
]


@pytest.mark.slow
def test_command_line_measures_one_and_two_processes(tmp_path):
    out = tmp_path / "input"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_input", f"--config={th.CONFIG}",
         "--processes=1,2", "--steps=6", "--log_every=2", *[f"--set={s}" for s in SMALL],
         f"--workdir={tmp_path / 'runs'}", f"--out={out}"],
        cwd=th.REPO, env=th.env_for(), capture_output=True, text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["processes"] for r in rows] == [1, 2]
    for r in rows:
        assert r["windows"] == 2 and 0 < r["input_ms_per_step"] and 0 < r["step_ms"]
        assert r["input_share"] == pytest.approx(r["input_ms_per_step"] / r["step_ms"])
    # Two processes really ran one job: process 1 joined and wrote no metrics of its own.
    assert "2 processes" in (tmp_path / "runs" / "p2" / "proc1.log").read_text()
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| 1 |") == 1 and table.count("\n| 2 |") == 1
