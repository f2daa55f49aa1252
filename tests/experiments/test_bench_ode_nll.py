"""bench_ode_nll from the command line on a tiny trained workdir: every (time, tolerance) row
and the reference are measured, the same examples and probes give nearly the same bits/dim in
t and in log-SNR, and the tables are written."""

import json
import subprocess
import sys

import pytest
import train_helpers as th


@pytest.mark.slow
def test_command_line_measures_t_and_log_snr_rows(trained_workdir, tmp_path_factory):
    workdir, out = trained_workdir, tmp_path_factory.mktemp("ode_nll")
    flags = [*th.TRAINED_FLAGS, "--config.eval.ode.dequantization=none"]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_ode_nll", f"--config={th.CONFIG}", *flags,
         f"--workdir={workdir}", "--tols=1e-3", "--reference_tol=1e-5",
         "--reference_solver=tsit5", "--trace=exact", f"--out={out}"],
        cwd=th.REPO, env=th.env_for(), capture_output=True, text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "ode_nll.json").read_text())
    rows = {r["time"]: r for r in record["rows"]}
    assert sorted(rows) == ["log_snr", "t"] and record["meta"]["examples"] == 96
    for r in (*rows.values(), record["reference"]):
        assert r["solver"] == "tsit5" and r["steps_mean"] > 1
        assert r["nfe_per_example"] == 6 * r["steps_mean"]
    assert record["reference"]["steps_mean"] > rows["t"]["steps_mean"]  # tighter: more steps
    for r in rows.values():
        assert abs(r["bpd"] - record["reference"]["bpd"]) < 0.05, r
    table = (out / "ode_nll.md").read_text()
    assert "| log_snr | 0.001 |" in table and "| t | 0.001 |" in table
