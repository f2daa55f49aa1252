"""Correctness of the performance switches (speed itself is measured by
`python -m experiments.benchmark`; its measurements are tested in tests/experiments).

- bfloat16 compute (float32 parameters and loss) gives the float32 loss within 1% and nearly
  parallel gradients on CPU.
- FSDP-style parameter sharding over a second mesh axis computes the same loss and the same
  updated parameters as pure data parallelism, on 4 simulated CPU devices (a subprocess, since
  XLA_FLAGS must be set before jax is imported). The network is the tiny MLP, whose 64 x 64
  kernels are sharded: the layout rule is the same for every leaf, and the MLP compiles in a
  fraction of the U-Net's time (this test took 55 s with the U-Net on the 2-vCPU EPYC).

- model.skip_join=split and model.fused_norm_swish compute the same loss and gradients as the
  networks without them; model.fused_norm_swish and model.remat each shrink XLA's temporaries
  of the compiled step (with vdm/runtime.py's barrier flag, which makes remat effective on
  CPU). Both switches are compared against one computation of the default network's step.

The patches conv gradient (tests/nets/test_nets.py) and steps_per_call > 1
(tests/run/test_train.py) are tested where they live.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th

from vdm.run.setup import KeyStream, build_run

UNET = th.UNET  # the two-block U-Net on digits (tests/train_helpers.py)

# Relative tolerance of the bfloat16 loss: bf16 keeps 8 mantissa bits (relative spacing 2^-8,
# 0.4%) and the per-example terms average over the batch, so 1% leaves room for accumulated
# rounding while still catching a wrong cast (which moves the bits/dim by whole units).
BF16_LOSS_RTOL = 1e-2


def _loss_and_grad(config, params, batch, key):
    model = build_run(config).model

    def loss(p):
        terms = model.loss_terms(p, batch, key, train=True)
        return jnp.mean(terms["train"]) / (model.num_dims * np.log(2.0))

    return jax.jit(jax.value_and_grad(loss))(params)


def _trained_looking_params(run, scale: float):
    """Fresh parameters + N(0, scale^2) noise: nonzero output layers (a fresh network predicts
    exactly zero), so the compared losses and gradients depend on the whole network."""
    params = run.model.init_params(run.key(KeyStream.INIT))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(
        tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )


def _digits_batch(run):
    rng = np.random.default_rng(0)
    return {"x": jnp.asarray(rng.integers(0, run.info.vocab_size, (8, 8, 8, 1)), jnp.uint8)}


def test_bfloat16_loss_matches_float32():
    f32 = th.load_config(**UNET)
    bf16 = th.load_config(**UNET, model__dtype="bfloat16")
    run = build_run(f32)
    params, batch = _trained_looking_params(run, 0.02), _digits_batch(run)
    key = jax.random.key(3)
    loss32, grad32 = _loss_and_grad(f32, params, batch, key)
    loss16, grad16 = _loss_and_grad(bf16, params, batch, key)
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=BF16_LOSS_RTOL)
    g32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad32["model"])])
    g16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad16["model"])])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad16))
    cosine = float(g32 @ g16 / (jnp.linalg.norm(g32) * jnp.linalg.norm(g16)))
    assert cosine > 0.98, cosine


CHILD = r"""
import json
import jax, numpy as np
import train_helpers as th  # tests/ is on PYTHONPATH
from vdm import parallel
from vdm.run.setup import KeyStream, build_run

assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
local = [{"x": rng.normal(size=(8, 2)).astype(np.float32)} for _ in range(2)]  # th.TINY's data
runs = {}
for fsdp in (1, 2):  # data 4 x fsdp 1, and data 2 x fsdp 2 (both axes in use)
    config = th.load_config(train__fsdp=fsdp)
    run = build_run(config)
    state = run.init_state()
    step = run.compiled_steps()(1)
    losses = []
    for b in local:
        state, metrics = step(state, parallel.global_batch(b, run.mesh), run.key(KeyStream.TRAIN))
        losses.append(float(metrics["train/loss"]))
    sharded = sum("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params))
    params = [np.asarray(p) for p in jax.tree.leaves(state.params)]
    runs[fsdp] = (losses, params, sharded, dict(run.mesh.shape))
out = {}
for fsdp in (2,):
    losses, params, sharded, mesh = runs[fsdp]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(params, runs[1][1]))
    scale = max(float(np.max(np.abs(a))) for a in runs[1][1])
    out[fsdp] = {"losses": losses, "dp_losses": runs[1][0], "param_diff": diff,
                 "param_scale": scale, "sharded_leaves": sharded, "mesh": mesh}
print("RESULTS " + json.dumps(out))
"""


@pytest.mark.slow
def test_fsdp_and_data_parallel_compute_the_same_step():
    env = dict(th.env_for(4))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    # The child imports train_helpers from tests/ and vdm from the repository root.
    tests_dir = os.path.dirname(os.path.abspath(th.__file__))
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, str(th.REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=th.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=th.SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-8000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    results = json.loads(line[len("RESULTS ") :])
    for fsdp, r in results.items():
        assert r["mesh"] == {"data": 4 // int(fsdp), "fsdp": int(fsdp)}
        assert r["sharded_leaves"] > 0, "nothing was sharded over the fsdp axis"
        # Only the reduction order differs between the layouts.
        np.testing.assert_allclose(r["losses"], r["dp_losses"], rtol=1e-5)
        assert r["param_diff"] <= 1e-5 * r["param_scale"], r


# Both same-step tests compare a switch against the default network (skip_join=split,
# fused_norm_swish=true): one xdist group computes that step once for both.
DROPOUT = dict(UNET, model__dropout=0.1)


@functools.cache
def _default_step():
    """(params, batch, key, (loss, gradients)) of the default U-Net's step."""
    reference = th.load_config(**DROPOUT)
    run = build_run(reference)
    params, batch, key = _trained_looking_params(run, 0.05), _digits_batch(run), jax.random.key(3)
    return params, batch, key, _loss_and_grad(reference, params, batch, key)


