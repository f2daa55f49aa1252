"""The process settings of vdm/runtime.py: XLA:CPU flags and the allocator re-run.

- The convolution flag and (in a CPU-only process) the remat barrier flag are appended to a
  user's XLA_FLAGS, never replace them, are left out when the user set them or on an untested
  jaxlib (XLA aborts on unknown flags), and are in force in a process that imports vdm before
  JAX starts. A process is CPU-only unless a GPU/TPU plugin is installed (or JAX_PLATFORMS=cpu).
- The allocator re-run happens at most once, only on Linux with an allocator installed, and
  never over one already preloaded or against VDM_ALLOCATOR=system; a re-run process keeps its
  arguments and reports tcmalloc/jemalloc as loaded.
"""

import importlib
import importlib.util
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vdm import runtime

ROOT = str(Path(__file__).resolve().parents[2])  # the repository root


def test_xla_flags_append_and_respect_the_user():
    devices = "--xla_force_host_platform_device_count=4"
    both = f"{runtime.YNN_FLAG} {runtime.BARRIER_FLAG}"
    assert runtime.xla_flags("", "0.10.2") == both
    assert runtime.xla_flags(devices, "0.10.2") == f"{devices} {both}"
    # The barrier flag acts on every backend and was measured on CPU only.
    assert runtime.xla_flags(devices, "0.10.2", cpu_only=False) == f"{devices} {runtime.YNN_FLAG}"
    # Idempotent, and a user's own value of either flag wins.
    once = runtime.xla_flags(devices, "0.10.2")
    assert runtime.xla_flags(once, "0.10.2") == once
    mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert runtime.xla_flags(mine, "0.10.2") == f"{mine} {runtime.BARRIER_FLAG}"
    passes = "--xla_disable_hlo_passes=fusion"
    assert runtime.xla_flags(passes, "0.10.2") == f"{passes} {runtime.YNN_FLAG}"
    # An untested jaxlib may not know the flags, and XLA aborts on unknown flags.
    assert runtime.xla_flags(devices, "9.9.9") == devices


