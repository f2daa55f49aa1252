"""bench_ode_nll from the command line on a tiny trained workdir: every (time, tolerance) row
and the reference are measured, the same examples and probes give nearly the same bits/dim in
t and in log-SNR, and the tables are written; rows listed one by one (solver and step-size
controller) reuse the reference of an earlier run's JSON."""

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
         f"--workdir={workdir}", "--tols=1e-3", "--density_tols=0,1e-4", "--reference_tol=1e-5",
         "--reference_solver=tsit5", "--trace=exact", f"--out={out}"],
        cwd=th.REPO, env=th.env_for(), capture_output=True, text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "ode_nll.json").read_text())
    rows = {(r["time"], r["density_tol"]): r for r in record["rows"]}
    assert sorted(rows) == [("log_snr", 0), ("log_snr", 1e-4), ("t", 0), ("t", 1e-4)]
    assert record["meta"]["examples"] == 96
    for r in (*rows.values(), record["reference"]):
        assert r["solver"] == "tsit5" and r["steps_mean"] > 1
        assert r["nfe_per_example"] == 6 * r["steps_mean"]
    assert record["reference"]["steps_mean"] > rows["t", 0]["steps_mean"]  # tighter: more steps
    # Bounding the log-density's error too takes more steps and is closer to the reference.
    assert rows["t", 1e-4]["steps_mean"] > rows["t", 0]["steps_mean"]
    assert rows["t", 1e-4]["example_mae"] < rows["t", 0]["example_mae"]
    for r in rows.values():
        assert len(r["per_example"]) == 96
        assert r["error"] == pytest.approx(abs(r["bpd"] - record["reference"]["bpd"]), abs=1e-9)
        assert r["error"] <= r["example_mae"] <= r["example_max_error"], r
        assert r["error"] < 0.05, r
    table = (out / "ode_nll.md").read_text()
    assert "| log_snr | 0.001 | 0.0001 | 0/1 |" in table and "| t | 0.001 | 0 | 0/1 |" in table

    # Rows listed one by one (Bosh3 with a PI controller) against the reference of the run
    # above, reused from its JSON rather than solved again.
    again = tmp_path_factory.mktemp("ode_nll_rows")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_ode_nll", f"--config={th.CONFIG}", *flags,
         f"--workdir={workdir}", "--rows=bosh3/t/1e-3/1e-4/0.3/0.4", "--reference_tol=1e-5",
         "--reference_solver=tsit5", "--trace=exact", f"--out={again}", "--name=pid",
         f"--reference_json={out / 'ode_nll.json'}"],
        cwd=th.REPO, env=th.env_for(), capture_output=True, text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in again.iterdir()) == ["pid.json", "pid.md"]
    second = json.loads((again / "pid.json").read_text())
    assert second["reference"] == record["reference"]
    (row,) = second["rows"]
    assert (row["solver"], row["pcoeff"], row["icoeff"], row["density_tol"]) == (
        "bosh3", 0.3, 0.4, 1e-4)  # fmt: skip
    assert row["nfe_per_example"] == 3 * row["steps_mean"] and row["steps_mean"] > 1
    assert row["example_mae"] < 0.05, row
