"""The official VDM code's checkpoint: reading it, its architecture, its parameters mapped
onto this project's vdm_unet + learned_linear tree (vdm/convert_official.py writes the run).

What the official checkpoint is: clu's `checkpoint.Checkpoint`, a directory holding a TensorFlow
checkpoint (`checkpoint`, `ckpt-N.index`, `ckpt-N.data-*`; the data iterator, not read here) and
`ckpt-N.flax`, the train state as flax msgpack (`flax.serialization.to_bytes`): a dict with
`step`, `params`, `ema_params` and `opt_state`. `params` and `ema_params` each hold
`score_model` (the ScoreUNet) and `gamma` (NoiseSchedule_Scalar: `w`, `b` of shape [1]).

How the official ScoreUNet maps onto vdm/nets/vdm_unet.py (same computation, renamed):
  dense0, dense1                   cond_embed/dense_0, dense_1 (time embedding of n_embd
                                   channels: model.time_embed_dim = n_embd)
  conv_in, conv_out                conv_in, conv_out; GroupNorm_0 (final) -> norm_out
  down.block_i, up.block_i         down_i/resnet, up_i/resnet: GroupNorm_0 -> norm_1, conv1 ->
                                   conv_1, cond_proj, GroupNorm_1 -> norm_2, conv2 -> conv_2,
                                   nin_shortcut -> shortcut
  down.attn_i, up.attn_i           down_i/attention, up_i/attention (with_attention only)
  mid.block_1, mid.attn_1, mid.block_2   mid_resnet_1, mid_attention, mid_resnet_2
  attention q, k, v, proj_out      query, key, value, proj_out (one head: Dense kernels [C, C]
                                   reshaped to DenseGeneral's [C, 1, C] / [1, C, C])
  gamma/w, gamma/b                 schedule/w, schedule/b (learned_linear: b + |w| t)
The official network returns conv_out(h) + z_t (its "base measure"), hence
model.base_measure=True. Everything else already agrees: Fourier features 2^6, 2^7 of z
concatenated after z, t = (gamma_t - gamma_min) / (gamma_max - gamma_min) embedded as 1000 t,
the scalar conditioning input (zero for CIFAR-10) after the time embedding, 32 GroupNorm groups
with epsilon 1e-6, skips concatenated after h, one attention head over all pixels.
"""

import dataclasses
import re

import numpy as np
from etils import epath
from flax import serialization, traverse_util

from vdm.errors import UserError

FLAX_FILE = re.compile(r"^(?P<prefix>.*)-(?P<number>\d+)\.flax$")


class OfficialCheckpointError(UserError, ValueError):
    """The file is missing or is not a checkpoint of the official VDM code's layout."""


@dataclasses.dataclass(frozen=True)
class OfficialArchitecture:
    """The ScoreUNet hyperparameters that the parameter shapes reveal.

    Attributes:
      n_embd: sm_n_embd (channels).
      n_layers: sm_n_layer (ResNet blocks per side).
      channels: image channels.
      with_attention: attention after every down/up block.
      fourier: with_fourier_features.
    """

    n_embd: int
    n_layers: int
    channels: int
    with_attention: bool
    fourier: bool


