"""Shared helpers for the training-system tests: a tiny config and vdm.main subprocesses.

The tiny setup is a 2-d Gaussian with a one-block MLP, so a subprocess compiles and trains in
a few seconds; every key is a schema key set through --config overrides, as a user would.
"""

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import numpy as np

from vdm.core import oracles
from vdm.data import densities

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "digits.py")

JAX_CACHE = os.path.join(tempfile.gettempdir(), "vdm-tests-jax-cache")

# How long a test waits on a subprocess: under pyproject's per-test timeout (300 s), so that a
# hung child fails its test with the child's output, rather than the timeout ending the whole
# pytest worker (the slowest launch takes about 30 s on the 2-vCPU EPYC).
SUBPROCESS_TIMEOUT = 200

# The suite's time is XLA:CPU compilation (in-process tests: 189 of 247 s in backend compiles
# of 1,156 programs; a tiny vdm.main launch: 15 of 18 CPU-s; 2-vCPU EPYC). XLA's classic loop
# emitters with less LLVM optimisation compile the tests' programs much faster: five samplers
# 1.3 s at -O0 against 4.3 s, a tiny launch 8.5 against 16 CPU-s. -O0 code runs slower, which
# only pays where a test runs long loops, so the pytest process (1000-step sampler checks:
# tests/sampling/test_samplers.py 73 s at -O1, 111 s at -O0, 94 s with XLA's defaults) uses
# -O1, lowered to -O0 per test except where a test is marked run_bound (tests/conftest.py),
# and the vdm.main subprocesses (short runs: three CLI files 132 s at -O0, 160 s at -O1)
# -O0. Both only choose how the same HLO becomes machine code, so every test checks the same
# numbers to its tolerance; the product's flags (vdm/runtime.py) are untouched. Tests whose
# claim depends on the product's exact code generation (bit-identical results across device
# layouts, a tolerance calibrated on one training trajectory) run with env_for(product=True).
# Eigen's intra-op thread pool is off too; with two pytest workers on two cores it costs
# little (three CLI files 139 against 132 s). It was turned off for one in-process run that
# wedged with every thread parked, which turned out to be LAPACK's LU deadlocking the pool
# (tests/sampling/test_no_lapack.py keeps it out of compiled programs); the flag did not
# prevent that. Conftest sets the in-process flags before JAX's backend starts.
# VDM_TEST_XLA_FLAGS=0 runs the whole suite under XLA's default pipeline.
_CLASSIC = (
    "--xla_cpu_multi_thread_eigen=false --xla_cpu_use_fusion_emitters=false"
    " --xla_backend_optimization_level="
)
FAST_COMPILE = os.environ.get("VDM_TEST_XLA_FLAGS", "1") != "0"
TEST_XLA_FLAGS = _CLASSIC + "1" if FAST_COMPILE else ""
SUBPROCESS_XLA_FLAGS = _CLASSIC + "0" if FAST_COMPILE else ""
# jax's switch that lowers the pytest process's programs to -O0 test by test (tests/conftest.py).
UNOPTIMISED = "jax_disable_most_optimizations"

# jax's rolled Threefry lowering in the tests, in-process and in subprocesses (vdm/runtime.py
# item 4 makes the unrolled one the product's default): the same random bits
# (tests/run/test_performance.py compares them and checks the default), while the unrolled hash
# makes every small program bigger: a tiny MLP's 2-step train scan compiled in 6.1 s against
# 4.0 s (2-vCPU EPYC, these flags). Set before any test imports vdm.model; a value the user set
# wins, and env_for(product=True) leaves the product's default to its subprocesses.
_USER_THREEFRY = os.environ.get("VDM_THREEFRY_UNROLLED")
if FAST_COMPILE and _USER_THREEFRY is None:
    os.environ["VDM_THREEFRY_UNROLLED"] = "0"


def with_test_xla_flags(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) followed by the pytest process's TEST_XLA_FLAGS."""
    return f"{flags} {TEST_XLA_FLAGS}".strip()


# Overrides turning the default config into a seconds-long run. The learning rate is high and
# the EMA short so that a wrongly restored optimiser or EMA state shows up in the losses.
TINY = {
    "data.name": "gaussian",
    "data.gaussian.dim": 2,
    "data.gaussian.num_eval": 96,
    "data.batch_size": 8,
    "data.eval_batch_size": 32,
    "model.type": "mlp",
    "model.n_embd": 64,
    "model.n_layers": 1,
    "model.dropout": 0.1,
    "model.num_classes": 0,
    "model.cond_aug": False,
    "model.scan": False,
    "schedule.type": "learned_linear",
    "loss.type": "elbo",
    "optim.learning_rate": 1e-3,
    "optim.warmup_steps": 3,
    "optim.ema_rate": 0.9,
    "optim.ema_warmup": True,
    "optim.accum_steps": 1,
    "train.log_every": 1,
    "train.steps_per_call": 1,
    "train.fsdp": 1,
    "eval.max_examples": -1,
    "sample.sampler": "ancestral",
    "sample.steps": 4,
    "sample.num": 8,
}


