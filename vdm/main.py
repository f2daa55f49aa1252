"""Command line: train, evaluate or sample a VDM.

  python -m vdm.main --config=configs/digits.py --workdir=runs/digits
  python -m vdm.main --config=configs/cifar10.py --workdir=DIR --config.optim.learning_rate=1e-4
  python -m vdm.main --config=configs/digits.py --workdir=runs/digits --mode=eval
  python -m vdm.main --config=configs/digits.py --workdir=runs/digits --mode=sample \
      --config.sample.metrics.enabled=true

Configs are locked: overriding a key that does not exist fails while parsing flags. A problem
with what was asked for (a misspelt key, a missing config or data file, an unprepared dataset,
--mode=eval on a workdir without a checkpoint) ends the command with one message that says what
to fix and exit status 1; --verbose shows the Python traceback instead. Several
processes (hosts) join through --coordinator_address/--num_processes/--process_id (or the
VDM_COORDINATOR_ADDRESS / VDM_NUM_PROCESSES / VDM_PROCESS_ID environment variables); each then
runs its job under a small supervising parent (vdm/run/supervisor.py).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vdm.run.supervisor import VERBOSE_ARGS

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:variant].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, outputs).")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "sample", "reference_stats"],
    "What to do (reference_stats: cache the feature network and the reference split's "
    "features for sample.metrics).",
)
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
flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback too.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _message(err: BaseException) -> str:
    """The readable text of an error (KeyError and ml_collections quote theirs as a repr)."""
    while err.args and isinstance(err.args[0], BaseException):  # AttributeError(KeyError(...))
        err = err.args[0]
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    return text.strip().replace("\n", " ")


def fail(err: BaseException, verbose: bool, what: str = "") -> None:
    """Ends the command with one message (exit 1), or re-raises it with --verbose."""
    if verbose:
        raise err
    if "Failed loading config file" in str(err):  # ml_collections: the file's error is last
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        err, what = OSError(f"the config file does not load: {lines[-1]}"), "--config: "
    text = f"{what}{_message(err)}"
    distributed = sys.modules.get("vdm.distributed")  # imported once main has started
    if distributed is not None:  # several processes: say what the others reported, and
        text += distributed.peer_failures()  # publish this for their messages to quote
        distributed.publish_failure(text)
    sys.stderr.write(f"vdm.main: error: {text}\n(--verbose shows the traceback)\n")
    sys.exit(1)


def _has_key(path: str) -> bool:
    """Whether the config schema has the dotted key `path` (every config file is built on
    base_config; the flag's own value is not set yet when an override fails)."""
    from vdm.config_defaults import base_config

    try:
        node = base_config()
        for part in path.split("."):
            node = node[part]
    except (AttributeError, KeyError, TypeError):
        return False
    return True


def parse_flags(argv):
    """absl's flag parsing, with a misspelt --config key or a config file that does not load
    reported as one message (they are raised while the flags are parsed, before main)."""
    verbose = any(a in VERBOSE_ARGS for a in argv)
    try:
        args = FLAGS(argv)
    except flags.Error as err:
        fail(err, verbose, "command line: ")
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as err:
        text = _message(err)
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        culprit = [a for a in overrides if f"'{a.rsplit('.', 1)[-1]}'" in text]
        # Several overrides can share the leaf name (sample.steps, train.steps): name the
        # one whose path the loaded config does not have.
        culprit = [a for a in culprit if not _has_key(a.removeprefix("--config."))] or culprit
        where = f"{culprit[0]}: no such config key " if culprit else "--config: "
        fail(err, verbose, where)
    return args


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
    from vdm.errors import UserError
    from vdm.run.setup import build_run

    try:
        run = build_run(FLAGS.config)  # the one place a config becomes a run
    except (UserError, ValueError, KeyError, OSError) as err:  # the config asks for the wrong thing
        fail(err, FLAGS.verbose)
    # Each mode imports only its own workflow: training's metric writers pull in TensorFlow.
    try:
        if FLAGS.mode == "train":
            from vdm.run import loop

            loop.train(run, FLAGS.workdir, tensorboard=FLAGS.tensorboard, exits_after=True)
        elif FLAGS.mode == "eval":
            from vdm.run import evaluate

            evaluate.evaluate_checkpoint(run, FLAGS.workdir)
        elif FLAGS.mode == "sample":
            from vdm.run import sample

            sample.sample_checkpoint(run, FLAGS.workdir)
        else:
            from vdm.run import sample_metrics

            sample_metrics.write_reference_stats(run, FLAGS.workdir)
    except (UserError, FloatingPointError) as err:  # NonFiniteError; others are bugs
        fail(err, FLAGS.verbose)


if __name__ == "__main__":
    from vdm import runtime
    from vdm.run import supervisor

    # Several processes: the job runs in a child, so that jaxlib's fatal exit when the
    # coordinator is lost becomes one message (vdm/run/supervisor.py). Returns in that child.
    supervisor.maybe_supervise()

    runtime.setup()  # before JAX starts: tcmalloc (re-runs the command) and XLA:CPU flags
    app.run(main, flags_parser=parse_flags)
