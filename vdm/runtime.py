"""Process settings that must be in place before JAX starts: XLA:CPU flags and the allocator.

Both were measured on this project's 2-core CPU machine (experiments/results/benchmark.md); on a
GPU or TPU they change nothing that matters there.

1. jaxlib 0.10.2's XLA:CPU hands convolutions to YNNPACK ("individual_convolution" fusions),
   which runs the U-Net's 3x3 convolutions at about half the speed of a dense matmul. Taking
   that one fusion type out (`-individual_convolution`) keeps YNNPACK's dots and reductions and
   lets XLA's own convolution run them at 90-95% (forward, input gradient) and 50-74% (kernel
   gradient) of a matmul. XLA aborts the process on a flag it does not know, so the flag is only
   added for jaxlib versions where it was measured.

2. glibc's malloc maps every buffer above 32 MiB fresh from the kernel and unmaps it when freed,
   so each train step page-faults its gigabytes of temporaries again (an elementwise pass over
   75 MB ran at 4 GB/s instead of 22 GB/s). tcmalloc (or jemalloc) keeps freed memory for
   reuse. An allocator has to be loaded before the process starts, so
   `reexec_with_allocator` runs the same command again with LD_PRELOAD when one is installed
   and not yet loaded: the system's tcmalloc or jemalloc (`apt-get install
   libtcmalloc-minimal4`) where present, else mimalloc from the `cmeel-mimalloc` wheel that
   requirements.txt installs, so a pip-only machine (CI, a fresh clone) gets one too. mimalloc
   runs with MIMALLOC_PURGE_DELAY=-1 (freed memory is kept, never handed back): with its
   default delay it returns the step's temporaries to the kernel between steps and the train
   step was 10-17% slower (experiments/results/perf_attempts.md, 2026-12-07).

3. TensorFlow (imported for the TFDS pipelines and the metric writers) prints INFO lines from
   C++ at start-up (CPU-feature and oneDNN notices, absl's "log messages before
   absl::InitializeLog()" banner) before the run's first line. `quiet_tensorflow` sets
   TF_CPP_MIN_LOG_LEVEL=1 (warnings and errors still show) and TF_ENABLE_ONEDNN_OPTS=0 (the
   oneDNN notice ignores the log level) unless the user has set them; the first also applies
   to XLA's INFO lines. It must run before TensorFlow is imported: `setup` and
   `configure_xla` (which `import vdm` runs) call it.

4. On CPU, jax lowers the Threefry hash behind every random draw as a rolled loop of five
   passes over the whole output (small programs, quick compiles), and XLA:CPU runs each pass
   as a separate kernel through memory: dropout's masks for a batch of 32 at 32x32x64 took
   12.5 ms a layer. `unroll_threefry` registers jax's own unrolled lowering (the one it uses
   on other backends) for CPU: the same bits, 2.3 ms, and the reduced U-Net's train step
   about 8% faster with 300 MiB fewer temporaries. vdm.model and vdm.nets call it when
   imported, on the jax versions where it was checked. (It was opt-in for a while because a
   scanned train step in the tests hung with it; the hang was LAPACK's LU deadlocking XLA's
   thread pool, not this lowering, and is gone: tests/sampling/test_no_lapack.py.)

5. jax's rematerialisation (`jax.checkpoint`, nn.remat: model.remat) wraps the recomputation's
   inputs in optimisation barriers so that XLA's common-subexpression elimination cannot merge
   the recomputed forward pass back into the original. XLA:CPU expands (drops) those barriers
   before its CSE runs, so an unrolled remat compiled to the very program without it: a
   16-block chain had 143 dots either way and the same 520 MiB of temporaries, and the reduced
   U-Net's step with model.remat kept all 1255 MiB while running 14% slower. With the pass
   turned off (`--xla_disable_hlo_passes=cse_barrier_expander`) the chain needs 160 MiB, the
   U-Net's remat step 810 MiB (at 0.77x the step speed: the trade remat is for), and the step
   without remat 1183 MiB at the same speed (its fused GroupNorm's barrier holds too). The
   flag applies to every backend in the process and was only measured on CPU, so it is added
   only where no accelerator plugin (jax_plugins.*, libtpu) is installed or JAX_PLATFORMS=cpu.

Opt out with VDM_XLA_CPU_FLAGS=0, VDM_ALLOCATOR=system and VDM_THREEFRY_UNROLLED=0;
VDM_ALLOCATOR=tcmalloc|jemalloc|mimalloc picks one allocator.
"""

