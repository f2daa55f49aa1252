"""The official VDM code's CIFAR-10 model, for tests: its checkpoint layout and its forward pass.

`official_state` makes a train state with the parameter names, nesting and shapes that
model_vdm.py's VDM(...).init gives (ScoreUNet + NoiseSchedule_Scalar), random values at any
size; `write_official` saves it the way clu.checkpoint.Checkpoint does (the `.flax` msgpack part
and the `checkpoint` index). `official_eps` re-implements the official ScoreUNet forward pass in
plain jax.numpy from model_vdm.py's definitions, reading that parameter tree directly. Written
independently of vdm/run/official.py, so that a mapping mistake there shows up as a mismatch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0
N_EMBD, N_LAYER = 32, 2


def _dense(rng, n_in, n_out, bias=True):
    p = {"kernel": rng.normal(0, 1 / math.sqrt(n_in), (n_in, n_out)).astype(np.float32)}
    if bias:
        p["bias"] = rng.normal(0, 0.1, (n_out,)).astype(np.float32)
    return p


def _conv(rng, n_in, n_out):
    return {
        "kernel": rng.normal(0, 1 / math.sqrt(9 * n_in), (3, 3, n_in, n_out)).astype(np.float32),
        "bias": rng.normal(0, 0.1, (n_out,)).astype(np.float32),
    }


def _group_norm(rng, c):
    return {
        "scale": (1 + 0.1 * rng.normal(size=(c,))).astype(np.float32),
        "bias": (0.1 * rng.normal(size=(c,))).astype(np.float32),
    }


def _resnet(rng, c_in, c_out, c_cond):
    p = {
        "GroupNorm_0": _group_norm(rng, c_in),
        "conv1": _conv(rng, c_in, c_out),
        "cond_proj": _dense(rng, c_cond, c_out, bias=False),
        "GroupNorm_1": _group_norm(rng, c_out),
        "conv2": _conv(rng, c_out, c_out),
    }
    if c_in != c_out:
        p["nin_shortcut"] = _dense(rng, c_in, c_out)
    return p


def _attn(rng, c):
    p = {"GroupNorm_0": _group_norm(rng, c)}
    p.update({name: _dense(rng, c, c) for name in ("q", "k", "v", "proj_out")})
    return p


def official_params(seed, *, n_embd=N_EMBD, n_layer=N_LAYER, channels=3, attention=False):
    """Random parameters named and shaped as the official VDM(...).init gives them."""
    rng = np.random.default_rng(seed)
    n, c_cond = n_embd, 4 * n_embd
    sm = {
        "dense0": _dense(rng, n + 1, c_cond),
        "dense1": _dense(rng, c_cond, c_cond),
        "conv_in": _conv(rng, 5 * channels, n),  # z and its 2 x 2 Fourier features
    }
    for i in range(n_layer):
        sm[f"down.block_{i}"] = _resnet(rng, n, n, c_cond)
        if attention:
            sm[f"down.attn_{i}"] = _attn(rng, n)
    sm["mid.block_1"] = _resnet(rng, n, n, c_cond)
    sm["mid.attn_1"] = _attn(rng, n)
    sm["mid.block_2"] = _resnet(rng, n, n, c_cond)
    for i in range(n_layer + 1):
        sm[f"up.block_{i}"] = _resnet(rng, 2 * n, n, c_cond)
        if attention:
            sm[f"up.attn_{i}"] = _attn(rng, n)
    sm["GroupNorm_0"] = _group_norm(rng, n)
    sm["conv_out"] = _conv(rng, n, channels)
    # A negative w: the schedule uses |w|.
    w, b = -(GAMMA_MAX - GAMMA_MIN) * (1 + 0.05 * rng.normal()), GAMMA_MIN + rng.normal()
    gamma = {"w": np.array([w], np.float32), "b": np.array([b], np.float32)}
    return {"score_model": sm, "gamma": gamma}


def write_official(directory, state, number=1):
    """A clu checkpoint directory as clu.checkpoint.Checkpoint.save leaves it (the .flax part)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"ckpt-{number}.flax").write_bytes(serialization.to_bytes(state))
    (directory / "checkpoint").write_text(
        f'model_checkpoint_path: "ckpt-{number}"\nall_model_checkpoint_paths: "ckpt-{number}"\n'
    )
    return directory