# A two-block VDM U-Net on the 8x8 digits: convolutions, GroupNorm and attention, compiled in
# seconds. Its 3x3 kernels (9,216 weights) are big enough to be sharded by train.fsdp.
UNET = dict(
    data__name="digits",
    data__batch_size=8,
    model__type="vdm_unet",
    model__n_embd=32,
    model__n_layers=1,
    model__norm_groups=8,
    model__dropout=0.0,
)


def overrides(**extra) -> list[str]:
    """--config flags for TINY updated with `extra` (keys with '__' for '.')."""
    values = dict(TINY)
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--config.{k}={v}" for k, v in values.items()]


def env_for(devices: int = 1, product: bool = False) -> dict:
    """Environment of a subprocess with `devices` simulated CPU devices, compiling with
    SUBPROCESS_XLA_FLAGS and the rolled Threefry on the system allocator, or with the
    product's settings alone when `product`."""
    env = dict(os.environ)
    compile_flags = "" if product else SUBPROCESS_XLA_FLAGS
    if product and _USER_THREEFRY is None:
        env.pop("VDM_THREEFRY_UNROLLED", None)
    if not product and "VDM_ALLOCATOR" not in os.environ:
        # No re-run of the command under a preloaded allocator (vdm/runtime.py): it only
        # speeds up large steps' temporaries, and costs every short launch a second Python
        # start-up: a tiny 2-step launch 4.8-5.6 s against 5.5-5.9 s with it (2-vCPU EPYC,
        # warm compilation cache, alternated 4 times). Same numbers either way.
        env["VDM_ALLOCATOR"] = "system"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {compile_flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    # Subprocesses of one test compile the same programs; the persistent cache shares them
    # (a cached executable is the same executable, so bitwise comparisons are unaffected).
    env["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
    # Every program, however quick to compile: a tiny run compiles about 20, most under 0.5 s
    # (with all cached a relaunch started 0.45 s sooner, 4.9 against 5.4 s, on 2 loaded cores).
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def main_cmd(workdir, *flags, mode: str = "train", entry=("-m", "vdm.main")) -> list[str]:
    """The `python -m vdm.main` command line (`entry`: another script taking its flags)."""
    return [
        sys.executable,
        *entry,
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        f"--mode={mode}",
        "--tensorboard=false",
        *flags,
    ]


def run_main(
    workdir, *flags, mode: str = "train", devices: int = 1,
    timeout: int = SUBPROCESS_TIMEOUT, check: bool = True, product: bool = False,
) -> subprocess.CompletedProcess:  # fmt: skip
    """Runs vdm.main to completion (env_for(devices, product)); raises with its output when
    `check` and it fails."""
    proc = subprocess.run(
        main_cmd(workdir, *flags, mode=mode),
        cwd=REPO,
        env=env_for(devices, product),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vdm.main failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def spawn_main(
    workdir, *flags, mode: str = "train", devices: int = 1, env=None, log=None,
    entry=("-m", "vdm.main"),
) -> subprocess.Popen:  # fmt: skip
    """Starts vdm.main in the background (output to `log`, a path, or discarded)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with process
    return subprocess.Popen(
        main_cmd(workdir, *flags, mode=mode, entry=entry),
        cwd=REPO,
        env=env or env_for(devices),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def spawn_processes(
    workdir, *flags, logs_dir, num: int = 2, mode: str = "train", envs=None,
    entry=("-m", "vdm.main"),
) -> list[subprocess.Popen]:  # fmt: skip
    """Starts vdm.main as `num` localhost processes of one run joined by jax.distributed
    (process i logs to logs_dir/proc{i}.log and runs in envs[i], default env_for())."""
    port = free_port()
    envs = envs or (None,) * num
    return [
        spawn_main(
            workdir,
            *flags,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num}",
            f"--process_id={i}",
            mode=mode,
            env=envs[i],
            log=logs_dir / f"proc{i}.log",
            entry=entry,
        )  # fmt: skip
        for i in range(num)
    ]


def run_processes(workdir, *flags, logs_dir, mode: str = "train", num: int = 2):
    """Runs vdm.main as `num` localhost processes joined by jax.distributed; returns
    (exit codes, the tail of each process's log joined)."""
    procs = spawn_processes(workdir, *flags, logs_dir=logs_dir, num=num, mode=mode)
    try:
        codes = [p.wait(timeout=SUBPROCESS_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((logs_dir / f"proc{i}.log").read_text()[-3000:] for i in range(num))
    return codes, logs


def read_metrics(workdir, skip_cut: bool = False) -> list[dict]:
    """The records of workdir/metrics.jsonl (`skip_cut`: leave out lines that do not parse, as
    a killed run's last line, cut mid-write, may not)."""
    records = []
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            if line.strip() and not skip_cut:
                raise
    return records


def train_losses(workdir) -> dict[int, float]:
    """step -> train/loss from metrics.jsonl (asserting no step is logged twice)."""
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(steps)}"
    return {r["step"]: r["train/loss"] for r in records}


def logged_losses(workdir) -> dict[int, float]:
    """step -> train/loss of every complete train record (a later record of a step replaces an
    earlier; a killed run's last line, possibly cut mid-write, is skipped)."""
    records = read_metrics(workdir, skip_cut=True)
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def logged_past_checkpoint(workdir) -> bool:
    """Whether a run has a complete checkpoint and a train record of a later step (so that a
    fault now leaves steps to recompute after the restore)."""
    steps = checkpoint_steps(workdir)
    try:
        return bool(steps) and max(logged_losses(workdir), default=0) > steps[-1]
    except OSError:  # no metrics file yet
        return False


def checkpoint_steps(workdir) -> list[int]:
    """Finalised checkpoint steps on disk (orbax renames a step dir only when complete)."""
    path = Path(workdir) / "checkpoints"
    if not path.exists():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def wait_for(
    predicate, timeout: float = SUBPROCESS_TIMEOUT, proc=None, interval: float = 0.02
) -> None:
    """Polls `predicate` until true; fails early if `proc` exits first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before the condition")
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(interval)


def free_port() -> int:
    """An unused localhost TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_config(**extra):
    """The tiny config in-process (CONFIG's get_config() with TINY and `extra` applied)."""
    spec = importlib.util.spec_from_file_location("vdm_test_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    values = dict(TINY)
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    config.update_from_flattened_dict(values)
    return config


def parse_flags(*args):
    """The config as `python -m vdm.main --config=configs/digits.py ARGS` would see it."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["vdm.main", f"--config={CONFIG}", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


class GaussianOracle(nn.Module):
    """The exact eps-denoiser of N(mean, cov) as a parameter-free network."""

    mean: tuple
    cov: tuple

    @nn.compact
    def __call__(self, z, gamma, cond=None, train: bool = False):
        del cond, train
        return oracles.gaussian_eps(np.asarray(self.mean), np.asarray(self.cov))(z, gamma)


def gaussian_oracle(dim: int) -> GaussianOracle:
    """The exact denoiser of the `gaussian` dataset of dimension `dim`."""
    dist = densities.default_gaussian(dim)
    return GaussianOracle(
        tuple(np.asarray(dist.mean).tolist()), tuple(map(tuple, dist.cov.tolist()))
    )


@contextlib.contextmanager
def _suite_lock(tmp_path_factory, name: str):
    """The folder every pytest-xdist worker of this run shares, locked for `name` (the first
    worker to get here builds; the others wait, then reuse what it built)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base temp folders share this parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def computed_once(tmp_path_factory, name: str, compute):
    """compute()'s JSON-serialisable value, computed once per test run however the tests that
    need it are spread over workers (a module fixture runs once per worker)."""
    with _suite_lock(tmp_path_factory, name) as root:
        path = root / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        path.write_text(json.dumps(value))
        return value


def workdir_once(tmp_path_factory, name: str, build) -> Path:
    """A workdir that build(workdir) fills once per test run, shared by every worker; tests
    must only read it (or copy it)."""
    with _suite_lock(tmp_path_factory, name) as root:
        workdir, done = root / name, root / f"{name}.built"
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # an earlier worker's failed build
            build(workdir)
            done.touch()
        return workdir


# The tiny setup trained for 2 steps (final evaluation at step 2, no sample grid): the start of
# every test that evaluates, samples from or resumes a finished tiny run.
TRAINED_FLAGS = overrides(train__num_steps=2, train__write_samples=False)


def tiny_trained(tmp_path_factory) -> Path:
    """The shared 2-step tiny run (TRAINED_FLAGS), trained once per test run: copy it."""
    return workdir_once(tmp_path_factory, "tiny_trained", lambda w: run_main(w, *TRAINED_FLAGS))
