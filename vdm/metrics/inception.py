"""Inception-v3 in Flax, the FID variant: the 2048-d pool3 features of Heusel et al.'s FID.

The layer names are those of pytorch-fid's `FIDInceptionA/C/E` network (torchvision's
Inception-v3 with the 2015 TF graph's differences: average pools that do not count padding, a
max pool in the last block), so converting its state dict is a mechanical renaming
(experiments/convert_inception.py): torch `Mixed_5b.branch1x1.conv.weight` [O, I, kh, kw] is
`params/Mixed_5b/branch1x1/conv/kernel` [kh, kw, I, O]; `bn.weight/bias/running_mean/
running_var` are `params/.../bn/scale`, `params/.../bn/bias`, `batch_stats/.../bn/mean`,
`batch_stats/.../bn/var`. A weights file is an .npz with exactly those flat keys.

Inputs are images in [0, 1], any size and 1 or 3 channels; they are resized to 299x299
(bilinear, half-pixel centres like torch's align_corners=False), grey ones repeated to RGB,
and mapped to [-1, 1] as pytorch-fid does. Batch norm runs on its stored statistics, so the
features of an image do not depend on the batch it is in. Pure math: no files
(vdm/run/sample_metrics.py reads the weights).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FEATURE_DIM = 2048
IMAGE_SIZE = 299


class BasicConv(nn.Module):
    """Conv (no bias) + batch norm (eps 1e-3, stored statistics) + ReLU."""

    out: int
    kernel: tuple = (1, 1)
    stride: int = 1
    pad: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        pads = ((self.pad[0], self.pad[0]), (self.pad[1], self.pad[1]))
        x = nn.Conv(self.out, self.kernel, self.stride, pads, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool(x):  # the FID graph's 3x3 average pools ignore the padding
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class BlockA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), pad=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), pad=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class BlockB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class BlockC(nn.Module):
    c7: int

    @nn.compact
    def __call__(self, x):
        c7, row, col = self.c7, dict(kernel=(1, 7), pad=(0, 3)), dict(kernel=(7, 1), pad=(3, 0))
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c7, name="branch7x7_1")(x)
        b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class BlockD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), pad=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), pad=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class BlockE(nn.Module):
    max_pool: bool  # the last block (Mixed_7c) pools with a max, the one before with a mean

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), pad=(0, 1)), dict(kernel=(3, 1), pad=(1, 0))
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [BasicConv(384, **row, name="branch3x3_2a")(b3),
             BasicConv(384, **col, name="branch3x3_2b")(b3)], -1)  # fmt: skip
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), pad=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
             BasicConv(384, **col, name="branch3x3dbl_3b")(bd)], -1)  # fmt: skip
        pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
    """Images [N, H, W, 3] in [-1, 1] (at 299x299 for the standard features) -> [N, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = BlockA(32, name="Mixed_5b")(x)
        x = BlockA(64, name="Mixed_5c")(x)
        x = BlockA(64, name="Mixed_5d")(x)
        x = BlockB(name="Mixed_6a")(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = BlockC(c7, name=name)(x)
        x = BlockD(name="Mixed_7a")(x)
        x = BlockE(False, name="Mixed_7b")(x)
        x = BlockE(True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # pool3: global average pool


def preprocess(images, size: int = IMAGE_SIZE) -> jnp.ndarray:
    """Images [N, H, W, 1|3] in [0, 1] -> [N, size, size, 3] in [-1, 1] (bilinear resize)."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


def random_variables(seed: int = 0) -> dict:
    """Random {'params', 'batch_stats'} for tests (real use loads converted weights).

    He-normal kernels, random batch-norm scales and statistics, drawn with numpy from the
    shapes alone: flax's init compiles the whole network, which takes ~25 s on a CPU.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in expected_shapes().items():
        if key.endswith("kernel"):
            arrays[key] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
        elif key.endswith(("scale", "var")):
            arrays[key] = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            arrays[key] = rng.normal(0, 0.1, shape)
    return unflatten({k: v.astype(np.float32) for k, v in arrays.items()})


@functools.partial(jax.jit, static_argnames="size")
def _features(variables, images, size):
    return InceptionV3().apply(variables, preprocess(images, size))


def features(variables, images, *, batch_size: int = 50, size: int = IMAGE_SIZE) -> np.ndarray:
    """pool3 features [N, 2048] (float64) of images [N, H, W, C] in [0, 1], in batches.

    The last batch is padded to batch_size so that one compiled program serves every batch.
    """
    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(_features(variables, chunk, size))[: batch_size - pad])
    return np.concatenate(out).astype(np.float64)


def flatten(variables) -> dict[str, np.ndarray]:
    """{'params': ..., 'batch_stats': ...} -> {'params/Mixed_5b/.../kernel': array} (npz keys)."""
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(arrays) -> dict:
    """The inverse of `flatten`."""
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in arrays.items()}, sep="/")


def expected_shapes() -> dict[str, tuple]:
    """npz key -> shape of every array a weights file must hold."""
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)  # the shapes do not depend on size
    shapes = jax.eval_shape(lambda k, x: InceptionV3().init(k, x), jax.random.key(0), x)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
