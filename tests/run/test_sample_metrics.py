"""`--mode=sample` with sample.metrics: the JSON record, NFE, class accuracy, the caches.

The in-process tests score samples of an untrained (perturbed) class-conditional digits U-Net
directly with `sample_record`, which needs no checkpoint; the slow tests drive `vdm.main` (one
process, and two joined by jax.distributed) on a run trained for two steps, as a user would.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import train_helpers as th

from vdm.run import sample_metrics
from vdm.run.setup import build_run

DIGITS = dict(
    th.UNET,
    data__eval_batch_size=64,
    model__num_classes=10,
    sample__num=20,
    sample__steps=3,
    sample__metrics__enabled=True,
    sample__metrics__kid_subset_size=20,
)
FIELDS = {"step", "sampler", "steps", "options", "guidance", "num_samples", "nfe",
          "sample_seconds", "compile_seconds", "features", "reference_split", "reference_num",
          "fid", "kid", "kid_std", "class_accuracy", "classifier_test_accuracy"}  # fmt: skip


def _perturbed(params, scale=0.3):
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    return jax.tree.unflatten(tree, [x + scale * rng.standard_normal(x.shape) for x in leaves])


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(run, perturbed state, workdir) with the classifier and reference already cached."""
    workdir = tmp_path_factory.mktemp("sample_metrics")
    run = build_run(th.load_config(**DIGITS))
    state = run.init_state()
    state = state.replace(ema_params=_perturbed(state.ema_params))
    sample_metrics.reference_stats(run, workdir, sample_metrics.build_features(run, workdir))
    return run, state, workdir


def _record(scored, **spec):
    run, state, workdir = scored
    run = dataclasses.replace(run, sampler=dataclasses.replace(run.sampler, **spec))
    written = []
    record = sample_metrics.sample_record(run, workdir, state, 7, written.append)
    assert len(written) == 1 and written[0].shape == (20, 8, 8, 1)
    return record


def test_the_record_holds_every_field_and_is_appended(scored):
    workdir = scored[2]
    record = _record(scored)
    assert FIELDS <= set(record), FIELDS - set(record)
    assert record["nfe"] == 3 and record["step"] == 7 and record["num_samples"] == 20
    assert record["reference_split"] == "eval" and record["reference_num"] == 297
    assert record["fid"] > 0 and record["classifier_test_accuracy"] > 0.9
    assert 0.0 <= record["class_accuracy"] <= 1.0  # guidance 1: scored against the labels
    lines = (workdir / sample_metrics.RECORDS_FILE).read_text().splitlines()
    assert json.loads(lines[-1]) == record
    cached = sorted(p.name for p in (workdir / "metrics").iterdir())
    assert [n.split("_")[0] for n in cached] == ["digits", "reference"], cached


def test_guidance_counts_two_evaluations_per_step_and_null_label_has_no_accuracy(scored):
    guided = _record(scored, guidance=3.0)
    assert guided["nfe"] == 6 and guided["class_accuracy"] is not None
    assert guided["guidance"] == 3.0
    unconditional = _record(scored, guidance=0.0)
    assert unconditional["nfe"] == 3 and unconditional["class_accuracy"] is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sample_metrics_cli")
    settings = {k: v for k, v in DIGITS.items() if "metrics" not in k}
    short = dict(train__num_steps=2, train__write_samples=False, eval__max_examples=64)
    flags = th.overrides(**settings, **short)
    th.run_main(workdir, *flags)
    return workdir, flags


@pytest.mark.slow
def test_mode_sample_with_metrics_writes_the_record_from_the_command_line(trained, tmp_path):
    workdir, flags = trained
    two_processes = tmp_path / "two_processes"
    shutil.copytree(workdir, two_processes)
    proc = th.run_main(workdir, *flags, "--config.sample.metrics.enabled=true", mode="sample")
    assert "digits_classifier FID" in proc.stdout
    (line,) = (workdir / sample_metrics.RECORDS_FILE).read_text().splitlines()
    record = json.loads(line)
    assert FIELDS <= set(record) and record["step"] == 2 and record["nfe"] == 3
    assert (workdir / "samples_2_ancestral_3.npy").exists()
    # Two processes: one record (process 0's) with the same NFE (network calls per sample, not
    # per process or device) and the same samples' metrics.
    codes, logs = th.run_processes(two_processes, *flags, "--config.sample.metrics.enabled=true",
                                   mode="sample", logs_dir=tmp_path)  # fmt: skip
    assert codes == [0, 0], logs
    (line,) = (two_processes / sample_metrics.RECORDS_FILE).read_text().splitlines()
    both = json.loads(line)
    assert both["nfe"] == record["nfe"] == 3
    for name in ("fid", "kid", "class_accuracy"):
        np.testing.assert_allclose(both[name], record[name], rtol=1e-4, err_msg=name)


@pytest.mark.slow
def test_reference_stats_command_and_a_missing_inception_file(trained, tmp_path):
    workdir, flags = trained
    proc = th.run_main(workdir, *flags, mode="reference_stats")
    assert "Reference statistics of 297 eval images" in proc.stdout
    assert "classifier_test_accuracy" in proc.stdout
    missing = tmp_path / "none.npz"
    proc = th.run_main(workdir, *flags, "--config.sample.metrics.enabled=true",
                       "--config.sample.metrics.features=inception",
                       f"--config.sample.metrics.inception.weights={missing}",
                       mode="sample", check=False)  # fmt: skip
    assert proc.returncode == 1
    first = proc.stderr.strip().splitlines()[-2]  # the message, then the --verbose hint
    assert first.startswith("vdm.main: error: sample.metrics.inception.weights=")
    assert "no such file" in first and "convert_inception" in first