def find_flax_file(path) -> epath.Path:
    """The `ckpt-N.flax` file of a clu checkpoint directory (the newest N), or `path` itself.

    Raises:
      FileNotFoundError: nothing at `path`, or a directory without a `.flax` file.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Official checkpoint {str(path)!r} does not exist.")
    if not path.is_dir():
        return path
    found = [(int(m["number"]), p) for p in path.iterdir() if (m := FLAX_FILE.match(p.name))]
    if not found:
        raise FileNotFoundError(
            f"{str(path)!r} holds no ckpt-N.flax file: give the official checkpoint directory "
            "(e.g. checkpoint-final/checkpoints-0, as downloaded) or its .flax file."
        )
    return max(found)[1]


def read_official(path) -> tuple[dict, epath.Path]:
    """(state dict, the file read) of an official checkpoint file or directory."""
    file = find_flax_file(path)
    try:
        state = serialization.msgpack_restore(file.read_bytes())
    except Exception as e:  # noqa: BLE001 - any decoding failure means "not this format"
        raise OfficialCheckpointError(
            f"{str(file)!r} is not a flax msgpack checkpoint ({type(e).__name__}: {e})."
        ) from e
    if not isinstance(state, dict) or not ({"params", "ema_params"} & set(state)):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise OfficialCheckpointError(
            f"{str(file)!r} holds {keys}, not the official train state (params, ema_params, "
            "opt_state, step)."
        )
    return state, file


def _flat(tree) -> dict[tuple, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _name(path: tuple) -> str:
    return "/".join(path)


def infer_architecture(params: dict) -> OfficialArchitecture:
    """Reads the official ScoreUNet's hyperparameters off its parameter shapes."""
    flat = _flat(params)
    for needed in (("score_model", "conv_in", "kernel"), ("score_model", "conv_out", "kernel")):
        if needed not in flat:
            raise OfficialCheckpointError(f"Official checkpoint has no parameter {_name(needed)}.")
    conv_in = flat[("score_model", "conv_in", "kernel")].shape
    channels = flat[("score_model", "conv_out", "kernel")].shape[-1]
    if conv_in[2] not in (channels, 5 * channels):
        raise OfficialCheckpointError(
            f"score_model/conv_in/kernel has {conv_in[2]} input channels; the official net on "
            f"{channels}-channel images has {channels} (no Fourier features) or {5 * channels}."
        )
    blocks = {k[1] for k in flat if k[0] == "score_model"}
    n_layers = 0
    while f"down.block_{n_layers}" in blocks:
        n_layers += 1
    return OfficialArchitecture(
        n_embd=int(conv_in[3]),
        n_layers=n_layers,
        channels=int(channels),
        with_attention="down.attn_0" in blocks,
        fourier=conv_in[2] == 5 * channels,
    )


def _affine(src, dst, shape_kernel, n_out, *, bias=True):
    # One Dense/Conv layer: (official path, our path, official shape) of kernel and bias.
    out = [(src + ("kernel",), dst + ("kernel",), shape_kernel)]
    if bias:
        out.append((src + ("bias",), dst + ("bias",), (n_out,)))
    return out


def _norm(src, dst, channels):
    return [(src + (p,), dst + (p,), (channels,)) for p in ("scale", "bias")]


def _resnet(src, dst, c_in, c_out, c_cond):
    entries = _norm(src + ("GroupNorm_0",), dst + ("norm_1",), c_in)
    entries += _affine(src + ("conv1",), dst + ("conv_1",), (3, 3, c_in, c_out), c_out)
    entries += _affine(src + ("cond_proj",), dst + ("cond_proj",), (c_cond, c_out), 0, bias=False)
    entries += _norm(src + ("GroupNorm_1",), dst + ("norm_2",), c_out)
    entries += _affine(src + ("conv2",), dst + ("conv_2",), (3, 3, c_out, c_out), c_out)
    if c_in != c_out:
        entries += _affine(src + ("nin_shortcut",), dst + ("shortcut",), (c_in, c_out), c_out)
    return entries


def _attention(src, dst, c):
    entries = _norm(src + ("GroupNorm_0",), dst + ("norm",), c)
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("proj_out", "proj_out")):
        entries += _affine(src + (theirs,), dst + (ours,), (c, c), c)
    return entries


