"""Tests of the score networks in vdm.nets, on tiny models (n_embd 32, 2 layers, 8x8 images).

Freshly initialised networks output exactly zero (zero-initialised last layer), so every test
that compares outputs runs on random parameters drawn with numpy into the shapes that
jax.eval_shape reports; only the init tests pay for compiling a real `init`, and they use
"unsafe_rbg" keys, whose random bits XLA:CPU compiles about 3x faster than threefry's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import nets
from vdm.config_defaults import base_config
from vdm.core import diffusion
from vdm.nets import layers
from vdm.nets.layers import apply_stack, fourier_features, timestep_embedding

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0
BATCH = 2
NUM_CLASSES = 3
KINDS = ("vdm_unet", "unet", "mlp")
CIFAR10_VDM_PARAMS = 30_578_179  # published: 30.58M


def tiny_config(kind: str, **overrides):
    cfg = base_config().model
    cfg.type = kind
    cfg.n_embd = 32
    cfg.n_layers = 2
    cfg.norm_groups = 8
    cfg.channel_mult = (1, 2)
    cfg.num_res_blocks = 1
    cfg.attn_resolutions = (4,)
    cfg.num_heads = 2
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def build(kind: str, **overrides):
    cfg = tiny_config(kind, **overrides)
    return nets.build_network(cfg, gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX)


def inputs(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (BATCH, 5) if kind == "mlp" else (BATCH, 8, 8, 3)
    z = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    gamma_t = jnp.asarray([-10.0, 2.0], jnp.float32)
    return z, gamma_t


def init_key(seed: int):
    return jax.random.key(seed, impl="unsafe_rbg")


def param_shapes(model, z, gamma_t):
    return jax.eval_shape(model.init, jax.random.key(0), z, gamma_t)["params"]


def random_params(shapes, seed: int = 0, scale: float = 0.1):
    """Normal(0, scale^2) values in the given shapes, so no output is trivially zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes
    )


