"""Tests of experiments/sweep.py: grid expansion, workdir names, up-front override checks,
skipping finished runs, the collector's table, and the command line. Nothing trains: runs are
faked."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers as th

from experiments import sweep

REPO = th.REPO


def test_product_and_zip_expansion():
    runs = sweep.expand(
        product={"a.x": [1, 2], "b.y": ["p", "q"]},
        zipped={"c.u": [10, 20], "c.v": [0.1, 0.2]},
        fixed={"d": 0, "a.x": 99},
    )
    assert len(runs) == 8  # 2 x 2 product, times 2 zipped rows
    assert runs[0] == {"d": 0, "a.x": 1, "b.y": "p", "c.u": 10, "c.v": 0.1}
    assert runs[1] == {"d": 0, "a.x": 1, "b.y": "p", "c.u": 20, "c.v": 0.2}
    assert runs[-1] == {"d": 0, "a.x": 2, "b.y": "q", "c.u": 20, "c.v": 0.2}
    assert {(r["c.u"], r["c.v"]) for r in runs} == {(10, 0.1), (20, 0.2)}  # pairs, not a product
    assert {(r["a.x"], r["b.y"]) for r in runs} == {(1, "p"), (1, "q"), (2, "p"), (2, "q")}
    assert len({tuple(sorted(r.items())) for r in runs}) == 8
    assert sweep.expand(product={"a": [1, 2, 3]}) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert sweep.expand(zipped={"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert sweep.expand(fixed={"a": 1}) == [{"a": 1}]
    with pytest.raises(ValueError, match="one length"):
        sweep.expand(zipped={"a": [1, 2], "b": [1]})
    with pytest.raises(ValueError, match="both PRODUCT and ZIP"):
        sweep.expand(product={"a": [1]}, zipped={"a": [2]})


def write_sweep(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_sweep_file_commands_and_names(tmp_path):
    path = write_sweep(
        tmp_path / "s.py",
        'CONFIG = "configs/digits.py"\nFIXED = {"train.num_steps": 5}\n'
        'PRODUCT = {"optim.learning_rate": [0.001, 1e-05], "model.n_layers": [2]}\n',
    )
    config, runs, varying = sweep.load_sweep(path)
    assert varying == ["optim.learning_rate"]  # a one-value list does not name the workdir
    cmds = sweep.commands(config, runs, varying, str(tmp_path / "base"))
    assert [Path(w).name for w, _, _ in cmds] == ["learning_rate=0.001", "learning_rate=1e-05"]
    argv = cmds[1][2]
    assert argv[1:3] == ["-m", "vdm.main"]
    assert "--config=configs/digits.py" in argv and "--config.optim.learning_rate=1e-05" in argv
    assert "--config.train.num_steps=5" in argv and "--config.model.n_layers=2" in argv
    assert f"--workdir={tmp_path / 'base' / 'learning_rate=1e-05'}" in argv
    bad = write_sweep(tmp_path / "bad.py", 'CONFIG = "x"\nPRODCT = {}\n')
    with pytest.raises(ValueError, match="PRODCT"):
        sweep.load_sweep(bad)


def test_names_use_full_keys_when_last_components_clash():
    varying = ["model.dropout", "data.dropout"]
    name = sweep.run_name({"model.dropout": 0.1, "data.dropout": 0.0}, varying)
    assert name == "model.dropout=0.1,data.dropout=0.0"
    assert sweep.run_name({"model.channel_mult": (1, 2)}, ["model.channel_mult"]) == (
        "channel_mult=_1,_2_"
    )  # one path component, no spaces
    runs = [{"a.b": "x/y"}, {"a.b": "x_y"}]  # both sanitise to b=x_y
    with pytest.raises(ValueError, match="share a workdir"):
        sweep.commands("c.py", runs, ["a.b"], "base")


def test_overrides_are_checked_before_anything_runs(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative, as on the command line
    sweep.check_overrides("configs/digits.py", [{"optim.learning_rate": 0.01}])
    sweep.check_overrides("configs/toy.py:swirl", [{"model.channel_mult": (1, 2)}])
    with pytest.raises(ValueError, match="learning_rat"):
        sweep.check_overrides(
            "configs/digits.py", [{"optim.learning_rate": 0.01}, {"optim.learning_rat": 0.01}]
        )
    with pytest.raises(ValueError, match="num_steps"):
        sweep.check_overrides("configs/digits.py", [{"train.num_steps": "many"}])


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "sweeps").glob("*.py")))
def test_example_sweeps_are_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    config, runs, varying = sweep.load_sweep(str(path))
    assert len(runs) > 1 and varying
    sweep.check_overrides(config, runs)
    names = [Path(w).name for w, _, _ in sweep.commands(config, runs, varying, "base")]
    assert len(set(names)) == len(runs)


def fake_run(workdir: Path, bpds: list[float], done: bool):
    """A workdir as vdm.main leaves it: a train line, then one eval line per bpd."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 1, "wall_time": 0.5, "train/loss": 9.0}]
    lines += [
        {"step": 10 * (i + 1), "wall_time": 5.0 * (i + 1), "eval/bpd": b, "eval/bpd_stderr": 0.1}
        for i, b in enumerate(bpds)
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if done:
        (workdir / "DONE").write_text(json.dumps({"step": 10 * len(bpds), "wall_time": 1.0}))


def test_run_skips_finished_runs_and_collect_tabulates(tmp_path):
    base = tmp_path / "base"
    fake_run(base / "lr=1", [3.0, 2.5, 2.7], done=True)
    cmds = [(str(base / n), {"optim.learning_rate": v}, ["echo", n]) for n, v in
            (("lr=1", 1e-3), ("lr=2", 1e-5))]  # fmt: skip
    seen = []
    ran, failed = sweep.run_all(cmds, runner=lambda argv, check: seen.append(argv))
    assert seen == [["echo", "lr=2"]] and ran == [str(base / "lr=2")] and failed == []
    fake_run(base / "lr=2", [4.0, 3.5], done=False)  # an interrupted run: no DONE yet
    (base / "notes").mkdir()  # directories without metrics are not runs

    rows = {r["run"]: r for r in sweep.collect(str(base))}
    assert sorted(rows) == ["lr=1", "lr=2"]
    assert rows["lr=1"]["final_bpd"] == 2.7 and rows["lr=1"]["best_bpd"] == 2.5
    assert rows["lr=1"]["final_bpd_stderr"] == 0.1
    assert rows["lr=1"]["steps"] == 30 and rows["lr=1"]["wall_time_s"] == 15.0
    assert rows["lr=2"]["final_bpd"] == 3.5 and rows["lr=2"]["best_bpd"] == 3.5
    assert rows["lr=1"]["done"] and not rows["lr=2"]["done"]
    assert rows["lr=2"]["optim.learning_rate"] == 1e-5  # from the sweep.json run_all wrote
    assert "optim.learning_rate" not in rows["lr=1"]  # never run by this sweep

    table = sweep.to_markdown(list(rows.values())).splitlines()
    assert table[0].startswith("| run | final_bpd | final_bpd_stderr | best_bpd |")
    assert "| lr=1 | 2.7000 | 0.1000 | 2.5000 | 30 | 15.0 | True |" in table[2]
    assert "1e-05" in table[3]  # swept values keep their precision
    csv_lines = sweep.to_csv(list(rows.values())).splitlines()
    assert csv_lines[0].startswith("run,final_bpd,") and csv_lines[1].startswith("lr=1,2.7,")

    assert sweep.command("collect", None, str(base)) == 0
    assert (base / "results.md").read_text().startswith("| run |")
    assert len((base / "results.csv").read_text().splitlines()) == 3


def test_failed_run_stops_the_sweep_unless_keep_going(tmp_path):
    cmds = [(str(tmp_path / n), {}, [n]) for n in ("a", "b")]

    def runner(argv, check):
        if argv == ["a"]:
            raise subprocess.CalledProcessError(1, argv)

    with pytest.raises(subprocess.CalledProcessError):
        sweep.run_all(cmds, runner=runner)
    ran, failed = sweep.run_all(cmds, runner=runner, keep_going=True)
    assert ran == [str(tmp_path / "b")] and failed == [str(tmp_path / "a")]


def sweep_cli(*args) -> subprocess.CompletedProcess:
    """`python -m experiments.sweep ARGS` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=REPO,
        env=th.env_for(1),
        capture_output=True,
        text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )


@pytest.mark.slow
def test_command_line_takes_the_action_first_and_flags_anywhere(tmp_path):
    base = tmp_path / "base"
    proc = sweep_cli("print", "experiments/sweeps/digits_lr.py", f"--base={base}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 6  # 3 learning rates x 2 depths
    argv = shlex.split(lines[0])
    assert argv[1:3] == ["-m", "vdm.main"] and "--config=configs/digits.py" in argv
    assert f"--workdir={base / 'learning_rate=0.002,n_layers=2'}" in argv
    assert not base.exists()  # print runs nothing

    bad = tmp_path / "bad.py"
    bad.write_text('CONFIG = "configs/digits.py"\nPRODUCT = {"optim.learning_rat": [1, 2]}\n')
    proc = sweep_cli(f"--base={base}", "print", str(bad))
    assert proc.returncode == 2 and "learning_rat" in proc.stderr, proc.stderr[-4000:]
    assert sweep_cli("print", str(bad)).returncode == 2  # no --base
    assert sweep_cli("launch", f"--base={base}").returncode == 2  # unknown action

    fake_run(base / "lr=1", [3.0, 2.5], done=True)
    proc = sweep_cli("collect", f"--base={base}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("| run |") and "| lr=1 | 2.5000 |" in proc.stdout
    assert (base / "results.csv").read_text().startswith("run,final_bpd,")
