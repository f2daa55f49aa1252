"""Tests of the training system: optimiser pieces, the guarded train step, the CLI end to end.

In-process tests run on the pytest process's single CPU device; `vdm.main` runs go through
subprocesses exactly as a user would launch them.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th

from vdm import optim, parallel
from vdm.run import pictures
from vdm.run.checkpoint import Checkpoints
from vdm.run.setup import KeyStream, build_run


def test_weight_decay_mask_spares_biases_norms_and_schedule():
    params = {
        "model": {
            "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
            "norm": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))},
            "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
            "embed": {"embedding": jnp.ones((11, 4))},
        },
        "schedule": {"w": jnp.ones(()), "l2_w": jnp.ones((8,))},
    }
    mask = optim.weight_decay_mask(params)
    assert mask["model"]["dense"] == {"kernel": True, "bias": False}
    assert mask["model"]["norm"] == {"scale": False, "bias": False}
    assert mask["model"]["conv"]["kernel"] and mask["model"]["embed"]["embedding"]
    assert not any(jax.tree.leaves(mask["schedule"]))


def test_warmup_and_ema_decay():
    config = th.load_config(optim__warmup_steps=4, optim__learning_rate=1.0)
    lr = optim.learning_rate_schedule(config.optim.learning_rate, config.optim.warmup_steps)
    np.testing.assert_allclose([lr(i) for i in range(6)], [0, 0.25, 0.5, 0.75, 1, 1])
    assert float(optim.ema_decay(0, 0.999, True)) == pytest.approx(0.1)
    assert float(optim.ema_decay(10**6, 0.999, True)) == pytest.approx(0.999)
    assert float(optim.ema_decay(0, 0.999, False)) == pytest.approx(0.999)


def _tiny_setup(**extra):
    run = build_run(th.load_config(**extra))
    return run, run.init_state(), run.train_batches(0)


def test_train_step_refuses_non_finite_update():
    run, state, batches = _tiny_setup()
    step = jax.jit(run.train_step(fail_at_step=2))
    key = run.key(KeyStream.TRAIN)
    batch = parallel.global_batch(next(batches), run.mesh)
    state1, metrics = step(state, batch, key)
    assert int(state1.nonfinite_step) == -1 and np.isfinite(float(metrics["train/loss"]))
    state2, metrics = step(state1, parallel.global_batch(next(batches), run.mesh), key)
    assert np.isnan(float(metrics["train/loss"]))
    assert int(state2.step) == 2 and int(state2.nonfinite_step) == 2
    # The refused update left every parameter, moment and average as it was.
    same = jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)),
        (state1.params, state1.opt_state, state1.ema_params),
        (state2.params, state2.opt_state, state2.ema_params),
    )
    assert all(jax.tree.leaves(same))


def test_steps_per_call_and_accumulation_run_the_same_objective():
    from vdm.run.step import make_multi_step

    run, state, batches = _tiny_setup()
    local = [next(batches) for _ in range(2)]
    key = run.key(KeyStream.TRAIN)
    one = jax.jit(run.train_step())
    s1, m1 = one(state, parallel.global_batch(local[0], run.mesh), key)
    s1, m2 = one(s1, parallel.global_batch(local[1], run.mesh), key)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *local)
    two = jax.jit(make_multi_step(run.train_step(), 2))
    s2, msum = two(state, parallel.global_batch(stacked, run.mesh, stacked=True), key)
    np.testing.assert_allclose(msum["train/loss"], m1["train/loss"] + m2["train/loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.params, s2.params
    )
    # Two micro-batches: one update, finite, step advanced once.
    run2, state2, batches2 = _tiny_setup(optim__accum_steps=2)
    acc = jax.jit(run2.train_step())
    s3, m3 = acc(state2, parallel.global_batch(next(batches2), run2.mesh), key)
    assert int(s3.step) == 1 and np.isfinite(float(m3["train/loss"]))


def test_nan_stops_training_and_last_checkpoint_stays_valid(tmp_path):
    from vdm.run import loop as train

    config = th.load_config(train__num_steps=8, train__ckpt_every=2, train__eval_every=100)
    with pytest.raises(train.NonFiniteError, match=r"step 5.*checkpoints/4 \(step 4\)"):
        train.train_and_evaluate(config, str(tmp_path), tensorboard=False, fail_at_step=5)
    assert th.checkpoint_steps(tmp_path) == [2, 4]
    assert not (tmp_path / "DONE").exists()
    ckpts = Checkpoints(tmp_path)
    state, meta, step = ckpts.restore(build_run(config).abstract_state)
    ckpts.close()
    assert step == 4 and int(state.step) == 4 and int(state.nonfinite_step) == -1
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


def test_sigterm_sets_preemption_flag_and_gives_the_handler_back():
    """In-process (a library caller) the caller's SIGTERM handler comes back even after a
    preemption: one left behind that ignores SIGTERM made a CI run's pytest worker unkillable.
    Only the CLI (exits_after) keeps ignoring a late SIGTERM until it exits."""
    from vdm.run import loop as train

    before = signal.getsignal(signal.SIGTERM)
    try:
        for exits_after in (False, True):
            flag = train.PreemptionFlag(exits_after=exits_after)
            assert not flag.requested(sync=True)
            # Never signal a worker that has no handler: SIGTERM would end the worker itself.
            assert signal.getsignal(signal.SIGTERM) == flag._handle
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.requested(sync=False)
            flag.restore()
            kept = signal.getsignal(signal.SIGTERM)
            assert (kept is before) != exits_after, exits_after
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
def test_end_to_end_train_eval_sample(tmp_path):
    """Two steps through vdm.main, then --mode=eval and --mode=sample on its checkpoint."""
    flags = th.overrides(train__num_steps=2, train__ckpt_every=1, train__eval_every=2)
    proc = th.run_main(tmp_path, *flags, "--tensorboard=true")
    assert "Test bits/dim" in proc.stdout and str(tmp_path / "DONE") in proc.stdout
    records = th.read_metrics(tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    final = [r for r in records if "eval/bpd" in r][-1]
    assert final["step"] == 2 and np.isfinite(final["eval/bpd"])
    for key in (
        "eval/bpd_stderr",
        "eval/diffusion_bpd",
        "eval/prior_bpd",
        "eval/recon_bpd",
        "eval/gamma_0",
        "eval/gamma_1",
    ):
        assert key in final
    assert all(isinstance(r["wall_time"], float) for r in records)
    # The input pipeline's host time per step, on every train line.
    assert all(0.0 <= r["train/input_ms"] < 1e4 for r in records if "train/loss" in r)
    assert json.loads((tmp_path / "DONE").read_text())["step"] == 2
    for name in ("samples.png", "schedule.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert th.checkpoint_steps(tmp_path) == [1, 2]
    # TensorBoard: clu's SummaryWriter, TensorFlow imported only now (deferred_tensorflow).
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (events,) = tmp_path.glob("events.out.tfevents.*")
    tags = {v.tag for e in EventFileLoader(str(events)).Load() for v in e.summary.value}
    assert {"train/loss", "eval/bpd"} <= tags, tags

    th.run_main(tmp_path, *flags, mode="eval")
    evaluated = json.loads((tmp_path / "eval_2.json").read_text())
    assert evaluated["eval/bpd"] == pytest.approx(final["eval/bpd"], rel=1e-6)

    th.run_main(tmp_path, *flags, "--config.sample.num=5", mode="sample")
    samples = np.load(tmp_path / "samples_2_ancestral_4.npy")
    assert samples.shape == (5, 2) and np.isfinite(samples).all()


def test_training_code_imports_no_tensorflow():
    """clu's writers and periodic actions load without TensorFlow (5 s of every run's start)."""
    code = "import sys, vdm.run.loop; print([m for m in sys.modules if m.startswith('tensorflow')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _one_message(proc) -> str:
    """The error text of a failed vdm.main: one 'vdm.main: error:' line, no traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vdm.main: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_bad_ode_option_value_is_one_message_before_anything_runs(tmp_path):
    # Checked where the config becomes a run (the ode estimator's registered validator), not
    # at trace time deep in an evaluation, where it was a jax traceback.
    ode = ["--config.eval.estimator=elbo,ode"]
    line = _one_message(th.run_main(tmp_path, *ode, "--config.eval.ode.density_tol=-1e-5",
                                    mode="eval", check=False))  # fmt: skip
    assert "eval.ode.density_tol=-1e-05" in line, line
    line = _one_message(th.run_main(tmp_path, *ode, "--config.eval.ode.solver=rk4",
                                    mode="eval", check=False))  # fmt: skip
    assert "eval.ode.solver='rk4'" in line and "tsit5" in line, line
    line = _one_message(th.run_main(tmp_path, *ode, "--config.eval.ode.icoeff=0",
                                    mode="eval", check=False))  # fmt: skip
    assert "eval.ode.pcoeff=0.0, icoeff=0" in line and "icoeff > 0" in line, line