def relative_error(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def real_init():
    """Jitted init per model kind (compiled once, reused by the init tests)."""
    return {kind: jax.jit(build(kind, num_classes=NUM_CLASSES).init) for kind in KINDS}


def test_cifar10_config_has_published_parameter_count():
    cfg = base_config().model  # the defaults are the CIFAR-10 network
    z, gamma_t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))
    for scan in (False, True):
        cfg.scan = scan
        model = nets.build_network(cfg, gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX)
        assert nets.count_params(param_shapes(model, z, gamma_t)) == CIFAR10_VDM_PARAMS
    assert abs(CIFAR10_VDM_PARAMS / 30.58e6 - 1) < 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_dtype_and_conditioning(kind):
    z, gamma_t = inputs(kind)
    labels = jnp.asarray([0, 2], jnp.int32)
    aug = jnp.asarray([1.0, 0.0], jnp.float32)
    conditional = build(kind, num_classes=NUM_CLASSES, cond_aug=True)
    unconditional = build(kind)
    variants = {
        "none": (conditional, None),
        "label": (conditional, {"label": labels}),
        "null": (conditional, {"label": jnp.full((BATCH,), NUM_CLASSES, jnp.int32)}),
        "aug": (conditional, {"aug": aug}),
        "both": (conditional, {"label": labels, "aug": aug}),
        "scalar_gamma": (conditional, None),
        "uncond": (unconditional, None),
        "uncond_ignores": (unconditional, {"label": labels, "aug": aug}),
    }
    params = {
        "cond": random_params(param_shapes(conditional, z, gamma_t)),
        "uncond": random_params(param_shapes(unconditional, z, gamma_t)),
    }

    def run_all(params, z, gamma_t):
        out = {}
        for name, (model, cond) in variants.items():
            p = params["uncond" if model is unconditional else "cond"]
            g = gamma_t[0] if name == "scalar_gamma" else gamma_t
            out[name] = model.apply({"params": p}, z if g.ndim else z[:1], g, cond)
        return out

    out = run_all(params, z, gamma_t)
    for name, pred in out.items():
        assert pred.dtype == jnp.float32, name
        assert pred.shape == (z.shape if name != "scalar_gamma" else z[:1].shape), name
        assert bool(jnp.all(jnp.isfinite(pred))), name
    assert "label" in params["cond"]["cond_embed"]
    assert "label" not in params["uncond"]["cond_embed"]
    # A missing label is the null label; a real label or the aug flag changes the output.
    np.testing.assert_array_equal(out["none"], out["null"])
    assert relative_error(out["label"], out["none"]) > 1e-3
    assert relative_error(out["aug"], out["none"]) > 1e-3
    assert relative_error(out["both"], out["label"]) > 1e-3
    np.testing.assert_allclose(out["scalar_gamma"], out["none"][:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["uncond"], out["uncond_ignores"])


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_model_outputs_exactly_zero(real_init, kind):
    z, gamma_t = inputs(kind)
    model = build(kind, num_classes=NUM_CLASSES)
    variables = real_init[kind](init_key(0), z, gamma_t)
    pred = model.apply(variables, z, gamma_t, {"label": jnp.asarray([0, 1])})
    assert pred.shape == z.shape
    np.testing.assert_array_equal(pred, np.zeros(z.shape, np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_model_with_base_measure_predicts_eps_equal_z(real_init, kind):
    # The published network returns conv_out(h) + z_t: eps_hat = z_t at initialisation. For x
    # and v the base is the prediction that implies the same eps.
    z, gamma_t = inputs(kind)
    variables = real_init[kind](init_key(0), z, gamma_t)  # base_measure adds no parameters
    cond = {"label": jnp.asarray([0, 1])}
    for param in ("eps", "x", "v"):
        model = build(kind, num_classes=NUM_CLASSES, base_measure=True, parameterization=param)
        pred = model.apply(variables, z, gamma_t, cond)
        if param == "eps":
            np.testing.assert_array_equal(pred, z)
        else:  # alpha z / (1 + sigma), in float64
            g = np.asarray(gamma_t, np.float64).reshape((-1,) + (1,) * (z.ndim - 1))
            alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
            np.testing.assert_allclose(pred, alpha / (1 + sigma) * np.asarray(z), rtol=1e-6)
        # to_eps of x divides by sigma_t = 0.0067 at gamma = -10, amplifying float32 rounding.
        eps = diffusion.to_eps(pred, z, gamma_t, param)
        np.testing.assert_allclose(eps, z, rtol=1e-4, atol=1e-4)
    # A scalar gamma_t broadcasts over the batch like a [B] one.
    model = build(kind, num_classes=NUM_CLASSES, base_measure=True, parameterization="x")
    one = model.apply(variables, z, gamma_t[0], cond)
    np.testing.assert_allclose(one[:1], model.apply(variables, z, gamma_t, cond)[:1], rtol=1e-6)


def test_init_is_deterministic_given_key(real_init):
    z, gamma_t = inputs("vdm_unet")
    init = real_init["vdm_unet"]
    first, again, other = (init(init_key(k), z, gamma_t) for k in (0, 0, 1))
    jax.tree.map(np.testing.assert_array_equal, first, again)
    kernel = ("params", "down_0", "resnet", "conv_1", "kernel")

    def pick(tree):
        for key in kernel:
            tree = tree[key]
        return tree

    assert not np.allclose(pick(first), pick(other))
    # Blocks of one stack are initialised independently, not copies of each other.
    assert not np.allclose(pick(first), first["params"]["down_1"]["resnet"]["conv_1"]["kernel"])


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_only_in_training(scan):
    model = build("vdm_unet", dropout=0.5, scan=scan)
    z, gamma_t = inputs("vdm_unet")
    params = {"params": random_params(param_shapes(model, z, gamma_t))}

    def run(params, key):
        evaluate = model.apply(params, z, gamma_t)
        train = model.apply(params, z, gamma_t, train=True, rngs={"dropout": key})
        return evaluate, train

    # Eager op-by-op runs reuse compiled ops across calls, but a scan is recompiled each time.
    run = jax.jit(run) if scan else run

    eval_a, train_a = run(params, jax.random.key(1))
    eval_b, train_b = run(params, jax.random.key(2))
    _, train_a_again = run(params, jax.random.key(1))
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(train_a, train_a_again)
    assert relative_error(train_a, eval_a) > 1e-2
    assert relative_error(train_a, train_b) > 1e-2


@pytest.mark.parametrize(("kind", "with_attention"), [("vdm_unet", True), ("mlp", False)])
def test_scan_and_unrolled_are_the_same_function(kind, with_attention):
    """Same weights, same outputs and gradients; the scanned side also remats and, for the U-Net,
    uses the hand-written conv backward pass, so all three switches are checked against XLA."""
    extra = {"with_attention": True} if with_attention else {}
    unrolled = build(kind, num_classes=NUM_CLASSES, **extra)
    scanned = build(
        kind, num_classes=NUM_CLASSES, scan=True, remat=True, conv_grad="patches", **extra
    )
    z, gamma_t = inputs(kind)
    cond = {"label": jnp.asarray([1, 2], jnp.int32)}
    params = random_params(param_shapes(unrolled, z, gamma_t))
    as_scanned = nets.to_scanned_params(params, kind)

    expected = jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(scanned, z, gamma_t))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), as_scanned) == expected
    jax.tree.map(np.testing.assert_array_equal, nets.to_unrolled_params(as_scanned, kind), params)

    weights = jnp.asarray(np.random.default_rng(3).standard_normal(z.shape), jnp.float32)

    def loss_and_output(model, p):
        out = model.apply({"params": p}, z, gamma_t, cond)
        return jnp.sum(weights * out), out

    grad_fn = jax.value_and_grad(loss_and_output, argnums=1, has_aux=True)
    (_, out_unrolled), grad_unrolled = jax.jit(grad_fn, static_argnums=0)(unrolled, params)
    (_, out_scanned), grad_scanned = jax.jit(grad_fn, static_argnums=0)(scanned, as_scanned)
    assert float(jnp.abs(out_unrolled).max()) > 0.1
    np.testing.assert_allclose(out_scanned, out_unrolled, rtol=1e-4, atol=1e-5)
    grad_scanned = nets.to_unrolled_params(grad_scanned, kind)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_unrolled))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale),
        grad_scanned,
        grad_unrolled,
    )