def _assert_same_step_as_default(other):
    """A config that differs from the default U-Net in one switch builds the same parameters and
    takes the same step: loss, dropout draws and gradients equal to float rounding. Returns
    (params, batch, key)."""
    params, batch, key, (loss_r, grad_r) = _default_step()
    other_shapes = jax.eval_shape(build_run(other).model.init_params, jax.random.key(0))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, other_shapes)
    loss_o, grad_o = _loss_and_grad(other, params, batch, key)
    np.testing.assert_allclose(float(loss_o), float(loss_r), rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_r))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), grad_o, grad_r
    )
    return params, batch, key


@pytest.mark.xdist_group("default_unet_step")
def test_skip_join_split_computes_the_concat_step_from_the_config():
    """model.skip_join=split (up blocks take carry and skip as two parts; the default) is the
    concatenating network to float rounding: same parameters, loss, dropout draws and
    gradients."""
    params, batch, key = _assert_same_step_as_default(
        th.load_config(**DROPOUT, model__skip_join="concat")
    )
    with pytest.raises(ValueError, match="Unknown skip join 'glue'"):
        _loss_and_grad(th.load_config(**UNET, model__skip_join="glue"), params, batch, key)


@pytest.mark.xdist_group("default_unet_step")
def test_fused_norm_swish_computes_the_same_step_from_the_config():
    """model.fused_norm_swish (swish(GroupNorm) as one function in every ResNet block and at
    the output; the default) is the two-step network to float rounding: same parameters, loss,
    dropout draws and gradients. (Both U-Nets build their blocks and output from the same
    layers.norm_then_swish; a second, multi-resolution network here took 24 s of the suite.)"""
    _assert_same_step_as_default(th.load_config(**DROPOUT, model__fused_norm_swish=False))


def test_fused_norm_and_remat_shrink_the_compiled_step():
    """What model.fused_norm_swish and model.remat are for, in XLA's own buffer assignment of a
    2-block U-Net's gradient: each removes stored activations. This process imported vdm
    before JAX started, so it compiles with vdm/runtime.py's barrier flag (item 5): without it
    XLA:CPU merged remat's recomputation back into the forward pass and both programs needed
    the same memory. (In-process, at the tests' -O0: 9.4, 6.8 and 4.6 MB, 2-vCPU EPYC, jaxlib
    0.10.2; a subprocess with the product's flags gave 10.5, 6.8 and 4.6 MB in 5 s more.)"""
    from vdm import runtime

    assert runtime.BARRIER_FLAG in os.environ["XLA_FLAGS"]
    temp = {}
    for name, extra in {"unfused": dict(model__fused_norm_swish=False), "fused": {},
                        "fused_remat": dict(model__remat=True)}.items():  # fmt: skip
        net = dict(UNET, model__n_layers=2, data__batch_size=16)
        run = build_run(th.load_config(**net, **extra))
        params = run.model.init_params(run.key(KeyStream.INIT))
        batch, key = {"x": jnp.zeros((16, 8, 8, 1), jnp.uint8)}, jax.random.key(0)
        loss = lambda p, run=run: jnp.mean(run.model.loss_terms(p, batch, key, train=True)["train"])
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["fused"] < 0.8 * temp["unfused"], temp
    assert temp["fused_remat"] < 0.8 * temp["fused"], temp


def _random_draws():
    # Dropout's masks (bernoulli), the ELBO's t and eps draws (uniform, normal), split keys.
    key = jax.random.key(11)
    return jax.jit(
        lambda k: (
            jax.random.bernoulli(k, 0.9, (4, 8, 8, 16)),
            jax.random.uniform(jax.random.fold_in(k, 1), (37,)),
            jax.random.normal(jax.random.split(k, 3)[2], (2, 8, 8, 3)),
        )
    )(key)


def test_unrolled_threefry_draws_the_same_bits(monkeypatch):
    """vdm/runtime.py's unrolled Threefry lowering on CPU: the same random numbers as jax's
    rolled one (no loop left in the program once it is in force), and on by default."""
    from vdm import runtime

    lowered = lambda: jax.jit(lambda k: jax.random.bits(k, (64,))).lower(jax.random.key(0))
    try:
        assert runtime.unroll_threefry(False) is False
        jax.clear_caches()
        rolled, rolled_text = _random_draws(), lowered().as_text()
        assert runtime.unroll_threefry(True) is True
        jax.clear_caches()
        unrolled, unrolled_text = _random_draws(), lowered().as_text()
        # The product's default (the suite itself runs rolled: train_helpers) and its opt-out.
        monkeypatch.delenv("VDM_THREEFRY_UNROLLED", raising=False)
        assert runtime.unroll_threefry() is (jax.__version__ in runtime.THREEFRY_JAX_VERSIONS)
        monkeypatch.setenv("VDM_THREEFRY_UNROLLED", "0")
        assert runtime.unroll_threefry() is False
    finally:
        monkeypatch.undo()
        runtime.unroll_threefry()  # back to this process's setting
        jax.clear_caches()
    assert "while" in rolled_text and "while" not in unrolled_text
    for a, b in zip(rolled, unrolled, strict=True):
        np.testing.assert_array_equal(a, b)
