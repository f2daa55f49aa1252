"""Tests of experiments/sweep.py: grid expansion, skipping finished runs, the collector."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import sweep  # noqa: E402


def test_product_and_zip_expansion():
    runs = sweep.expand(
        product={"a.x": [1, 2], "b.y": ["p", "q"]},
        zipped={"c.u": [10, 20], "c.v": [0.1, 0.2]},
        fixed={"d": 0},
    )
    assert len(runs) == 8
    assert runs[0] == {"d": 0, "a.x": 1, "b.y": "p", "c.u": 10, "c.v": 0.1}
    assert {(r["c.u"], r["c.v"]) for r in runs} == {(10, 0.1), (20, 0.2)}  # zipped pairs only
    assert len({tuple(sorted(r.items())) for r in runs}) == 8
    assert sweep.expand(product={"a": [1, 2, 3]}) == [{"a": 1}, {"a": 2}, {"a": 3}]
    with pytest.raises(ValueError, match="one length"):
        sweep.expand(zipped={"a": [1, 2], "b": [1]})


def test_sweep_file_commands_and_names(tmp_path):
    path = tmp_path / "s.py"
    path.write_text(
        'CONFIG = "configs/digits.py"\nFIXED = {"train.num_steps": 5}\n'
        'PRODUCT = {"optim.learning_rate": [0.001, 0.0003]}\n'
    )
    cmds = sweep.commands(*sweep.load_sweep(str(path)), str(tmp_path / "base"))
    assert [Path(w).name for w, _, _ in cmds] == ["learning_rate=0.001", "learning_rate=0.0003"]
    argv = cmds[1][2]
    assert "--config=configs/digits.py" in argv and "--config.optim.learning_rate=0.0003" in argv
    assert "--config.train.num_steps=5" in argv
    (tmp_path / "bad.py").write_text('CONFIG = "x"\nPRODCT = {}\n')
    with pytest.raises(ValueError, match="PRODCT"):
        sweep.load_sweep(str(tmp_path / "bad.py"))


def fake_run(workdir: Path, bpds: list[float], done: bool):
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        {"step": 10 * (i + 1), "wall_time": 5.0 * (i + 1), "eval/bpd": b}
        for i, b in enumerate(bpds)
    ]
    lines.insert(0, {"step": 1, "wall_time": 0.5, "train/loss": 9.0})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if done:
        (workdir / "DONE").write_text("{}\n")


def test_run_skips_finished_runs_and_collect_tabulates(tmp_path):
    base = tmp_path / "base"
    fake_run(base / "lr=1", [3.0, 2.5, 2.7], done=True)
    cmds = [(str(base / n), {"optim.learning_rate": n}, ["echo", n]) for n in ("lr=1", "lr=2")]
    seen = []
    ran = sweep.run_all(cmds, runner=lambda argv, check: seen.append(argv))
    assert seen == [["echo", "lr=2"]] and ran == [str(base / "lr=2")]
    fake_run(base / "lr=2", [4.0, 3.5], done=False)
    rows = {r["run"]: r for r in sweep.collect(str(base))}
    assert rows["lr=1"]["final_bpd"] == 2.7 and rows["lr=1"]["best_bpd"] == 2.5
    assert rows["lr=1"]["steps"] == 30 and rows["lr=1"]["wall_time_s"] == 15.0
    assert rows["lr=1"]["done"] and not rows["lr=2"]["done"]
    assert rows["lr=2"]["optim.learning_rate"] == "lr=2"  # from the sweep.json run_all wrote
    table = sweep.to_markdown(list(rows.values()))
    assert "| lr=1 |" in table and "2.5000" in table
    assert sweep.to_csv(list(rows.values())).splitlines()[0].startswith("run,")
    sweep.main(["collect", f"--base={base}"])
    assert (base / "results.md").exists() and (base / "results.csv").exists()