def parameter_map(arch: OfficialArchitecture) -> list[tuple[tuple, tuple, tuple]]:
    """Every official parameter as (official path, path in this project's params, shape).

    The official paths start at the train state's `params` ('score_model' / 'gamma'); ours at
    this project's {'model', 'schedule'} tree with the network unrolled (model.scan=False).
    """
    n, c = arch.n_embd, arch.channels
    n_cond, c_in = 4 * n, c * (5 if arch.fourier else 1)
    sm, md = ("score_model",), ("model",)
    entries = _affine(sm + ("dense0",), md + ("cond_embed", "dense_0"), (n + 1, n_cond), n_cond)
    entries += _affine(sm + ("dense1",), md + ("cond_embed", "dense_1"), (n_cond, n_cond), n_cond)
    entries += _affine(sm + ("conv_in",), md + ("conv_in",), (3, 3, c_in, n), n)
    for i in range(arch.n_layers):
        entries += _resnet(sm + (f"down.block_{i}",), md + (f"down_{i}", "resnet"), n, n, n_cond)
        if arch.with_attention:
            entries += _attention(sm + (f"down.attn_{i}",), md + (f"down_{i}", "attention"), n)
    entries += _resnet(sm + ("mid.block_1",), md + ("mid_resnet_1",), n, n, n_cond)
    entries += _attention(sm + ("mid.attn_1",), md + ("mid_attention",), n)
    entries += _resnet(sm + ("mid.block_2",), md + ("mid_resnet_2",), n, n, n_cond)
    for i in range(arch.n_layers + 1):
        entries += _resnet(sm + (f"up.block_{i}",), md + (f"up_{i}", "resnet"), 2 * n, n, n_cond)
        if arch.with_attention:
            entries += _attention(sm + (f"up.attn_{i}",), md + (f"up_{i}", "attention"), n)
    entries += _norm(sm + ("GroupNorm_0",), md + ("norm_out",), n)
    entries += _affine(sm + ("conv_out",), md + ("conv_out",), (3, 3, n, c), c)
    entries += [(("gamma", p), ("schedule", p), (1,)) for p in ("w", "b")]
    return entries


def convert_params(official: dict, arch: OfficialArchitecture, target) -> dict:
    """Official params -> this project's {'model', 'schedule'} params (unrolled network).

    Args:
      official: one official parameter tree (the state's `params` or `ema_params`).
      arch: its architecture (infer_architecture).
      target: this project's parameter tree (arrays or ShapeDtypeStructs, unrolled), whose
        shapes and dtypes the converted arrays take.

    Returns:
      The converted tree, numpy arrays shaped like `target`.

    Raises:
      OfficialCheckpointError: a parameter is missing, unexpected or of the wrong shape (named).
    """
    flat = _flat(official)
    want = traverse_util.flatten_dict(target)  # path -> array or ShapeDtypeStruct
    entries = parameter_map(arch)
    missing = [_name(src) for src, _, _ in entries if src not in flat]
    expected = {src for src, _, _ in entries}
    unexpected = [_name(k) for k in flat if k not in expected]
    if missing or unexpected:
        problems = [
            f"{what} {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected))
            if names
        ]
        if any(name.startswith("gamma") for name in missing + unexpected):
            problems.append("only the learnable_scalar schedule (gamma/w, gamma/b) is supported")
        raise OfficialCheckpointError(
            "The checkpoint is not the official ScoreUNet + NoiseSchedule_Scalar layout for "
            f"n_embd={arch.n_embd}, n_layer={arch.n_layers}: {'; '.join(problems)}."
        )
    out = {}
    for src, dst, shape in entries:
        value = flat[src]
        if value.shape != shape:
            raise OfficialCheckpointError(
                f"Official parameter {_name(src)} has shape {value.shape}, expected {shape}."
            )
        if dst not in want:
            raise OfficialCheckpointError(f"This project's network has no parameter {_name(dst)}.")
        spec = want[dst]
        out[dst] = np.asarray(value, spec.dtype).reshape(spec.shape)
    extra = [_name(k) for k in want if k not in out]
    if extra:
        raise OfficialCheckpointError(f"No official parameter maps to {', '.join(extra)}.")
    return traverse_util.unflatten_dict(out)
