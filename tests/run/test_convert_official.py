"""vdm.convert_official: a checkpoint in the official VDM code's layout and file format becomes
a checkpoint of this project whose network computes what the official ScoreUNet computes.

The test writes the official checkpoint itself: a clu checkpoint directory (`checkpoint` and
`ckpt-N.flax`, the train state {step, params, ema_params, opt_state} as flax msgpack) with the
parameter names, nesting and shapes of model_vdm.py's ScoreUNet and NoiseSchedule_Scalar at a
reduced size (n_embd 32, n_layer 2) and random values (zero-initialised layers included, so each
one matters). The official network has no down-sampling, so 8x8x3 images exercise it fully.
`official_eps` (official_vdm_reference.py) is an independent re-implementation of the official
forward pass in plain jax.numpy from model_vdm.py's definitions, reading the official parameter
tree directly.
"""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th
from flax import serialization
from official_vdm_reference import (
    GAMMA_MAX,
    GAMMA_MIN,
    N_EMBD,
    N_LAYER,
    official_eps,
    official_state,
    write_official,
)

from vdm import convert_official, estimators
from vdm.convert_official import OfficialCheckpointError

SIZE = 8  # image side: the official network runs at any resolution
CIFAR10 = th.REPO / "configs" / "cifar10.py"


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    """A tiny 8x8x3 image dataset in the npz format (CIFAR-10 itself is not available here)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(
        path,
        train=rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8),
        test=rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8),
    )
    return str(path)


def tiny_config(npz_data, **model):
    """configs/cifar10.py on the npz images; the converter sets the network's size itself."""
    spec = importlib.util.spec_from_file_location("cifar10_config", CIFAR10)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.name, c.data.path = "npz", npz_data
    c.data.batch_size, c.data.eval_batch_size = 8, 8
    for key, value in model.items():
        c.model[key] = value
    return c


def restored(result, workdir):
    ckpts = result.run.checkpoints(workdir)
    try:
        state, meta, step = ckpts.restore(result.run.abstract_state)
    finally:
        ckpts.close()
    return state, meta, step


def inputs(seed=0, n=4):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(n, SIZE, SIZE, 3)), jnp.float32)
    g_t = jnp.linspace(GAMMA_MIN, GAMMA_MAX, n, dtype=jnp.float32)
    return z, g_t


def assert_same_network(result, state, official):
    z, g_t = inputs()
    model = result.run.model
    for ours, theirs in (
        (state.params, official["params"]),
        (state.ema_params, official["ema_params"]),
    ):
        got = model.denoiser(ours["model"])(z, g_t, model.cond({"x": z}))
        want = official_eps(theirs, z, g_t, jnp.zeros((z.shape[0],)))
        # Same function, different float32 rounding (GroupNorm's reduction order, where the
        # attention scale is applied): measured to differ by ~1e-6 on outputs of size ~1-4.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, npz_data):
    root = tmp_path_factory.mktemp("convert")
    official = official_state()
    source = write_official(root / "checkpoints-0", official)
    result = convert_official.convert(source, root / "run", tiny_config(npz_data))
    return result, root / "run", official


def test_converted_network_computes_the_official_one(converted):
    result, workdir, official = converted
    state, meta, step = restored(result, workdir)
    assert step == int(state.step) == 4321
    assert meta["converted_from"].endswith("ckpt-1.flax")
    # params and EMA params come from their official counterparts (different values here).
    assert_same_network(result, state, official)


def test_schedule_endpoints_and_config_carry_over(converted):
    result, workdir, official = converted
    state, _, _ = restored(result, workdir)
    for ours, theirs in (
        (state.params, official["params"]),
        (state.ema_params, official["ema_params"]),
    ):
        w, b = float(theirs["gamma"]["w"][0]), float(theirs["gamma"]["b"][0])
        g0, g1 = result.run.model.endpoints(ours)
        np.testing.assert_allclose([float(g0), float(g1)], [b, b + abs(w)], rtol=1e-6)
    assert result.endpoints == pytest.approx((b, b + abs(w)), rel=1e-6)
    record = json.loads((workdir / "config.json").read_text())
    assert record["model"]["base_measure"] is True
    assert record["model"]["n_embd"] == N_EMBD and record["model"]["n_layers"] == N_LAYER
    assert record["model"]["time_embed_dim"] == N_EMBD
    assert record["dataset"]["shape"] == [SIZE, SIZE, 3]
    assert result.changed == {
        "model.n_embd": N_EMBD,
        "model.n_layers": N_LAYER,
        "model.time_embed_dim": N_EMBD,
    }  # configs/cifar10.py already has the published base measure


def test_base_measure_adds_z(converted):
    result, workdir, _ = converted
    state, _, _ = restored(result, workdir)
    z, g_t = inputs(1)
    net = result.run.model.network
    with_base = net.apply({"params": state.params["model"]}, z, g_t)
    without = net.clone(base_measure=False).apply({"params": state.params["model"]}, z, g_t)
    np.testing.assert_allclose(np.asarray(with_base - without), np.asarray(z), atol=1e-5)