def official_state(seed=0, **kwargs):
    params = official_params(seed, **kwargs)
    opt_state = optax.adamw(1.0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01).init(params)
    return {
        "step": np.int32(4321),
        "params": params,
        "ema_params": official_params(seed + 1, **kwargs),
        "opt_state": serialization.to_state_dict(opt_state),
    }


def _swish(x):
    return x * jax.nn.sigmoid(x)


def _group_norm_apply(p, x, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.maximum(jnp.square(xg).mean(axis=(1, 2, 4), keepdims=True) - mean**2, 0.0)
    xg = (xg - mean) * jax.lax.rsqrt(var + eps)
    return xg.reshape(x.shape) * p["scale"] + p["bias"]


def _conv_apply(p, x):
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"]


def _dense_apply(p, x):
    return x @ p["kernel"] + p.get("bias", 0.0)


def _resnet_apply(p, x, cond):
    h = _conv_apply(p["conv1"], _swish(_group_norm_apply(p["GroupNorm_0"], x)))
    h = h + _dense_apply(p["cond_proj"], cond)[:, None, None, :]
    h = _conv_apply(p["conv2"], _swish(_group_norm_apply(p["GroupNorm_1"], h)))
    if "nin_shortcut" in p:
        x = _dense_apply(p["nin_shortcut"], x)
    return x + h


def _attn_apply(p, x):
    b, hh, ww, c = x.shape
    h = _group_norm_apply(p["GroupNorm_0"], x)
    q, k, v = (_dense_apply(p[n], h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q / np.sqrt(c), k), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(x.shape)
    return x + _dense_apply(p["proj_out"], out)


def official_eps(params, z, g_t, conditioning):
    """model_vdm.ScoreUNet(z, g_t, conditioning, deterministic=True), from its definitions."""
    p = params["score_model"]
    n_embd = p["conv_in"]["kernel"].shape[-1]
    n_layer = sum(name.startswith("down.block_") for name in p)
    attention = "down.attn_0" in p
    t = (g_t - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN) * 1000.0
    half = n_embd // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(np.log(10000) / (half - 1)))
    angles = t[:, None] * freqs[None, :]
    cond = jnp.concatenate([jnp.sin(angles), jnp.cos(angles), conditioning[:, None]], axis=1)
    cond = _swish(_dense_apply(p["dense0"], cond))
    cond = _swish(_dense_apply(p["dense1"], cond))
    # Base2FourierFeatures(start=6, stop=8): each channel repeated per frequency.
    w = jnp.tile((2.0 ** jnp.arange(6, 8, dtype=jnp.float32) * 2 * jnp.pi)[None], (1, z.shape[-1]))
    zf = jnp.repeat(z, 2, axis=-1) * w
    h = _conv_apply(p["conv_in"], jnp.concatenate([z, jnp.sin(zf), jnp.cos(zf)], axis=-1))
    hs = [h]
    for i in range(n_layer):
        h = _resnet_apply(p[f"down.block_{i}"], hs[-1], cond)
        if attention:
            h = _attn_apply(p[f"down.attn_{i}"], h)
        hs.append(h)
    h = _resnet_apply(p["mid.block_1"], hs[-1], cond)
    h = _attn_apply(p["mid.attn_1"], h)
    h = _resnet_apply(p["mid.block_2"], h, cond)
    for i in range(n_layer + 1):
        h = _resnet_apply(p[f"up.block_{i}"], jnp.concatenate([h, hs.pop()], axis=-1), cond)
        if attention:
            h = _attn_apply(p[f"up.attn_{i}"], h)
    assert not hs
    h = _swish(_group_norm_apply(p["GroupNorm_0"], h))
    return _conv_apply(p["conv_out"], h) + z  # the base measure
