"""Tests of experiments/objectives.py: every variant's overrides fit the config schema, bad
input is refused, the statistics, and the measurement path end to end on a tiny model."""

import json
import math
import subprocess
import sys

import pytest
import train_helpers as th

from configs import digits
from experiments import objectives
from experiments.bench import objectives_report
from experiments.bench.configs import with_overrides


def tiny_base():
    return with_overrides(digits.get_config(), dict(th.TINY))


def test_every_variant_builds_a_config():
    base = digits.get_config()
    for variant, overrides in objectives.VARIANTS.items():
        config = objectives.run_config(base, variant, seed=3, steps=7, num_draws=2)
        assert config.seed == 3 and config.train.num_steps == 7 and config.eval.num_draws == 2
        assert config.train.eval_every == 7 and not config.train.write_samples
        for key, value in overrides.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (variant, key)
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        objectives.run_config(base, "nope", seed=1, steps=7, num_draws=2)
    with pytest.raises(ValueError, match="at least 1"):
        objectives.run_config(base, "vdm", seed=1, steps=0, num_draws=2)


def test_summary_pairs_by_seed():
    def run(bpd, se=0.01):
        return {"bpd": bpd, "bpd_stderr": se, "per_example_var": 1.0, "wall_s": 2.0}

    two = objectives_report.summarize(
        {"vdm": {"1": run(3.0), "2": run(3.2)}, "v": {"1": run(2.9), "2": run(3.0)}}
    )
    assert two["v"]["diff_mean"] == pytest.approx(-0.15)
    assert two["v"]["diff_se"] == pytest.approx(0.05)  # s.d. of (-0.1, -0.2) over sqrt(2)
    assert two["v"]["diff_se_kind"] == "seeds"
    assert two["vdm"]["bpd_se"] == pytest.approx(0.1)
    one = objectives_report.summarize({"vdm": {"1": run(3.0, 0.03)}, "v": {"1": run(2.9, 0.04)}})
    assert one["v"]["bpd_se"] is None
    assert one["v"]["diff_se"] == pytest.approx(0.05) and one["v"]["diff_se_kind"] == "eval only"
    alone = objectives_report.summarize({"v": {"1": run(2.9)}, "w": {}})
    assert alone["v"]["diff_mean"] is None and "w" not in alone  # no run of w yet


def test_reuse_keeps_runs_of_the_same_setting_only(tmp_path):
    setting = {"config": "configs/digits.py", "steps": 5, "num_draws": 2,
               "variants": {"vdm": {}, "v_pred": {"model.parameterization": "v"}}}  # fmt: skip
    path = tmp_path / "objectives.json"
    assert objectives.earlier_runs(str(path), setting) == {}  # no earlier record
    old = dict(setting, variants={"vdm": {}, "v_pred": {"model.parameterization": "x"}},
               runs={"vdm": {"1": {"bpd": 3.0}}, "v_pred": {"1": {"bpd": 2.0}}})  # fmt: skip
    path.write_text(json.dumps(old))
    assert objectives.earlier_runs(str(path), setting) == {"vdm": {"1": {"bpd": 3.0}}}
    path.write_text(json.dumps(dict(old, steps=6)))
    assert objectives.earlier_runs(str(path), setting) == {}
    # A kept run is not trained again (no config is built from the fake record's figures).
    kept = {"bpd": 3.0, "bpd_stderr": 0.1, "per_example_var": 1.0, "wall_s": 1.0}
    root, done = str(tmp_path / "runs"), {"vdm": {"1": kept}}
    measured = objectives.measure(tiny_base(), ["vdm"], [1], 3, 1, root, done)
    assert measured["runs"]["vdm"]["1"] is kept and measured["reused"] == ["vdm/1"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_measure_writes_json_and_table(tmp_path):
    variants, saved = ["vdm", "v_pred"], []
    measured = objectives.measure(tiny_base(), variants, [1], steps=3, num_draws=2,
                                  root=str(tmp_path / "runs"), after_each=saved.append)  # fmt: skip
    assert [sorted(m["runs"]) for m in saved] == [["vdm"], ["v_pred", "vdm"]]  # after each run
    for variant in variants:
        r = measured["runs"][variant]["1"]
        assert r["step"] == 3 and r["num_examples"] == th.TINY["data.gaussian.num_eval"]
        assert math.isfinite(r["bpd"]) and r["bpd_stderr"] > 0 and r["wall_s"] > 0
        assert r["per_example_var"] == pytest.approx(r["bpd_stderr"] ** 2 * r["num_examples"])
    record = {
        "date": "d", "machine": "m", "jax": "j", "config": "configs/digits.py", "steps": 3,
        "seeds": [1], "num_draws": 2, "command": "c",
        "variants": {v: objectives.VARIANTS[v] for v in variants}, **measured,
    }  # fmt: skip
    table = objectives_report.markdown(record)
    stem = str(tmp_path / "out" / "objectives")
    objectives_report.write(record, table, stem)
    back = json.loads((tmp_path / "out" / "objectives.json").read_text())
    assert set(back["runs"]) == set(variants) and back["summary"]["vdm"]["diff_mean"] is None
    md = (tmp_path / "out" / "objectives.md").read_text()
    for header, _, _ in objectives_report.SUMMARY_COLUMNS:
        assert f" {header} |" in md
    assert "| v_pred | `model.parameterization=v` | 1 |" in md
    assert "One seed" in md and "Incomplete" not in md
    saved, kept = [], {"bpd": 3.0, "bpd_stderr": 0.1, "per_example_var": 1.0, "wall_s": 1.0}
    objectives.measure(tiny_base(), ["vdm", "v_pred"], [1], 2, 1, str(tmp_path / "r3"),
                       {"v_pred": {"1": kept}}, saved.append)  # fmt: skip
    assert saved[0]["runs"]["v_pred"]["1"] is kept  # a kept run is in the first saved record
    partial = dict(record, complete=False)
    assert "Incomplete record" in objectives_report.markdown(partial)


@pytest.mark.slow
def test_command_line_writes_record_and_reuses_it(tmp_path):
    stem = tmp_path / "out" / "objectives"
    base = [sys.executable, "-m", "experiments.objectives", "--steps=2", "--num_draws=1",
            f"--workdir={tmp_path / 'runs'}", f"--out={stem}", *th.overrides()]  # fmt: skip
    bad = subprocess.run(base + ["--variants=vdm,nope"], cwd=th.REPO, env=th.env_for(),
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "Unknown --variants ['nope']" in bad.stderr
    for extra in (["--variants=vdm"], ["--variants=vdm,base_measure", "--reuse"]):
        done = subprocess.run(base + extra, cwd=th.REPO, env=th.env_for(), capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(stem.with_suffix(".json").read_text())
    assert record["reused"] == ["vdm/1"] and set(record["runs"]) == {"vdm", "base_measure"}
    assert record["command"].endswith("--reuse") and record["complete"]
    assert "kept from an earlier invocation" in stem.with_suffix(".md").read_text()