import importlib.util
import os
import pkgutil
import sys

# The flags, and the jaxlib versions on which they were measured to help (and exist).
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
YNN_FLAG_VERSIONS = ("0.10.2",)
BARRIER_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander"  # item 5; CPU-only processes

# Allocators that keep freed memory, best first, and where Linux distributions put them.
ALLOCATORS = (
    "libtcmalloc_minimal.so.4",
    "libtcmalloc.so.4",
    "libjemalloc.so.2",
    "libmimalloc.so.3",
)
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# Environment an allocator runs with; a user's own value wins. mimalloc otherwise hands freed
# memory back to the kernel after 10 ms, i.e. between two train steps.
ALLOCATOR_ENV = {"mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"}}
# jax versions whose unrolled Threefry lowering was checked to give the same bits on CPU.
THREEFRY_JAX_VERSIONS = ("0.10.2",)
_REEXEC_MARK = "VDM_ALLOCATOR_REEXEC"


def xla_flags(existing: str, jaxlib_version: str, cpu_only: bool = True) -> str:
    """XLA_FLAGS with the project's flags appended (each left out if set or untested).

    Args:
      existing: the current XLA_FLAGS value ('' if unset).
      jaxlib_version: jaxlib's version string.
      cpu_only: whether this process can only run on CPU (`cpu_only_process`); the barrier
        flag is only added then.

    Returns:
      The new XLA_FLAGS value. A user's own setting of the same flag wins.
    """
    if jaxlib_version not in YNN_FLAG_VERSIONS:
        return existing
    flags = existing
    for flag in (YNN_FLAG, BARRIER_FLAG) if cpu_only else (YNN_FLAG,):
        if flag.split("=", 1)[0] not in flags:
            flags = f"{flags} {flag}".strip()
    return flags


def cpu_only_process(env=None) -> bool:
    """Whether JAX can only start its CPU backend here: JAX_PLATFORMS=cpu, or no GPU/TPU
    plugin installed (jax's CUDA and ROCm plugins are jax_plugins.* modules; TPUs need
    libtpu). Looks up module specs only; imports nothing."""
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    if importlib.util.find_spec("libtpu") is not None:
        return False
    plugins = importlib.util.find_spec("jax_plugins")
    locations = plugins.submodule_search_locations if plugins else None
    return not (locations and any(True for _ in pkgutil.iter_modules(locations)))


def configure_xla() -> None:
    """Adds the XLA flags (items 1 and 5) to os.environ; effective before JAX starts a backend.

    Also quiets TensorFlow's (and XLA's) C++ INFO lines (`quiet_tensorflow`): this runs when
    the vdm package is imported, so it precedes every TensorFlow import made through vdm.
    """
    quiet_tensorflow()
    if os.environ.get("VDM_XLA_CPU_FLAGS", "1") == "0":
        return
    import jaxlib.version  # cheap: does not start a backend

    os.environ["XLA_FLAGS"] = xla_flags(
        os.environ.get("XLA_FLAGS", ""), jaxlib.version.__version__, cpu_only_process()
    )


def unroll_threefry(enable: bool | None = None) -> bool:
    """Lowers the Threefry hash on CPU with jax's unrolled rule instead of its rolled loop.

    The rule is jax's own (the one it registers for every backend but CPU), so the random bits
    are the same; only XLA:CPU's kernels change. Effective for programs traced afterwards.

    Args:
      enable: True installs the unrolled rule, False puts jax's CPU rule back; None (the
        default) installs it unless VDM_THREEFRY_UNROLLED=0, on the jax versions of
        THREEFRY_JAX_VERSIONS only.

    Returns:
      Whether the unrolled rule is now in force.
    """
    import jax

    if enable is None:
        if jax.__version__ not in THREEFRY_JAX_VERSIONS:
            return False  # the private rules below may not exist there
        enable = os.environ.get("VDM_THREEFRY_UNROLLED", "1") != "0"
    # Private modules: the rules exist under these names in the versions listed above.
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as threefry

    if enable:
        rule = threefry._threefry2x32_lowering_rule
    else:
        rule = threefry._threefry2x32_cpu_lowering_rule
    mlir.register_lowering(threefry.threefry2x32_p, rule, platform="cpu")
    return bool(enable)