def test_cpu_only_process_looks_for_accelerator_plugins(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    plugins = lambda: [m.name for m in pkgutil.iter_modules(jax_plugins_path())]  # noqa: E731
    assert runtime.cpu_only_process() == (not plugins() and not has_libtpu())
    # A CUDA plugin installs a jax_plugins.* module; then the process may run on a GPU.
    (tmp_path / "jax_plugins" / "xla_cuda99").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda99" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert "xla_cuda99" in plugins()
    assert not runtime.cpu_only_process()
    # ... unless the user asks for the CPU.
    assert runtime.cpu_only_process({"JAX_PLATFORMS": "cpu"})


def jax_plugins_path():
    spec = importlib.util.find_spec("jax_plugins")
    return list(spec.submodule_search_locations) if spec else []


def has_libtpu():
    return importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
def test_importing_vdm_sets_the_flag_before_jax_starts():
    code = (
        "import os, vdm, jax, jax.numpy as jnp; jnp.ones(1).block_until_ready(); "
        "print(os.environ['XLA_FLAGS'])"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("VDM_XLA_CPU_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    flags = out.stdout.strip().splitlines()[-1]
    assert "--xla_force_host_platform_device_count=2" in flags
    import jaxlib.version

    if jaxlib.version.__version__ in runtime.YNN_FLAG_VERSIONS:
        assert runtime.YNN_FLAG in flags
        assert (runtime.BARRIER_FLAG in flags) == runtime.cpu_only_process(env)
    env["VDM_XLA_CPU_FLAGS"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert runtime.YNN_FLAG not in out.stdout
    assert runtime.BARRIER_FLAG not in out.stdout


def test_allocator_env_rules():
    lib = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    env = runtime.allocator_env({"PATH": "/bin", "LD_PRELOAD": "/x/libfoo.so"}, lib, "linux")
    assert env["LD_PRELOAD"] == f"{lib} /x/libfoo.so"
    assert env["PATH"] == "/bin"
    # The re-run itself never re-runs again.
    assert runtime.allocator_env(env, lib, "linux") is None
    assert runtime.allocator_env({}, None, "linux") is None
    assert runtime.allocator_env({}, lib, "darwin") is None
    assert runtime.allocator_env({"VDM_ALLOCATOR": "system"}, lib, "linux") is None
    jemalloc = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
    assert runtime.allocator_env(jemalloc, lib, "linux") is None


def test_find_allocator_searches_the_given_dirs(tmp_path):
    assert runtime.find_allocator([str(tmp_path)]) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert runtime.find_allocator([str(tmp_path)]) == str(tmp_path / "libjemalloc.so.2")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert runtime.find_allocator([str(tmp_path)]).endswith("libtcmalloc_minimal.so.4")


def _loaded_libm() -> str:
    with open("/proc/self/maps") as f:
        paths = [line.split()[-1] for line in f if "libm.so" in line]
    return paths[0]


@pytest.mark.slow
def test_reexec_keeps_arguments_and_preloads_once(tmp_path):
    # A harmless library (libm) under an allocator's name stands in for jemalloc, so the
    # re-run itself is exercised on machines without one.
    shutil.copy(_loaded_libm(), tmp_path / "libjemalloc.so.2")
    code = (
        "import os, sys; from vdm import runtime; "
        f"runtime.reexec_with_allocator([{str(tmp_path)!r}]); "
        "print(sys.argv[1:], runtime.loaded_allocator(), os.environ['LD_PRELOAD'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VDM_ALLOCATOR")}
    env.pop("VDM_ALLOCATOR_REEXEC", None)
    out = subprocess.run(
        [sys.executable, "-c", code, "a", "--b=1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout.strip().splitlines()
    assert len(printed) == 1  # the command ran to its end exactly once
    args, allocator, preload = printed[0].rsplit(" ", 2)
    assert args == "['a', '--b=1']"
    assert allocator == "jemalloc"
    assert preload == str(tmp_path / "libjemalloc.so.2")


def test_mimalloc_from_pip_is_found_last_and_kept_from_purging(tmp_path):
    (tmp_path / "libmimalloc.so.3").write_bytes(b"")
    mimalloc = str(tmp_path / "libmimalloc.so.3")
    assert runtime.find_allocator([str(tmp_path)]) == mimalloc
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert runtime.find_allocator([str(tmp_path)]).endswith("libtcmalloc_minimal.so.4")
    # VDM_ALLOCATOR=<name> picks one of several.
    assert runtime.find_allocator([str(tmp_path)], prefer="mimalloc") == mimalloc
    assert runtime.find_allocator([str(tmp_path)], prefer="jemalloc") is None
    # mimalloc keeps freed memory (else the step's temporaries go back to the kernel between
    # steps); a user's own setting wins, and other allocators get no mimalloc variables.
    assert runtime.allocator_env({}, mimalloc, "linux")["MIMALLOC_PURGE_DELAY"] == "-1"
    mine = runtime.allocator_env({"MIMALLOC_PURGE_DELAY": "100"}, mimalloc, "linux")
    assert mine["MIMALLOC_PURGE_DELAY"] == "100"
    tc = runtime.allocator_env({}, str(tmp_path / "libtcmalloc_minimal.so.4"), "linux")
    assert "MIMALLOC_PURGE_DELAY" not in tc


def test_the_pip_wheel_s_mimalloc_is_where_find_allocator_looks():
    # requirements.txt installs cmeel-mimalloc on x86-64 Linux: a pip-only machine has it.
    import platform

    if sys.platform != "linux" or platform.machine() != "x86_64":
        return  # the requirement's marker leaves it out there
    found = runtime.find_allocator(runtime.pip_library_dirs(), prefer="mimalloc")
    assert found is not None and found.endswith("cmeel.prefix/lib/libmimalloc.so.3"), found
