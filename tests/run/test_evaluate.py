"""`--mode=eval` with every registered likelihood estimator, from the config.

The ODE estimator is checked through the run's own evaluation path against a closed form:
with the exact denoiser of the Gaussian dataset, the PF-ODE density of the data is the data's
density, so its bits/dim must equal the dataset's true bits/dim to solver tolerance, while
the ELBO bounds it from above.
"""

import dataclasses
import json

import flax.linen as nn
import numpy as np
import pytest
import train_helpers as th
from absl import flags
from ml_collections import config_flags

from vdm import estimators
from vdm.core import oracles
from vdm.data import densities
from vdm.run import evaluate
from vdm.run.setup import KeyStream, build_run


class Oracle(nn.Module):
    """The exact eps-denoiser of N(mean, cov) as a parameter-free network."""

    mean: tuple
    cov: tuple

    @nn.compact
    def __call__(self, z, gamma, cond=None, train: bool = False):
        del cond, train
        return oracles.gaussian_eps(np.asarray(self.mean), np.asarray(self.cov))(z, gamma)


def oracle_run(**extra):
    config = th.load_config(
        data__gaussian__num_eval=128,
        schedule__type="fixed_linear",
        schedule__gamma_min=-13.3,  # sigma_0 small enough that p_0 is the data density
        eval__estimator="elbo,ode",
        eval__ode__dequantization="none",
        eval__ode__rtol=1e-5,
        eval__ode__atol=1e-5,
        **extra,
    )
    run = build_run(config)
    dist = densities.default_gaussian(config.data.gaussian.dim)
    network = Oracle(tuple(np.asarray(dist.mean).tolist()), tuple(map(tuple, dist.cov.tolist())))
    return dataclasses.replace(run, model=dataclasses.replace(run.model, network=network))


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_ode_estimator_matches_the_true_density_and_the_elbo_bounds_it(trace):
    run = oracle_run(eval__ode__trace=trace, eval__ode__num_probes=4)
    params = {"model": {}, "schedule": {}}
    out = evaluate.evaluate(run, params)
    assert out["eval/ode_num_examples"] == 128 and out["eval/num_examples"] == 128
    # 2e-3 bits/dim: the float32 solve's accuracy, as in tests/sampling/test_likelihood.py.
    tol = 2e-3 if trace == "exact" else 4 * out["eval/ode_bpd_stderr"] + 2e-3
    assert abs(out["eval/ode_bpd"] - out["eval/true_bpd"]) < tol, out
    assert out["eval/ode_num_steps_mean"] > 1
    # The per-term breakdown adds up; no dequantisation, so its term is zero.
    parts = sum(out[f"eval/ode_{t}"] for t in estimators.TERMS)
    np.testing.assert_allclose(parts, out["eval/ode_bpd"], rtol=1e-5, atol=1e-6)
    assert out["eval/ode_dequantization_bpd"] == 0.0 and out["eval/ode_importance_bpd"] == 0.0
    # The ELBO is an upper bound on the exact NLL (up to its Monte-Carlo noise).
    assert out["eval/bpd"] > out["eval/true_bpd"] - 3 * out["eval/bpd_stderr"]


def test_unknown_estimator_or_option_fails_at_assembly():
    with pytest.raises(ValueError, match="Unknown estimator 'flow'"):
        build_run(th.load_config(eval__estimator="elbo,flow"))
    with pytest.raises(ValueError, match="empty"):
        build_run(th.load_config(eval__estimator=" "))


@pytest.mark.slow
def test_eval_mode_writes_one_record_per_estimator(tmp_path):
    th.run_main(tmp_path, *th.overrides(train__num_steps=2, train__eval_every=2))
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["dataset"]["shape"] == [2] and recorded["dataset"]["name"] == "gaussian"
    assert recorded["eval"]["estimator"] == "elbo"
    proc = th.run_main(
        tmp_path,
        *th.overrides(eval__estimator="elbo,ode"),
        "--config.eval.ode.dequantization=none",
        "--config.eval.ode.solver=heun",
        "--config.eval.ode.steps=8",
        mode="eval",
    )
    elbo = json.loads((tmp_path / "eval" / "2-elbo.json").read_text())
    ode = json.loads((tmp_path / "eval" / "2-ode-none.json").read_text())
    assert elbo["estimator"] == "elbo" and ode["estimator"] == "ode"
    assert ode["options"]["solver"] == "heun" and ode["options"]["steps"] == 8
    assert ode["num_steps_mean"] == 8  # a fixed grid of 8 Heun steps
    for record in (elbo, ode):
        assert np.isfinite(record["bpd"]) and record["num_examples"] == 96
        assert record["step"] == 2 and record["dataset"] == "gaussian"
        assert str(tmp_path / "eval") in proc.stdout
    assert "diffusion_bpd" in elbo and "nll" in ode


def parse_flags(*args):
    """The config as `python -m vdm.main --config=configs/digits.py ARGS` would see it."""
    argv = ["vdm.main", f"--config={th.CONFIG}", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


@pytest.mark.parametrize("dequantization", ["truncated_normal", "uniform"])
def test_dequantised_ode_estimator_from_the_command_line(dequantization):
    """`--mode=eval --config.eval.estimator=ode --config.eval.ode.dequantization=...` on the
    digits (V = 17) with the tiny class-conditional U-Net: K = 2 draws, terms that add up to the
    bits/dim, and a bound on -log of a probability mass, so positive."""
    config = parse_flags(
        *th.overrides(**th.UNET, model__num_classes=10, eval__max_examples=16),
        "--config.eval.estimator=ode",
        f"--config.eval.ode.dequantization={dequantization}",
        "--config.eval.ode.num_samples=2",
        "--config.eval.ode.solver=heun",
        "--config.eval.ode.steps=4",
    )
    run = build_run(config)
    assert run.estimators["ode"]["dequantization"] == dequantization
    assert run.estimators["ode"]["num_samples"] == 2
    out = evaluate.evaluate(run, run.model.init_params(run.key(KeyStream.INIT)))
    assert out["eval/ode_num_examples"] == 16 and out["eval/ode_num_steps_mean"] == 4
    parts = sum(out[f"eval/ode_{t}"] for t in estimators.TERMS)
    np.testing.assert_allclose(parts, out["eval/ode_bpd"], rtol=1e-5)
    assert out["eval/ode_importance_bpd"] <= 0.0
    assert np.isfinite(out["eval/ode_bpd"]) and out["eval/ode_bpd"] > 0
    line = estimators.accounting(dequantization, run.info.vocab_size, 2)
    assert line.startswith("bits per 17-valued sub-pixel (V=17)") and "K=2" in line
