"""Every sampler and likelihood gives the same numbers with the batch on 1 and on 4 devices.

A subprocess (XLA_FLAGS must be set before jax is imported) forces 4 host CPU devices and runs
each function twice from the same key: with the batch sharded over a 1-device mesh and over a
4-device ('data',) mesh. It prints one JSON line of {check: [max abs difference, extra facts]}
for this process to assert on. Two run, one per compiler setting (see _run_child).
"""

import json
import subprocess
import sys

import pytest
import train_helpers as th

# Every test here reads the results of one subprocess: with `--dist loadgroup` (as .ci/run and
# the README run pytest-xdist) they all go to one worker, so the other is never left waiting.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sharded_sampling")]

CHILD = r"""
import json
import sys
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from vdm.core import guidance, losses, oracles, schedules
from vdm.sampling import likelihood, samplers

assert jax.device_count() == 4, jax.devices()
shardings = [
    NamedSharding(jax.make_mesh((n,), ("data",), devices=jax.devices()[:n]), P("data"))
    for n in (1, 4)
]
sched = schedules.learned_linear(-13.3, 5.0)
params = {"w": jnp.asarray(17.0), "b": jnp.asarray(-12.0)}  # a learned schedule's values
weights, means = np.array([0.4, 0.6]), np.array([[-0.6, 0.0, 0.2], [0.6, 0.3, -0.1]])
covs = np.full((2, 3), 0.3)
mix = oracles.mixture_eps(weights, means, covs)
B, key = 16, jax.random.key(0)
labels = jnp.arange(B) % 2
results = {}


def compare(name, fn):
    outs = []
    for s in shardings:
        with jax.set_mesh(s.mesh):  # Explicit mesh axes (make_mesh's default) need it
            outs.append(fn(s))
    flat = [jax.tree.leaves(o) for o in outs]
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(*flat))
    lead = flat[1][0]
    devices = len(lead.sharding.device_set) if hasattr(lead, "sharding") else 0
    scale = max(float(np.max(np.abs(np.asarray(a, np.float64)))) for a in flat[0])
    results[name] = [diff, devices, scale]
    return outs


if sys.argv[1] == "adaptive":  # the adaptive solve's bitwise checks (see _run_child)
    # Adaptive PF-ODE likelihood: one step sequence for the whole batch, the same on 1 and 4.
    z0 = jax.random.normal(jax.random.key(1), (B, 3)) * jnp.linspace(0.2, 3.0, B)[:, None]
    def nll(s, z=z0):
        return likelihood.ode_log_prob(mix, sched, params, jax.device_put(z, s), jax.random.key(2),
                                       trace="hutchinson", num_probes=2, rtol=1e-5, atol=1e-5,
                                       batch_sharding=s)
    outs = compare("ode_log_prob", nll)
    steps = [int(o["num_steps"]) for o in outs]
    # The latent path is bit-identical when both layouts take the very same steps (a grid moved by
    # an ulp of the controller's input leaves thousands of ulps at intermediate times).
    results["ode_z_end_ulps"] = float(np.max(np.abs(np.asarray(outs[0]["z_end"], np.float64)
                                                    - np.asarray(outs[1]["z_end"], np.float64))
                                             / np.spacing(np.abs(np.asarray(outs[0]["z_end"])))))
    # What separate per-device solves would have done: each quarter on its own.
    with jax.set_mesh(shardings[0].mesh):
        quarters = [int(nll(shardings[0], z0[i * 4:(i + 1) * 4])["num_steps"]) for i in range(4)]
    results["adaptive_steps"] = [steps, quarters]
    print("RESULTS " + json.dumps(results))
    sys.exit(0)

SAMPLERS = [
    ("ancestral", {}), ("ddpm", {}), ("ddim", {"eta": 0.5}), ("sde", {}),
    ("pc", {"predictor": "sde"}), ("langevin", {"steps_each": 2}),
    ("ode", {"solver": "heun"}), ("ode", {"solver": "tsit5", "rtol": 1e-4, "atol": 1e-4}),
    ("ode", {"solver": "heun", "time": "log_snr"}),
    ("dpm_solver", {"order": 2}), ("dpm_solver", {"order": 3, "spacing": "edm"}),
    ("unipc", {"order": 2}), ("unipc", {"order": 3, "variant": "bh1"}),
]
def tag(name, opts):
    return name + "".join(str(opts[k]) for k in ("solver", "time", "order") if k in opts)
for name, opts in SAMPLERS:
    compare(tag(name, opts), lambda s: samplers.sample_z0(
        name, mix, sched, params, key, (B, 3), steps=6, batch_sharding=s, **opts))
# DPM-Solver++ and UniPC under classifier-free guidance: unconditional, conditional, 3. (A
# guided PF-ODE is not run sharded yet: its labels, closed over by the vector field, are
# Explicit-sharded arrays inside the solve's Auto mode.)
for name, opts in SAMPLERS[-4:]:
    for w in (0.0, 1.0, 3.0):
        compare(f"cfg_{tag(name, opts)}_{w:g}", lambda s: samplers.sample(
            name, mix, sched, params, key, (B, 3), vocab_size=None, steps=6,
            cond={"label": jax.device_put(labels, s)}, guidance=w, num_classes=2,
            batch_sharding=s, **opts))

def guided(s):
    cond = {"label": jax.device_put(labels, s)}
    return samplers.sample("ddim", mix, sched, params, key, (B, 3), vocab_size=None, steps=6,
                           cond=cond, guidance=3.0, num_classes=2, batch_sharding=s)
compare("cfg", guided)

clf = guidance.mixture_classifier(weights, means, covs)
base = lambda z, g, c: mix(z, g, None)
cg = guidance.classifier_guided(base, clf, scale=2.0)
compare("classifier_guidance", lambda s: samplers.sample(
    "ancestral", cg, sched, params, key, (B, 3), vocab_size=16, steps=6,
    cond={"label": jax.device_put(labels, s)}, guidance=1.0, batch_sharding=s))

x = jnp.asarray(np.random.default_rng(3).integers(0, 16, (B, 3)), jnp.int32)
compare("ode_nll_decoder", lambda s: likelihood.ode_nll(
    mix, sched, params, jax.device_put(x, s), jax.random.key(4), vocab_size=16,
    trace="exact", batch_sharding=s, rtol=1e-4, atol=1e-4)["nll"])

terms = jax.jit(lambda b, k: losses.loss_terms(mix, sched, params, b["x"], k, vocab_size=16))
def elbo(s):
    batches = [{"x": jax.device_put(x[i * 8:(i + 1) * 8], s),
                "mask": jax.device_put(jnp.ones(8), s)} for i in range(2)]
    out = likelihood.evaluate_elbo(terms, batches, key=jax.random.key(5), num_draws=2)
    return [jnp.asarray(out["bpd"]), jnp.asarray(out["bpd_stderr"])]
compare("evaluate_elbo", elbo)
print("RESULTS " + json.dumps(results))
"""


