"""The soak script (experiments/soak.py) at a tiny size: kills land, and the killed run ends
with the uninterrupted run's train state bit for bit."""

import pytest
import train_helpers as th

from experiments import soak


def test_kill_steps_one_per_window_never_the_last():
    kills = soak.kill_steps(2000, 300, seed=0)
    assert len(kills) == 7 and kills == sorted(kills) and kills[-1] < 2000
    assert all(w * 300 <= k < (w + 1) * 300 for w, k in enumerate(kills))
    assert soak.kill_steps(2000, 300, seed=0) == kills != soak.kill_steps(2000, 300, seed=1)


@pytest.mark.slow
def test_tiny_soak_is_bit_for_bit(tmp_path, monkeypatch):
    for key, value in th.env_for(1).items():  # the tests' shared compilation cache
        monkeypatch.setenv(key, value)
    tiny = dict(th.TINY, **{"train.write_samples": False, "train.eval_every": 1000})
    tiny.pop("train.log_every")
    sets = [f"{k}={v}" for k, v in tiny.items()]
    result = soak.soak(th.CONFIG, 40, 20, 0, 5, 1, sets, str(tmp_path), timeout=120)
    kills = [r for r in result["launches"] if r["killed_at"] is not None]
    assert len(kills) == 2, result["launches"]
    assert soak.passed(result), soak.report(result)
    assert result["state"]["leaves"] > 50 and result["final_steps"] == (40, 40)
