"""Data parallelism: 1 vs 4 simulated CPU devices, and two processes joined by
jax.distributed on localhost (gloo collectives), all matching one single-device run."""

import numpy as np
import pytest
import train_helpers as th

pytestmark = pytest.mark.slow  # every test here launches vdm.main processes

STEPS = 6
RUN = dict(
    train__num_steps=STEPS,
    train__ckpt_every=STEPS,
    train__eval_every=STEPS,
    train__write_samples=False,
)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    # Built once for the whole run, even when pytest-xdist spreads these tests over workers.
    return th.workdir_once(
        tmp_path_factory, "multiprocess_one_device", lambda w: th.run_main(w, *th.overrides(**RUN))
    )


def _assert_same_run(workdir, reference, rtol=2e-5):
    losses, expected = th.train_losses(workdir), th.train_losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in expected:
        np.testing.assert_allclose(losses[step], expected[step], rtol=rtol, err_msg=str(step))
    bpd = [r["eval/bpd"] for r in th.read_metrics(workdir) if "eval/bpd" in r]
    ref_bpd = [r["eval/bpd"] for r in th.read_metrics(reference) if "eval/bpd" in r]
    np.testing.assert_allclose(bpd, ref_bpd, rtol=rtol)


def test_four_devices_match_one(tmp_path, single_device):
    th.run_main(tmp_path, *th.overrides(**RUN), devices=4)
    _assert_same_run(tmp_path, single_device)


def test_two_processes_match_one(tmp_path, single_device):
    codes, logs = th.run_processes(tmp_path, *th.overrides(**RUN), logs_dir=tmp_path)
    assert codes == [0, 0], logs
    assert "Starting at step 0 on 2 devices / 2 processes" in logs
    _assert_same_run(tmp_path, single_device)
    assert th.checkpoint_steps(tmp_path) == [STEPS]