def _run_child() -> dict:
    # The adaptive solve's checks compile as the product does: its step-size controller reads
    # a norm over the batch, whose summation order (one device, or four partial sums) rounds
    # alike under XLA's default code generation; the suite's fast-compile flags (see
    # train_helpers.TEST_XLA_FLAGS) give 45 ulps between the layouts' final latents.
    results = {}
    for part, product in (("layouts", False), ("adaptive", True)):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, part],
            env=th.env_for(4, product=product),
            capture_output=True,
            text=True,
            timeout=th.SUBPROCESS_TIMEOUT,
        )
        assert proc.returncode == 0, proc.stderr[-8000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
        results.update(json.loads(line[len("RESULTS ") :]))
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # One child for the whole run, even when pytest-xdist spreads these tests over workers.
    return th.computed_once(tmp_path_factory, "sharded_sampling", _run_child)


NEW = ["odeheunlog_snr", "dpm_solver2", "dpm_solver3", "unipc2", "unipc3"]  # in log-SNR
SAMPLED = ["ancestral", "ddpm", "ddim", "sde", "pc", "langevin", "odeheun", "odetsit5", "cfg",
           *NEW, *(f"cfg_{n}_{w}" for n in NEW[1:] for w in (0, 1, 3))]  # fmt: skip


@pytest.mark.parametrize("name", SAMPLED + ["ode_log_prob", "ode_nll_decoder"])
def test_same_numbers_on_1_and_4_devices(results, name):
    diff, devices, _ = results[name]
    assert diff < 1e-5, f"{name}: max |1-device - 4-device| = {diff}"
    assert devices == 4, f"{name} did not run sharded over 4 devices"


def test_discrete_samples_and_elbo_identical(results):
    assert results["classifier_guidance"][0] == 0.0  # decoded integers
    assert results["evaluate_elbo"][0] < 1e-5


def test_adaptive_solve_takes_one_global_step_sequence(results):
    (one_device, four_devices), quarters = results["adaptive_steps"]
    assert one_device == four_devices
    # Equal counts are not equal grids: with the log-density in the error norm both layouts
    # took 15 steps at times up to 4e-3 apart, z_end 24 ulps and log_prob 2.7e-4 apart.
    assert results["ode_z_end_ulps"] == 0.0
    # Per-device solves would disagree about the steps, so the norm really is global.
    assert len(set(quarters)) > 1
