"""Command line: train, evaluate or sample a VDM.

  python -m vdm.main --config=configs/digits.py --workdir=runs/digits
  python -m vdm.main --config=configs/cifar10.py --workdir=DIR --config.optim.learning_rate=1e-4
  python -m vdm.main --config=configs/digits.py --workdir=runs/digits --mode=eval

Configs are locked: overriding a key that does not exist fails while parsing flags. Several
processes (hosts) join through --coordinator_address/--num_processes/--process_id (or the
VDM_COORDINATOR_ADDRESS / VDM_NUM_PROCESSES / VDM_PROCESS_ID environment variables).
"""

import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:variant].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, outputs).")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
flags.DEFINE_bool("tensorboard", True, "Also write TensorBoard summaries (needs tensorboard).")
flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("VDM_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-process runs.",
)
flags.DEFINE_integer(
    "num_processes",
    int(os.environ.get("VDM_NUM_PROCESSES", "1")),
    "Number of processes in a multi-process run.",
)
flags.DEFINE_integer(
    "process_id",
    int(os.environ.get("VDM_PROCESS_ID", "0")),
    "This process's index in a multi-process run.",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # No JAX backend may start before the distributed initialisation.
    from vdm import distributed
    from vdm.run import logs

    logs.quiet_library_logs()
    distributed.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        **FLAGS.config.distributed,
    )
    # With several processes, a failure anywhere stops every process with one message.
    with distributed.fail_together():
        _run_mode()


def _run_mode():
    from vdm.run.setup import build_run

    run = build_run(FLAGS.config)  # the one place a config becomes a run
    # Each mode imports only its own workflow: training's metric writers pull in TensorFlow.
    if FLAGS.mode == "train":
        from vdm.run import loop

        loop.train(run, FLAGS.workdir, tensorboard=FLAGS.tensorboard)
    elif FLAGS.mode == "eval":
        from vdm.run import evaluate

        evaluate.evaluate_checkpoint(run, FLAGS.workdir)
    else:
        from vdm.run import sample

        sample.sample_checkpoint(run, FLAGS.workdir)


if __name__ == "__main__":
    from vdm import runtime

    runtime.setup()  # before JAX starts: tcmalloc (re-runs the command) and XLA:CPU flags
    app.run(main)
