"""bench_train_speed from the command line: two settings (before: glibc, rolled Threefry, the
concatenated skip, the unfused swish(GroupNorm); remat: today's default (the allocator from
pip, the unrolled Threefry, split skips, the fused norm) with model.remat) on a one-block U-Net,
each in its own process, with the same first-step loss, smaller compiled temporaries, and both
tables written. So every speed and memory switch is driven from a command line here."""

import json
import platform
import subprocess
import sys

import pytest
import train_helpers as th

# A one-block U-Net on digit-shaped (8x8x1) random data: the benchmark's network and loss on a
# 48th of its 32x32x3 values (this test 21 s against 24 s with a cold compilation cache).
TINY = ["data.name=digits", "model.n_layers=1", "model.n_embd=32", "model.norm_groups=8",
        "data.batch_size=4", "data.eval_batch_size=4"]  # fmt: skip


@pytest.mark.slow
def test_command_line_compares_before_and_remat_with_the_same_loss(tmp_path):
    out = tmp_path / "speed"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_train_speed",
         "--settings=before_glibc,remat", "--rounds=1", "--steps=2",
         *[f"--set={s}" for s in TINY], f"--out={out}"],
        cwd=th.REPO, env=th.env_for(), capture_output=True, text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(out.with_suffix(".json").read_text())
    before, after = record["rows"]
    assert (before["setting"], after["setting"]) == ("before_glibc", "remat")
    assert before["allocator"] == "glibc" and not before["threefry_unrolled"]
    assert after["threefry_unrolled"]
    if sys.platform == "linux" and platform.machine() == "x86_64":  # the wheel's platforms
        assert after["allocator"] == "mimalloc"
    # Same random bits and the same function: the first step's loss agrees to float rounding.
    assert after["first_loss"] == pytest.approx(before["first_loss"], rel=1e-5)
    assert after["first_grad_norm"] == pytest.approx(before["first_grad_norm"], rel=1e-4)
    assert before["speedup"] == 1.0 and after["speedup"] > 0
    # XLA's temporaries of the compiled step: the fused norm and remat store less (2.30 against
    # 2.82 MB for this one-block net at batch 4; tests/run/test_performance.py checks each
    # switch on a larger one).
    assert after["temp_bytes"] < 0.9 * before["temp_bytes"], (before, after)
    assert all(row["step_s"] > 0 and row["eval_images_per_s"] > 0 for row in record["rows"])
    table = out.with_suffix(".md").read_text()
    assert "| before_glibc | glibc | rolled |" in table
    assert "| remat | " in table
