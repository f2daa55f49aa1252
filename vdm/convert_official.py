"""Converts the released checkpoint of the official VDM code into a checkpoint of this project.

  python -m vdm.convert_official CKPT --workdir=DIR [--config=configs/cifar10.py]
  python -m vdm.main --config=configs/cifar10.py --workdir=DIR --mode=eval \\
      --config.model.base_measure=True --config.eval.estimator=elbo,ode

The official code (github.com/google-research/vdm) links its CIFAR-10 model (no augmentation)
in its README: gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0, a directory that
`gsutil -m cp -r` downloads. Its own evaluation of that checkpoint on the CIFAR-10 test split
reports eval_bpd = 2.637 (the paper's 2.65 / 2.64). CKPT is that directory or the `.flax` file in
it (gs:// paths are read directly where TensorFlow's file system is installed). The converter
prints the exact eval command when it finishes: the --config overrides given to it plus the
settings it changed to reproduce the official network (for configs/cifar10.py only
model.base_measure=True, since --mode=eval builds its run from --config, not from
workdir/config.json). Expect about 2.637 bits/dim from the ELBO on the test split.

The layout read and how each parameter maps: vdm/run/official.py.

The run's params are the official `params` and its EMA params the official `ema_params` (what
the official evaluation uses; eval.use_ema selects them here too); the step is the official
step. The optimiser state is this project's fresh one: the official optax state is not carried
over, so resuming training from a converted checkpoint restarts Adam's moments.
"""

import dataclasses
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vdm import data, nets
from vdm.run import logs
from vdm.run.official import (
    OfficialArchitecture,
    OfficialCheckpointError,
    convert_params,
    infer_architecture,
    read_official,
)
from vdm.run.setup import Run, build_run
from vdm.run.state import TrainState

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10.py"


def official_settings(arch: OfficialArchitecture) -> dict:
    """The config values (dotted keys) under which this project computes the official model.

    schedule.gamma_min / gamma_max are not among them: the network normalises gamma_t with the
    official config's values (-13.3, 5.0, as configs/cifar10.py), which the weights do not
    record; the learned endpoints themselves come from gamma/w, gamma/b.
    """
    return {
        "model.type": "vdm_unet",
        "model.parameterization": "eps",
        "model.n_embd": arch.n_embd,
        "model.n_layers": arch.n_layers,
        "model.with_attention": arch.with_attention,
        "model.fourier_min": 6,
        "model.fourier_max": 7 if arch.fourier else 5,  # max < min: no Fourier features
        "model.norm_groups": 32,
        "model.num_heads": 1,
        "model.num_classes": 0,
        "model.cond_aug": False,
        "model.base_measure": True,
        "model.time_embed_dim": arch.n_embd,
        "schedule.type": "learned_linear",
    }


def apply_settings(config: ml_collections.ConfigDict, settings: dict):
    """(a locked copy of config with `settings` applied, {key: value} of those that changed).

    Raises:
      OfficialCheckpointError: the schema lacks one of the keys, so this project's network
        cannot represent the official one.
    """
    config = config.copy_and_resolve_references()
    config.lock()
    changed = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise OfficialCheckpointError(
                f"config has no key {key}, which the official network needs ({key}={value})."
            )
        if node[leaf] != value:
            node[leaf] = value
            changed[key] = value
    return config, changed


@dataclasses.dataclass(frozen=True)
class Converted:
    """What `convert` wrote.

    Attributes:
      step: the checkpoint's step (the official one).
      source: the official file read.
      architecture: the official network's hyperparameters.
      changed: config keys set to reproduce the official model ({key: value}); an eval of the
        workdir needs them as --config overrides.
      endpoints: (gamma_0, gamma_1) of the learned schedule (EMA params).
      run: the Run of the converted config.
    """

    step: int
    source: str
    architecture: OfficialArchitecture
    changed: dict
    endpoints: tuple[float, float]
    run: Run