def test_patches_conv_gradient_matches_xla():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 5, 7, 4)), jnp.float32)

    def loss(conv):
        return lambda x, k: jnp.sum(weights * jnp.tanh(conv(x, k)))

    reference = jax.grad(loss(layers._conv3x3), (0, 1))(x, kernel)
    patches = jax.grad(loss(layers.conv3x3_patches_grad), (0, 1))(x, kernel)
    for got, want in zip(patches, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vdm_unet", "mlp"])
def test_bfloat16_compute_gives_float32_output_close_to_float32(kind):
    z, gamma_t = inputs(kind)
    model_f32 = build(kind, num_classes=NUM_CLASSES, cond_aug=True)
    model_bf16 = build(kind, num_classes=NUM_CLASSES, cond_aug=True, dtype="bfloat16")
    params = random_params(param_shapes(model_f32, z, gamma_t))
    assert jax.tree.map(lambda a: a.dtype, params) == jax.tree.map(
        lambda s: s.dtype, param_shapes(model_bf16, z, gamma_t)
    )
    cond = {"label": jnp.asarray([1, 2], jnp.int32), "aug": jnp.ones((BATCH,))}
    out_f32 = model_f32.apply({"params": params}, z, gamma_t, cond)
    out_bf16 = model_bf16.apply({"params": params}, z, gamma_t, cond)
    assert out_bf16.dtype == jnp.float32
    error = relative_error(out_bf16, out_f32)
    # bf16 rounds at 2^-9 relative: about 0.4% here, never exactly 0; the Fourier features of z
    # computed in bf16 instead would be off by radians and miss by tens of percent.
    assert 0 < error < 0.02, error


def test_embeddings_match_float64_formulas():
    t = np.array([0.0, 1.5, 999.0])
    half = np.exp(-np.log(10_000.0) * np.arange(64) / 63)
    expected = np.concatenate([np.sin(t[:, None] * half), np.cos(t[:, None] * half)], axis=1)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 128), expected, atol=2e-4)

    z = np.random.default_rng(0).uniform(-1, 1, size=(2, 4, 4, 3))
    angles = z[..., None] * 2 * np.pi * 2.0 ** np.array([6, 7])  # [..., C, n]
    angles = angles.reshape(2, 4, 4, 6)
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    got = fourier_features(jnp.asarray(z, jnp.float32), 6, 7)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert fourier_features(jnp.zeros((2, 5)), 1, 0).shape == (2, 0)


class _Probe(nn.Module):
    """A block exposing what it drew: one parameter vector and one dropout mask."""

    @nn.compact
    def __call__(self, carry, shared):
        weight = self.param("w", nn.initializers.normal(1.0), (8,))
        mask = nn.Dropout(0.5)(jnp.ones(64), deterministic=False)
        return carry + shared + weight, mask


class _ProbeStack(nn.Module):
    scan: bool

    @nn.compact
    def __call__(self, x):
        return apply_stack(_Probe, {}, 3, "probe", x, None, (x,), scan=self.scan, remat=False)


@pytest.mark.parametrize("scan", [False, True])
def test_block_stack_draws_independent_params_and_dropout_per_block(scan):
    stack = _ProbeStack(scan)
    x = jnp.zeros(8)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = stack.init(rngs, x)
    _, masks = stack.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    params = variables["params"]
    weights = params["probe"]["w"] if scan else [params[f"probe_{i}"]["w"] for i in range(3)]
    masks = np.asarray(jnp.stack(list(masks)))
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert not np.allclose(weights[i], weights[j])
        assert not np.array_equal(masks[i], masks[j])


def test_build_network_rejects_bad_configs():
    with pytest.raises(ValueError, match="Unknown model type"):
        nets.build_network(tiny_config("transformer"), gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX)
    with pytest.raises(ValueError, match="dtype"):
        build("mlp", dtype="float16")
    with pytest.raises(ValueError, match="scan"):
        build("unet", scan=True)
    with pytest.raises(ValueError, match="base_measure=True is not defined for.*'score'"):
        build("mlp", base_measure=True, parameterization="score")
    build("mlp", base_measure=False, parameterization="score")  # without the base it is fine
