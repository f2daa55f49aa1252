"""Soak test: a run killed (SIGKILL) at a random step in every `--kill_every` steps and relaunched
each time ends with the same parameters, bit for bit, as the same run left alone.

Run from the repository root:

  python -m experiments.soak                                  # digits default, 2,000 steps
  python -m experiments.soak --steps=600 --kill_every=200 --out=experiments/results/soak.md

Both runs are `python -m vdm.main` processes with the same command line: the config plus
--config.train.num_steps=--steps, --config.train.ckpt_every=--ckpt_every and
--config.train.log_every=--log_every (the kill is placed by watching metrics.jsonl, so the log
cadence sets how close to its drawn step a kill lands), plus any `--set key=value` overrides.
None of these changes a step's arithmetic. The uninterrupted run goes in the background while
the killed one is driven; a kill drawn for step k is sent once the log shows step >= k, and the
relaunch resumes from the last checkpoint. A kill may land after a checkpoint save has started
and before it is finalised, which is the case the orbax temporaries exist for.

The comparison restores both final checkpoints (parameters, optimiser moments, EMA, every
leaf of the train state) and compares them with np.array_equal, and compares the logged train
losses step by step. It stops by itself: one kill per window, each launch under --timeout_s.
Prints a markdown report (and writes it to --out when given); exits 1 when anything differs.
"""

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this runs as a script (importing it from
    the tests beside other experiment scripts must not define --config twice)."""
    flags.DEFINE_string("config", os.path.join(REPO, "configs", "digits.py"), "Config file.")
    flags.DEFINE_integer("steps", 2000, "Training steps of both runs.")
    flags.DEFINE_integer(
        "kill_every", 300, "One SIGKILL at a random step in every this many steps."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the random kill steps.")
    flags.DEFINE_integer("ckpt_every", 100, "train.ckpt_every of both runs.")
    flags.DEFINE_integer("log_every", 10, "train.log_every of both runs (kill placement).")
    flags.DEFINE_multi_string("set", [], "Further config overrides KEY=VALUE, for both runs.")
    flags.DEFINE_string("workdir", None, "Where the two workdirs go (default: a temporary dir).")
    flags.DEFINE_integer("timeout_s", 1800, "Limit for any one launch.")
    flags.DEFINE_string("out", None, "Also write the markdown report here.")


def kill_steps(steps: int, kill_every: int, seed: int) -> list[int]:
    """One random step per window [w, w + kill_every) of the run, never the last step.

    Returns:
      Ascending steps in [1, steps - 1].
    """
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, steps - 1, kill_every):
        lo, hi = max(start, 1), min(start + kill_every, steps) - 1
        if lo <= hi:
            out.append(int(rng.integers(lo, hi + 1)))
    return out


def config_flags_for(config: str, steps: int, ckpt_every: int, log_every: int, sets) -> list[str]:
    """The vdm.main flags both runs share."""
    values = {
        "train.num_steps": steps,
        "train.ckpt_every": ckpt_every,
        "train.log_every": log_every,
    }
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set {item!r}: use KEY=VALUE, e.g. --set data.batch_size=8")
        values[key] = value
    return [f"--config={config}"] + [f"--config.{k}={v}" for k, v in values.items()]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    return env


def _launch(workdir: str, config_args: list[str], log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vdm.main", f"--workdir={workdir}", "--tensorboard=false"]
    log = open(log_path, "a")  # noqa: SIM115 - handed to the process, closed with it
    return subprocess.Popen(
        cmd + config_args, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT
    )


def logged_steps(workdir: str) -> dict[int, float]:
    """step -> train/loss from metrics.jsonl (lines cut by a kill are skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "train/loss" in record:
                if record["step"] in out:
                    raise AssertionError(f"step {record['step']} logged twice in {path}")
                out[record["step"]] = record["train/loss"]
    return out


def _checkpoints(workdir: str) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(p) for p in os.listdir(path) if p.isdigit())


def _wait(proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"a launch ran past {timeout} s; see {log_path}") from None
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"vdm.main exited {code}:\n{tail}")


def killed_run(workdir: str, config_args, kills, timeout: float) -> list[dict]:
    """Drives the killed run to completion; returns one record per launch."""
    log_path = os.path.join(workdir + ".log")
    launches = []
    for target in kills + [None]:
        resumed = (_checkpoints(workdir) or [0])[-1]
        start = time.monotonic()
        proc = _launch(workdir, config_args, log_path)
        record = {"resumed_from": resumed, "target": target, "killed_at": None}
        if target is None:
            _wait(proc, timeout, log_path)
        else:
            while max(logged_steps(workdir), default=0) < target:
                if proc.poll() is not None:
                    _wait(proc, 0, log_path)  # raises on a failure
                    break  # finished before the kill step (possible only at the end)
                if time.monotonic() - start > timeout:
                    proc.kill()
                    raise RuntimeError(f"no step {target} within {timeout} s; see {log_path}")
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                record["killed_at"] = max(logged_steps(workdir), default=0)
        record["seconds"] = time.monotonic() - start
        launches.append(record)
    return launches