def pip_library_dirs() -> list[str]:
    """Where pip-installed native libraries live: the cmeel prefix of each site-packages."""
    import site

    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return [os.path.join(root, "cmeel.prefix", "lib") for root in roots]


def find_allocator(dirs=None, prefer: str = "") -> str | None:
    """Path of the first installed allocator of ALLOCATORS, or None.

    Args:
      dirs: directories to search; default the system's LIBRARY_DIRS, then pip's.
      prefer: 'tcmalloc', 'jemalloc' or 'mimalloc' to consider only that one ('' = any).
    """
    dirs = [*LIBRARY_DIRS, *pip_library_dirs()] if dirs is None else dirs
    for name in ALLOCATORS:
        if prefer and prefer not in name:
            continue
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.exists(path):
                return path
    return None


def allocator_env(env: dict, library: str | None, platform: str = sys.platform) -> dict | None:
    """The environment to re-run the process with, or None if it should run as it is.

    None when: not Linux, no allocator installed, VDM_ALLOCATOR=system, an allocator is already
    preloaded, or this process is itself the re-run (so it can never loop).
    """
    if not platform.startswith("linux") or library is None:
        return None
    if env.get("VDM_ALLOCATOR", "") == "system" or env.get(_REEXEC_MARK):
        return None
    preload = env.get("LD_PRELOAD", "")
    if any(tag in preload for tag in ("tcmalloc", "jemalloc", "mimalloc")):
        return None
    new = dict(env)
    new["LD_PRELOAD"] = f"{library} {preload}".strip()
    new[_REEXEC_MARK] = "1"
    for tag, settings in ALLOCATOR_ENV.items():
        if tag in os.path.basename(library):
            for name, value in settings.items():
                new.setdefault(name, value)
    return new


def reexec_with_allocator(dirs=None) -> None:
    """Re-runs this exact command (same PID, arguments and environment) with tcmalloc preloaded.

    Call first thing in a program's entry point, before JAX starts: the process image is
    replaced, so nothing done before is kept. Does nothing when `allocator_env` says so.

    Args:
      dirs: where to look for the allocators of ALLOCATORS (default: `find_allocator`'s).
    """
    prefer = os.environ.get("VDM_ALLOCATOR", "")
    prefer = prefer if prefer in ("tcmalloc", "jemalloc", "mimalloc") else ""
    env = allocator_env(dict(os.environ), find_allocator(dirs, prefer))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def loaded_allocator() -> str:
    """Which allocator this process runs on ('tcmalloc', 'jemalloc', 'mimalloc' or 'glibc')."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for tag in ("tcmalloc", "jemalloc", "mimalloc"):
        if tag in maps:
            return tag
    return "glibc"


# Environment variables that silence TensorFlow's start-up INFO lines; a user's value wins.
# TF_ENABLE_ONEDNN_OPTS=0: on CPUs where TensorFlow turns oneDNN on it logs that at start-up
# whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21, seen on an AMD EPYC); TensorFlow only feeds the
# data pipeline here, whose outputs are rounded to integers, and oneDNN off also keeps its
# float rounding the same on every CPU.
QUIET_TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_tensorflow(env=None) -> None:
    """Sets QUIET_TF_ENV in `env` (default os.environ) where not already set; effective only
    before TensorFlow is imported."""
    env = os.environ if env is None else env
    for name, value in QUIET_TF_ENV.items():
        env.setdefault(name, value)


def setup(*, reexec: bool = True) -> None:
    """All settings: quiet TensorFlow, re-run under a better allocator (if any), then set the
    XLA:CPU flags."""
    quiet_tensorflow()  # before the re-run, so its environment carries the setting
    if reexec:
        reexec_with_allocator()
    configure_xla()
