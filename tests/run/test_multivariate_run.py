"""schedule.type=multivariate from the config and the command line: it trains, evaluates and
samples, on 1 and on 4 simulated devices alike, and every part that needs one scalar gamma per
example refuses it when the run is assembled."""

import numpy as np
import pytest
import train_helpers as th

from vdm.run.setup import build_run


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"sample__sampler": "ddim"}, "sample.sampler='ddim'"),
        ({"eval__estimator": "elbo,ode"}, "PF-ODE"),
        ({"schedule__grad": "variance"}, "schedule.grad='variance'"),
        ({"loss__type": "weighted", "loss__weighting": "edm"}, "loss.type='weighted'"),
        ({"loss__time__proposal": "schedule"}, "loss.time.proposal='schedule'"),
    ],
)
def test_unsupported_parts_are_refused_at_config_time(extra, match):
    config = th.load_config(schedule__type="multivariate", **extra)
    with pytest.raises(ValueError, match=match):
        build_run(config)


def test_the_schedule_is_built_for_the_data_shape():
    config = th.load_config(
        schedule__type="multivariate", schedule__multivariate__per="per_channel"
    )
    run = build_run(config)
    assert run.model.schedule.event_shape == (2,)


@pytest.mark.slow
def test_cli_trains_evaluates_and_samples(tmp_path):
    flags = th.overrides(
        schedule__type="multivariate",
        schedule__multivariate__learn_endpoints=True,
        model__parameterization="v",
        train__num_steps=3,
        train__eval_every=3,
        train__ckpt_every=3,
    )
    proc = th.run_main(tmp_path, *flags)
    assert "Test bits/dim" in proc.stdout
    records = th.read_metrics(tmp_path)
    final = [r for r in records if "eval/bpd" in r][-1]
    assert final["step"] == 3 and np.isfinite(final["eval/bpd"])
    # The endpoints are learned: their mean moved from the config's values.
    assert final["eval/gamma_1"] != pytest.approx(5.0, abs=1e-7)
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (8, 2) and np.isfinite(samples).all()
    # The same run on 4 simulated devices: the per-element schedule is replicated, the batch
    # sharded; the losses, the evaluation and the samples agree to float rounding.
    four = tmp_path / "four"
    th.run_main(four, *flags, devices=4)
    one_losses, four_losses = th.train_losses(tmp_path), th.train_losses(four)
    assert sorted(four_losses) == sorted(one_losses) == [1, 2, 3]
    np.testing.assert_allclose(list(four_losses.values()), list(one_losses.values()), rtol=1e-5)
    four_final = [r for r in th.read_metrics(four) if "eval/bpd" in r][-1]
    np.testing.assert_allclose(four_final["eval/bpd"], final["eval/bpd"], rtol=1e-5)
    np.testing.assert_allclose(np.load(four / "samples.npy"), samples, atol=1e-5)