def test_scanned_network_and_attention_blocks(tmp_path, npz_data):
    official = official_state(seed=5, n_layer=1, attention=True)
    write_official(tmp_path / "ckpt", official, number=7)
    (tmp_path / "ckpt" / "ckpt-3.flax").write_bytes(b"an older, unreadable save")  # not chosen
    result = convert_official.convert(
        tmp_path / "ckpt", tmp_path / "run", tiny_config(npz_data, scan=True)
    )
    assert result.source.endswith("ckpt-7.flax")
    assert result.changed["model.with_attention"] is True
    state, _, _ = restored(result, tmp_path / "run")
    assert_same_network(result, state, official)


def _drop(tree, *path):
    node = tree
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


def _foreign_schedule(state):
    state["params"]["gamma"] = {"l1": {"kernel": np.ones((1, 1))}}  # learnable_nnet's


def _bad_shape(state):
    state["params"]["score_model"]["dense1"]["bias"] = np.ones(5)


def _extra(state):
    state["ema_params"]["score_model"]["extra"] = {"kernel": np.ones(3)}


# Each edit of a correct official state, and what the error must say.
WRONG_LAYOUTS = {
    "missing": (
        lambda s: _drop(s["params"], "score_model", "down.block_1", "conv2"),
        "missing score_model/down.block_1/conv2/kernel",
    ),
    "unexpected": (_extra, "unexpected score_model/extra/kernel"),
    "shape": (_bad_shape, r"dense1/bias has shape \(5,\)"),
    "nnet-schedule": (_foreign_schedule, "only the learnable_scalar schedule"),
    "no-conv-in": (
        lambda s: _drop(s["params"], "score_model", "conv_in"),
        "no parameter score_model/conv_in/kernel",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_LAYOUTS))
def test_wrong_layout_names_the_parameter(tmp_path, npz_data, case):
    edit, message = WRONG_LAYOUTS[case]
    state = official_state()
    edit(state)
    source = write_official(tmp_path / "ckpt", state)
    with pytest.raises(OfficialCheckpointError, match=message):
        convert_official.convert(source, tmp_path / "run", tiny_config(npz_data))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_missing_or_foreign_files(tmp_path, npz_data):
    config = tiny_config(npz_data)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_official.convert(tmp_path / "nowhere", tmp_path / "run", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ckpt-N.flax"):
        convert_official.convert(tmp_path / "empty", tmp_path / "run", config)
    (tmp_path / "junk.flax").write_bytes(b"\x00not msgpack")
    with pytest.raises(OfficialCheckpointError, match="not a flax msgpack checkpoint"):
        convert_official.convert(tmp_path / "junk.flax", tmp_path / "run", config)
    (tmp_path / "other.flax").write_bytes(serialization.to_bytes({"weights": np.ones(2)}))
    with pytest.raises(OfficialCheckpointError, match=r"\['weights'\], not the official"):
        convert_official.convert(tmp_path / "other.flax", tmp_path / "run", config)


def test_refuses_a_workdir_with_checkpoints(converted, npz_data):
    result, workdir, _ = converted
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert_official.convert(result.source, workdir, tiny_config(npz_data))


def test_ode_estimator_runs_on_the_converted_unet(converted, npz_data):
    """The PF-ODE divergence goes through GroupNorm's custom VJP (forward mode cannot)."""
    result, workdir, _ = converted
    state, _, _ = restored(result, workdir)
    x = np.load(npz_data)["test"][:2]
    out = estimators.ode(
        result.run.model, state.ema_params, {"x": x}, jax.random.key(0), solver="euler", steps=2
    )
    assert out["bpd"].shape == (2,) and np.all(np.isfinite(out["bpd"])), out


@pytest.mark.slow
def test_command_line_convert_then_eval(tmp_path, npz_data):
    official = official_state(seed=3)
    source = write_official(tmp_path / "checkpoints-0", official)
    workdir = tmp_path / "run"
    data = [
        "--config.data.name=npz",
        f"--config.data.path={npz_data}",
        "--config.data.eval_batch_size=8",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "vdm.convert_official", str(source), f"--workdir={workdir}",
         f"--config={CIFAR10}", *data],
        cwd=th.REPO, env=th.env_for(), capture_output=True, text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    command = out.stdout.split("Evaluate it with:\n")[1].strip().split()
    assert command[:3] == ["python", "-m", "vdm.main"]
    # configs/cifar10.py already has the published base measure, so no override is needed.
    assert "--config.model.n_embd=32" in command
    assert not [a for a in command if a.startswith("--config.model.base_measure")]
    assert "--config.eval.estimator=elbo,ode" in command
    # The printed command, with a cheap ODE solve on 2 examples, evaluates the converted workdir
    # (compiled with the suite's fast flags, as every launch: the command is the same).
    cheap = [
        "--config.eval.max_examples=2",
        "--config.eval.ode.solver=euler",
        "--config.eval.ode.steps=4",
    ]
    out = subprocess.run(
        [sys.executable, *command[1:], *cheap, "--notensorboard"],
        cwd=th.REPO, env=th.env_for(), capture_output=True, text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("elbo-decoder", "ode-decoder"):
        record = json.loads((workdir / "eval" / f"4321-{name}.json").read_text())
        assert record["num_examples"] == 2 and np.isfinite(record["bpd"]), record