def final_states(config_args, workdirs):
    """The final train state of each workdir, restored onto this process's CPU device."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    from vdm.run.setup import build_run

    argv = ["soak", *config_args]
    values = absl_flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    run = build_run(values.config)
    states = []
    for workdir in workdirs:
        ckpts = run.checkpoints(workdir)
        try:
            state, _, step = ckpts.restore(run.abstract_state)
        finally:
            ckpts.close()
        states.append((step, state))
    return states


def compare(reference, resumed) -> dict:
    """Leaf-by-leaf bitwise comparison of two train states."""
    import jax

    ref_leaves = jax.tree_util.tree_leaves_with_path(reference)
    res_leaves = jax.tree.leaves(resumed)
    differing, max_diff = [], 0.0
    for (path, a), b in zip(ref_leaves, res_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if not np.array_equal(a, b):
            differing.append(jax.tree_util.keystr(path))
            if np.issubdtype(a.dtype, np.inexact):
                max_diff = max(max_diff, float(np.max(np.abs(a - b))))
    return {"leaves": len(ref_leaves), "differing": differing, "max_abs_diff": max_diff}


def soak(config, steps, kill_every, seed, ckpt_every, log_every, sets, root, timeout) -> dict:
    """Runs the uninterrupted and the killed run in `root`; returns every figure."""
    config_args = config_flags_for(config, steps, ckpt_every, log_every, sets)
    kills = kill_steps(steps, kill_every, seed)
    ref_dir, killed_dir = os.path.join(root, "uninterrupted"), os.path.join(root, "killed")
    start = time.monotonic()
    reference = _launch(ref_dir, config_args, ref_dir + ".log")  # alongside the killed run
    try:
        launches = killed_run(killed_dir, config_args, kills, timeout)
        _wait(reference, timeout, ref_dir + ".log")
    finally:
        if reference.poll() is None:
            reference.kill()
    wall = time.monotonic() - start
    (ref_step, ref_state), (res_step, res_state) = final_states(config_args, [ref_dir, killed_dir])
    ref_losses, res_losses = logged_steps(ref_dir), logged_steps(killed_dir)
    loss_diff = sorted(s for s in ref_losses if res_losses.get(s) != ref_losses[s])
    return {
        "config_args": config_args,
        "kills": kills,
        "launches": launches,
        "final_steps": (ref_step, res_step),
        "state": compare(ref_state, res_state),
        "logged": (len(ref_losses), len(res_losses)),
        "loss_steps_differing": loss_diff,
        "wall_s": wall,
    }


def passed(result: dict) -> bool:
    """Whether the killed run ended where the uninterrupted one did, bit for bit."""
    ref_step, res_step = result["final_steps"]
    return (
        ref_step == res_step
        and not result["state"]["differing"]
        and not result["loss_steps_differing"]
        and result["logged"][0] == result["logged"][1]
    )


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def report(result: dict) -> str:
    """The markdown report of one soak."""
    state, kills = result["state"], [r for r in result["launches"] if r["killed_at"] is not None]
    lines = [
        "# Soak: SIGKILL and relaunch vs an uninterrupted run",
        "",
        f"Command line of both runs: `python -m vdm.main {' '.join(result['config_args'])}`",
        f"Machine: {_machine()} (JAX on CPU, one device); wall time {result['wall_s']:.0f} s "
        "for both runs together (they ran side by side).",
        "",
        "| launch | resumed from step | kill drawn for step | killed after logged step | s |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["launches"]):
        target = "-" if r["target"] is None else r["target"]
        killed = "ran to the end" if r["killed_at"] is None else r["killed_at"]
        lines.append(
            f"| {i + 1} | {r['resumed_from']} | {target} | {killed} | {r['seconds']:.0f} |"
        )
    ref_step, res_step = result["final_steps"]
    verdict = "IDENTICAL, bit for bit" if passed(result) else "DIFFERENT"
    lines += [
        "",
        f"{len(kills)} kills. Final checkpoint steps: uninterrupted {ref_step}, killed {res_step}.",
        f"Train state: {state['leaves']} arrays compared with np.array_equal, "
        f"{len(state['differing'])} differ (largest |difference| {state['max_abs_diff']:g}).",
        f"Logged train losses: {result['logged'][0]} vs {result['logged'][1]} steps, "
        f"{len(result['loss_steps_differing'])} differ.",
        "",
        f"Result: {verdict}.",
    ]
    if state["differing"]:
        lines.append("Differing arrays: " + ", ".join(state["differing"][:10]))
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="vdm-soak-")
    os.makedirs(root, exist_ok=True)
    result = soak(
        FLAGS.config,
        FLAGS.steps,
        FLAGS.kill_every,
        FLAGS.seed,
        FLAGS.ckpt_every,
        FLAGS.log_every,
        FLAGS.set,
        root,
        FLAGS.timeout_s,
    )
    text = report(result)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text)
    sys.exit(0 if passed(result) else 1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