@pytest.mark.slow
def test_misspelt_override_is_one_message_and_verbose_shows_traceback(tmp_path):
    line = _one_message(th.run_main(tmp_path, "--config.optim.learning_rat=0.1", check=False))
    assert "--config.optim.learning_rat: no such config key" in line and "learning_rate" in line
    # The misspelt key is named even when a valid override before it has the same leaf name.
    proc = th.run_main(tmp_path, "--config.sample.steps=4", "--config.train.steps=2", check=False)
    line = _one_message(proc)
    assert "--config.train.steps: no such config key" in line, line
    proc = th.run_main(tmp_path, "--config.optim.learning_rat=0.1", "--verbose", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_eval_without_checkpoint_and_missing_data_file_are_one_message(tmp_path):
    line = _one_message(th.run_main(tmp_path / "none", *th.overrides(), mode="eval", check=False))
    assert "No checkpoint in" in line and "--mode=train" in line
    assert not (tmp_path / "none").exists()  # nothing created in a misspelt workdir
    missing = tmp_path / "missing.npz"
    proc = th.run_main(
        tmp_path, "--config.data.name=npz", f"--config.data.path={missing}", check=False
    )
    line = _one_message(proc)
    assert str(missing) in line and "--config.data.path" in line


def test_image_grid_and_schedule_plot(tmp_path):
    samples = np.random.default_rng(0).integers(0, 17, size=(10, 8, 8, 1))
    grid = pictures.save_samples(tmp_path / "grid.png", samples, vocab_size=17)
    assert grid.dtype == np.uint8 and grid.max() <= 255 and (tmp_path / "grid.png").exists()
    t = np.linspace(0, 1, 5)
    pictures.save_schedule_plot(tmp_path / "s.png", t, -13.3 + 18.3 * t)
    assert (tmp_path / "s.png").stat().st_size > 0


def test_profile_steps_write_a_trace(tmp_path):
    """train.profile_steps > 0 runs clu's Profile action (first trace at step 10)."""
    from vdm.run import loop

    config = th.load_config(train__num_steps=13, train__eval_every=100, train__profile_steps=2)
    config.train.write_samples = False
    loop.train_and_evaluate(config, str(tmp_path), tensorboard=False)
    traces = list((tmp_path / "plugins" / "profile").rglob("*.xplane.pb"))
    assert traces, sorted(str(p) for p in tmp_path.rglob("*"))[:20]
