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

from vdm import estimators
from vdm.core import oracles
from vdm.data import densities
from vdm.run import evaluate
from vdm.run.eval_records import PartialRows
from vdm.run.setup import KeyStream, build_run


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
    network = th.GaussianOracle(
        tuple(np.asarray(dist.mean).tolist()), tuple(map(tuple, dist.cov.tolist()))
    )
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
def test_eval_mode_writes_one_record_per_estimator(trained_workdir):
    tmp_path = trained_workdir
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
    elbo = json.loads((tmp_path / "eval" / "2-elbo-none.json").read_text())
    ode = json.loads((tmp_path / "eval" / "2-ode-none.json").read_text())
    assert elbo["estimator"] == "elbo" and ode["estimator"] == "ode"
    assert ode["options"]["solver"] == "heun" and ode["options"]["steps"] == 8
    assert ode["num_steps_mean"] == 8  # a fixed grid of 8 Heun steps
    for record in (elbo, ode):
        assert np.isfinite(record["bpd"]) and record["num_examples"] == 96
        assert record["step"] == 2 and record["dataset"]["name"] == "gaussian"
        assert record["split"] == "eval" and record["likelihood"] == "-log p(x)"
        assert str(tmp_path / "eval") in proc.stdout
    assert "diffusion_bpd" in elbo["terms"] and "nll" in ode["terms"]
    assert not list((tmp_path / "eval" / "partial").glob("*"))  # removed once complete


class MixtureOracle(nn.Module):
    """The exact eps-denoiser of the mixture2d data: per component for a label, the whole
    mixture for the null label."""

    @nn.compact
    def __call__(self, z, gamma, cond=None, train: bool = False):
        del train
        dist = densities.default_mixture2d()
        return oracles.mixture_eps(dist.weights, dist.means, dist.variances)(z, gamma, cond)


def test_conditional_and_null_label_likelihoods_compare_like_with_like():
    # With the exact denoiser the ODE density is the data's: -log p(x | y) under the labels,
    # -log p(x) under the null label. Each must match its own true density; comparing the
    # conditional estimate with the marginal density would be off by about log2(8) / 2 bits.
    config = th.load_config(
        data__name="mixture2d",
        data__mixture2d__num_eval=64,
        model__num_classes=8,
        schedule__type="fixed_linear",
        schedule__gamma_min=-13.3,  # sigma_0 small enough that p_0 is the data density
        schedule__gamma_max=10.0,  # and alpha_1 that q(z_1 | y) is N(0, I) for every y
        eval__estimator="ode",
        eval__ode__dequantization="none",
        eval__ode__trace="exact",
    )
    run = build_run(config)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, network=MixtureOracle()))
    out = evaluate.evaluate(run, {"model": {}, "schedule": {}})
    assert out["eval/ode_num_examples"] == 64 and out["eval/uncond_ode_num_examples"] == 64
    for prefix in ("eval/ode_", "eval/uncond_ode_"):
        assert abs(out[prefix + "bpd_gap"]) < 2e-3, (prefix, out)
    # The label is worth log2(8) = 3 bits per example, 1.5 bits per dimension, less the
    # components' small overlap.
    gain = out["eval/uncond_ode_true_bpd"] - out["eval/ode_true_bpd"]
    assert 1.3 < gain < 1.5 + 1e-6


def test_bad_eval_condition_or_split_fails_at_assembly():
    with pytest.raises(ValueError, match="eval.condition"):
        build_run(th.load_config(eval__condition="label,uncond"))
    with pytest.raises(ValueError, match="eval.split='test'"):
        build_run(th.load_config(eval__split="test"))


def test_eval_split_train_covers_the_training_split():
    run = build_run(th.load_config(eval__split="train", data__gaussian__num_train=80))
    out = evaluate.evaluate(run, run.eval_params(run.init_state()))
    assert out["eval/num_examples"] == 80


class Interrupt(Exception):
    pass


def _interrupted_after(dataset, batches: int):
    """The dataset with an eval pass that stops (as a kill would) after `batches` batches."""

    def source(**kw):
        for i, batch in enumerate(dataset.eval_source(**kw)):
            if i == batches:
                raise Interrupt
            yield batch

    return dataclasses.replace(dataset, eval_source=source)


def test_an_interrupted_pass_resumes_from_its_saved_batches(tmp_path, capsys):
    run = build_run(
        th.load_config(data__eval_batch_size=16, eval__report_every=0.0, eval__estimator="ode")
    )
    params = run.eval_params(run.init_state())
    job = evaluate.jobs(run)[0]
    fingerprint = {"test": 1}
    expected = evaluate.estimate(run, params, job)
    cut = dataclasses.replace(run, dataset=_interrupted_after(run.dataset, 3))
    with pytest.raises(Interrupt):
        evaluate.estimate(cut, params, job, partial=PartialRows(tmp_path, "t", fingerprint))
    saved = PartialRows(tmp_path, "t", fingerprint).load()
    assert len(saved) == 3  # every finished batch was saved (report_every=0)
    assert "48/96 examples (50%)" in capsys.readouterr().out
    # The relaunch computes only the remaining 3 batches and gives the uninterrupted figures.
    resumed = evaluate.estimate(run, params, job, partial=PartialRows(tmp_path, "t", fingerprint))
    assert resumed == expected
    # Other settings never pick up these rows.
    assert PartialRows(tmp_path, "t", {"test": 2}).load() == []


# Adaptive ODE solves: 158 s at -O0 against 21 s at -O1.
@pytest.mark.run_bound
@pytest.mark.parametrize("dequantization", ["truncated_normal", "uniform"])
def test_dequantised_ode_estimator_from_the_command_line(dequantization):
    """`--mode=eval --config.eval.estimator=ode --config.eval.ode.dequantization=...` on the
    digits (V = 17) with the tiny class-conditional U-Net: K = 2 draws, terms that add up to the
    bits/dim, and a bound on -log of a probability mass, so positive."""
    config = th.parse_flags(
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
