"""`--mode=eval` as a user runs it: the same figures on 1 and 4 devices and on 2 processes, a
pass killed midway and relaunched gives the uninterrupted record, and `vdm.collect` tables it.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import train_helpers as th

pytestmark = pytest.mark.slow  # every test here launches vdm.main processes

# Both estimators, the ODE adaptive (its step count is part of what must agree).
EVAL = [
    "--config.eval.estimator=elbo,ode",
    "--config.eval.ode.dequantization=none",
    "--config.eval.ode.trace=exact",
    "--config.eval.ode.rtol=1e-4",
    "--config.eval.ode.atol=1e-4",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # Built once for the whole run (tests copy it), however pytest-xdist spreads them.
    return th.tiny_trained(tmp_path_factory)


def _records(workdir) -> dict:
    return {p.name: json.loads(p.read_text()) for p in (workdir / "eval").glob("*.json")}


def _evaluated_copy(trained, tmp_path, name, *flags, devices=1):
    workdir = tmp_path / name
    shutil.copytree(trained, workdir)
    th.run_main(workdir, *th.overrides(), *EVAL, *flags, mode="eval", devices=devices)
    return _records(workdir)


def _assert_same_figures(records, reference):
    assert sorted(records) == sorted(reference) == ["2-elbo-none.json", "2-ode-none.json"]
    for name, ref in reference.items():
        got = records[name]
        # The ELBO to float rounding; the ODE to its solver's tolerance (rtol 1e-4 on z: the
        # same steps, but sums in another order move each example's solve by ~1e-5).
        tol = 1e-6 if "elbo" in name else 1e-4
        np.testing.assert_allclose(got["bpd"], ref["bpd"], rtol=0, atol=tol, err_msg=name)
        np.testing.assert_allclose(
            got["bpd_stderr"], ref["bpd_stderr"], rtol=0, atol=tol / 4, err_msg=name
        )
        assert got["num_examples"] == ref["num_examples"] == 96
        assert got.get("num_steps_mean") == ref.get("num_steps_mean"), name
        assert got.get("num_steps_max") == ref.get("num_steps_max"), name


def test_devices_and_processes_give_the_same_figures(trained, tmp_path):
    one = _evaluated_copy(trained, tmp_path, "one")
    assert one["2-ode-none.json"]["num_steps_mean"] > 2  # an adaptive solve, not a fixed grid
    _assert_same_figures(_evaluated_copy(trained, tmp_path, "four", devices=4), one)

    workdir = tmp_path / "two_processes"
    shutil.copytree(trained, workdir)
    codes, logs = th.run_processes(workdir, *th.overrides(), *EVAL, mode="eval", logs_dir=tmp_path)
    assert codes == [0, 0], logs
    _assert_same_figures(_records(workdir), one)


def test_ode_time_density_bound_and_controller_from_the_command_line(trained, tmp_path):
    # The same density whatever the ODE's time variable: eval.ode.time=sigma (EDM's sigma /
    # alpha, state z / alpha) against the default t. The log-density is not in the solver's
    # error norm, so at rtol 1e-4 the solve in t was 5e-3 bits/dim off (in sigma 1e-4); at 1e-5
    # the two were 3e-4 apart, at 1e-6 9e-5 (both moving to 4.9255).
    tol = ["--config.eval.ode.rtol=1e-5", "--config.eval.ode.atol=1e-5"]
    ode_only = [*EVAL, "--config.eval.estimator=ode", *tol]
    in_t = _evaluated_copy(trained, tmp_path, "t", *ode_only)["2-ode-none.json"]
    in_sigma = _evaluated_copy(trained, tmp_path, "sigma", *ode_only,
                               "--config.eval.ode.time=sigma")["2-ode-none.json"]  # fmt: skip
    assert in_t["options"]["time"] == "t" and in_sigma["options"]["time"] == "sigma"
    assert in_sigma["num_steps_mean"] > 2  # an adaptive solve in the new time
    np.testing.assert_allclose(in_sigma["bpd"], in_t["bpd"], rtol=0, atol=1e-3)
    assert in_sigma["num_examples"] == in_t["num_examples"] == 96
    # eval.ode.density_tol puts the log-density into the controller's norm with its own
    # tolerance: at a state tolerance of 1e-3 the density is then as close as the 1e-5 solve.
    loose = ["--config.eval.ode.rtol=1e-3", "--config.eval.ode.atol=1e-3"]
    density = ["--config.eval.estimator=ode", *loose, "--config.eval.ode.density_tol=1e-5"]
    bounded = _evaluated_copy(trained, tmp_path, "density", *EVAL, *density)["2-ode-none.json"]
    assert bounded["options"]["density_tol"] == 1e-5
    np.testing.assert_allclose(bounded["bpd"], in_t["bpd"], rtol=0, atol=1e-3)
    # Bosh3 with a PI step-size controller (eval.ode.solver, pcoeff, icoeff): the solver and
    # controller of the README's cheaper ODE setting (under half the default's network
    # evaluations on the digits model, at its accuracy).
    cheap = [*density, "--config.eval.ode.solver=bosh3", "--config.eval.ode.pcoeff=0.3",
             "--config.eval.ode.icoeff=0.4"]  # fmt: skip
    bosh3 = _evaluated_copy(trained, tmp_path, "bosh3", *EVAL, *cheap)["2-ode-none.json"]
    assert bosh3["options"]["solver"] == "bosh3" and bosh3["options"]["pcoeff"] == 0.3
    assert bosh3["num_steps_mean"] > 2
    np.testing.assert_allclose(bosh3["bpd"], in_t["bpd"], rtol=0, atol=1e-3)


def test_a_killed_evaluation_resumes_to_the_uninterrupted_record(trained, tmp_path):
    # Many small batches, a save after each: the kill lands mid-pass.
    many = [*EVAL, "--config.data.gaussian.num_eval=1000", "--config.data.eval_batch_size=8",
            "--config.eval.report_every=0"]  # fmt: skip
    reference = _evaluated_copy(trained, tmp_path, "reference", *many)

    workdir = tmp_path / "killed"
    shutil.copytree(trained, workdir)
    proc = th.spawn_main(workdir, *th.overrides(), *many, mode="eval", log=tmp_path / "kill.log")
    partial_dir = workdir / "eval" / "partial"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            saved = list(partial_dir.glob("*-ode-*.json")) if partial_dir.exists() else []
            if saved and len(json.loads(saved[0].read_text() or '{"rows": []}')["rows"]) >= 20:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "kill.log").read_text()[-3000:]
    assert "2-elbo-none.json" in _records(workdir) and "2-ode-none.json" not in _records(workdir)

    resumed = th.run_main(workdir, *th.overrides(), *many, mode="eval")
    assert "resuming after" in resumed.stdout and "ETA" in resumed.stdout
    records = _records(workdir)
    for name in reference:
        assert records[name]["bpd"] == reference[name]["bpd"], name
        assert records[name]["bpd_stderr"] == reference[name]["bpd_stderr"], name
    assert not list(partial_dir.glob("*"))

    table = subprocess.run(
        [sys.executable, "-m", "vdm.collect", str(workdir), "--config=configs/digits.py"],
        cwd=th.REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert table.stdout.count(f"| {workdir} | 2 |") == 2
    assert "Published (configs/digits.py)" in table.stdout


def test_digits_unet_ode_and_elbo_records_agree(tmp_path):
    # A briefly trained digits U-Net: both records are written, the ODE's decoder bound lies
    # within 1 bit/dim of the ELBO (the same decoder and z_0; only -log p(z_0) differs between
    # the diffusion's bound and the ODE's density, which agree for a perfect denoiser; after
    # 300 steps the ODE was measured 0.55 above the ELBO +- 0.31 at rtol 1e-3). That figure is
    # one training trajectory's, so both launches compile as the product does: the suite's
    # fast-compile flags (train_helpers.SUBPROCESS_XLA_FLAGS) round differently, train another
    # model and measured it 1.08 apart.
    unet = th.overrides(**th.UNET, train__num_steps=300, train__write_samples=False,
                        optim__learning_rate=2e-3, optim__ema_rate=0.99)  # fmt: skip
    th.run_main(tmp_path, *unet, product=True)
    # 32 test digits: the ODE pass (2.3 examples/s here) is most of this test's time.
    ode = ["--config.eval.ode.trace=hutchinson", "--config.eval.ode.rtol=1e-2",
           "--config.eval.ode.atol=1e-2", "--config.eval.max_examples=32",
           "--config.data.eval_batch_size=32"]  # fmt: skip
    th.run_main(tmp_path, *unet, "--config.eval.estimator=elbo,ode", *ode,
                "--config.eval.ode.dequantization=decoder", mode="eval", product=True)  # fmt: skip
    # (Uniform dequantisation from the command line: tests/run/test_evaluate.py.)
    records = _records(tmp_path)
    elbo, decoder = (records[f"300-{n}.json"] for n in ("elbo-decoder", "ode-decoder"))
    assert elbo["num_examples"] == decoder["num_examples"] == 32
    assert abs(decoder["bpd"] - elbo["bpd"]) < 1.0, (decoder["bpd"], elbo["bpd"])
    parts = sum(
        decoder["terms"][f"{t}"]
        for t in ("prior_bpd", "divergence_bpd", "dequantization_bpd", "jacobian_bpd")
    )
    np.testing.assert_allclose(parts + decoder["terms"]["importance_bpd"], decoder["bpd"],
                               rtol=1e-4)  # fmt: skip