def convert(ckpt, workdir, config: ml_collections.ConfigDict) -> Converted:
    """Writes the official checkpoint `ckpt` as this project's checkpoint in `workdir`.

    Args:
      ckpt: the official clu checkpoint directory or its ckpt-N.flax file.
      workdir: the run directory to create (checkpoints/<step>, config.json).
      config: the run's config (e.g. configs/cifar10.py); the official settings are applied.

    Returns:
      The Converted record.

    Raises:
      FileNotFoundError: no checkpoint at `ckpt`.
      FileExistsError: `workdir` already holds checkpoints.
      OfficialCheckpointError: the checkpoint is not in the official layout (named).
    """
    state, file = read_official(ckpt)
    params = state.get("params", state.get("ema_params"))
    ema_params = state.get("ema_params", params)
    arch = infer_architecture(params)
    config, changed = apply_settings(config, official_settings(arch))
    for key, value in changed.items():
        logging.warning("The official model needs %s=%r; set in the converted run.", key, value)
    run = build_run(config)
    if run.info.shape[-1] != arch.channels:
        raise OfficialCheckpointError(
            f"The checkpoint's network takes {arch.channels}-channel images but data.name="
            f"{run.info.name!r} has shape {tuple(run.info.shape)}."
        )
    ckpts = run.checkpoints(workdir)
    try:
        if ckpts.all_steps():
            raise FileExistsError(
                f"{ckpts.directory} already holds checkpoints {ckpts.all_steps()}; convert into "
                "an empty workdir."
            )
        scan = bool(config.model.scan)
        target = dict(run.abstract_state.params)
        if scan:
            target["model"] = jax.eval_shape(
                lambda p: nets.to_unrolled_params(p, "vdm_unet"), target["model"]
            )

        def ours(tree):
            converted = convert_params(tree, arch, target)
            if scan:
                converted["model"] = nets.to_scanned_params(converted["model"], "vdm_unet")
            return converted

        new_params, new_ema = ours(params), ours(ema_params)
        step = int(np.asarray(state.get("step", 0)))
        train_state = TrainState(
            step=np.asarray(step, np.int32),
            params=new_params,
            opt_state=run.optimizer.init(new_params),
            ema_params=new_ema,
            nonfinite_step=np.asarray(-1, np.int32),
            # No per-t loss history comes with the official state: it starts empty.
            time_hist=np.zeros((run.model.objective.time.bins,), np.float32),
        )
        train_state = jax.device_put(train_state, run.state_shardings)
        ckpts.save(step, train_state, {"wall_time": 0.0, "converted_from": str(file)})
    finally:
        ckpts.close()
    logs.write_config(workdir, config, dataset=data.info_record(run.info))
    g0, g1 = run.model.endpoints(new_ema)
    return Converted(step, str(file), arch, changed, (float(g0), float(g1)), run)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when it runs: importing this module (tests, other
    tools with a --config flag of their own) must not claim the flag names."""
    config_flags.DEFINE_config_file(
        "config", str(DEFAULT_CONFIG), "Config of the converted run[:variant].", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Run directory to write (checkpoints/, config.json).")
    flags.mark_flags_as_required(["workdir"])


def eval_command(config_arg: str, workdir: str, overrides: list[str]) -> str:
    """The `python -m vdm.main --mode=eval` line that evaluates the converted workdir."""
    parts = ["python -m vdm.main", f"--config={config_arg}", f"--workdir={workdir}", "--mode=eval"]
    return " ".join(parts + overrides + ["--config.eval.estimator=elbo,ode"])


def main(argv):
    if len(argv) != 2:
        raise app.UsageError(
            "Give exactly one official checkpoint: python -m vdm.convert_official CKPT "
            "--workdir=DIR (CKPT: the checkpoint directory or its ckpt-N.flax file)."
        )
    logs.quiet_library_logs()
    result = convert(argv[1], FLAGS.workdir, FLAGS.config)
    # The eval needs the --config.* overrides given here and the settings changed above.
    given = [a for a in sys.argv[1:] if a.startswith("--config.")]
    given += [f"--config.{k}={v}" for k, v in result.changed.items()]
    g0, g1 = result.endpoints
    print(
        f"Converted {result.source} (step {result.step}, n_embd {result.architecture.n_embd}, "
        f"n_layer {result.architecture.n_layers}; gamma_0 {float(g0):.4f}, gamma_1 "
        f"{float(g1):.4f}) into {FLAGS.workdir}.\nEvaluate it with:\n  "
        + eval_command(config_flags.get_config_filename(FLAGS["config"]), FLAGS.workdir, given)
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
