"""The probability-flow ODE of the VP SDE implied by gamma(t), solved with diffrax.

With f = -0.5 gamma' sigma^2 and g^2 = gamma' sigma^2 (see vdm.sampling.sde) the PF-ODE
dz/dt = f z - 0.5 g^2 score, score = -eps / sigma, becomes
    dz/dt = 0.5 gamma'(t) sigma_t (eps_hat(z, t) - sigma_t z),
whose marginals equal the SDE's. Integrated from t = 1 down it samples; integrated up it
encodes data to noise and, with the divergence, gives exact likelihoods (vdm.sampling.likelihood).

Adaptive solves keep one step sequence for the whole (sharded) batch: the state is the global
batch, and the controller's error norm is a global reduction over it, so every device makes
the same accept/reject decision and takes the same steps. The norm is the max over examples
of each example's RMS scaled error, not diffrax's default RMS over everything: a max is exact
in any reduction order, and no example's error is averaged away by easier ones.

The same steps on 1 and on N devices also need the norm's *inputs* to agree bit for bit. The
controller is a discontinuous function of them (accept/reject, clipped step factors), so an
ulp of difference can move the whole later grid and leave differences of the size of the
solver's error, not of rounding. Quantities that are only integrated along the path, like a
log-density accumulator, must therefore stay out of the norm (`control`): their embedded
error estimates are cancellations of nearly equal stage values, in float32 at rtol 1e-5 mostly
rounding noise, and XLA rounds the divergence's forward-mode pass differently for different
per-device batch shapes. Controlling the state alone, they are a quadrature of a smooth
integrand on steps already accurate for the path. Bit-identical grids across device counts
still assume the vector field's per-example arithmetic does not depend on the per-device batch
size (true of the oracles here; a network's kernels may differ, then results agree to the
solver tolerance). Within one sharded run the steps are always shared.
"""

import math
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vdm.sampling.model import EpsModel
from vdm.sampling.registries import SAMPLERS
from vdm.sampling.sharded import constrain, explicit_axes, normal

SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,  # 8th order: fewer, costlier steps at tight tolerances
}
ADAPTIVE = ("tsit5", "dopri5", "dopri8")
# Network evaluations per adaptive step (stages, less the first-same-as-last one reused).
EVALS_PER_STEP = {"euler": 1, "heun": 2, "tsit5": 6, "dopri5": 6, "dopri8": 13}


def drift(model: EpsModel, t, z):
    """The PF-ODE velocity dz/dt at time t."""
    g, slope = model.gamma_slope(t)
    var = jax.nn.sigmoid(g)
    sigma = jnp.sqrt(var)
    return 0.5 * slope * sigma * (model.eps(z, t) - sigma * z)


def log_snr_drift(model: EpsModel, g, z):
    """The PF-ODE velocity dz/dgamma in gamma = -log SNR time: 0.5 sigma (eps_hat - sigma z).

    gamma'(t) cancels, so a learned schedule whose slope varies a lot costs the solver no
    extra steps; the network is called at t = model.time_of(gamma) (the numerical inverse).
    """
    sigma = jnp.sqrt(jax.nn.sigmoid(g))
    return 0.5 * sigma * (model.eps(z, model.time_of(g)) - sigma * z)


TIMES = ("t", "log_snr")


def velocity_and_span(model: EpsModel, time: str, t0, t1):
    """(field(s, z), s0, s1): the PF-ODE in time variable `time` (t or log_snr = gamma) and
    the integration range that corresponds to t0 -> t1."""
    if time == "t":
        return (lambda s, z: drift(model, s, z)), t0, t1
    if time == "log_snr":
        return (lambda s, z: log_snr_drift(model, s, z)), model.gamma(t0), model.gamma(t1)
    raise ValueError(f"Unknown ODE time {time!r}; use one of {TIMES}.")


def batch_max_rms(tree) -> jax.Array:
    """Max over examples of the per-example RMS of a pytree of [B, ...] leaves.

    Every leaf shares the leading batch axis (e.g. z [B, ...] and a log-density [B]); each
    example's entries across all leaves form its own RMS.
    """
    leaves = jax.tree.leaves(tree)
    sq = sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1) for a in leaves)
    count = sum(math.prod(a.shape[1:]) for a in leaves)
    return jnp.sqrt(jnp.max(sq) / count)


def integrate(
    vector_field: Callable,
    y0,
    t0: float,
    t1: float,
    *,
    solver: str = "heun",
    steps: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    args=None,
    control: Callable | None = None,
):
    """Solves dy/dt = vector_field(t, y, args) from t0 to t1 (either direction) with diffrax.

    Args:
      vector_field: (t, y, args) -> dy/dt for a pytree y of [B, ...] leaves.
      y0: initial state.
      t0, t1: start and end times.
      solver: euler|heun (fixed uniform grid of `steps` steps) or tsit5|dopri5|dopri8 (adaptive,
        PID controller with rtol/atol, global norm `batch_max_rms`, first step
        (t1 - t0) / steps).
      steps: fixed step count, or the adaptive solvers' first step.
      rtol, atol: adaptive tolerances.
      max_steps: adaptive step budget.
      args: arrays the vector field needs (passed, not closed over, so that they share the
        solve's sharding mode).
      control: y -> the part of the state whose error the adaptive controller bounds
        (default all of it); see the module docstring for why accumulators are left out.

    Returns:
      (y at t1, number of solver steps taken incl. rejected ones). A solve that fails (step
      budget exhausted) gives NaN states rather than raising: raising would need a host
      callback inside the sharded program.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {solver!r}; choose one of {sorted(SOLVERS)}.")
    adaptive = solver in ADAPTIVE

    def solve(y0, args, t0, t1):
        # Everything array-valued is built in here, so it lives in solve's sharding mode; the
        # times come in as arguments too (in log-SNR time they are arrays: gamma of t0, t1).
        if adaptive:
            norm = batch_max_rms if control is None else lambda err: batch_max_rms(control(err))
            controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=norm)
            dt0, budget = (t1 - t0) / steps, max_steps
        else:
            controller = diffrax.StepTo(ts=jnp.linspace(t0, t1, steps + 1))
            dt0, budget = None, steps
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            SOLVERS[solver](),
            t0,
            t1,
            dt0,
            y0,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            args=args,
            max_steps=budget,
            throw=False,
        )
        ok = sol.result == diffrax.RESULTS.successful
        y1 = jax.tree.map(lambda a: jnp.where(ok, a[0], jnp.nan), sol.ys)
        return y1, sol.stats["num_steps"]

    explicit = explicit_axes()
    if explicit:
        # diffrax's internals mix sharded and unsharded buffers, which Explicit sharding
        # types reject; solve with those axes in Auto mode and hand back y's own layout.
        specs = jax.tree.map(lambda a: jax.typeof(a).sharding.spec, y0)
        solve = jax.sharding.auto_axes(solve, axes=explicit, out_sharding=(specs, P()))
    return solve(y0, args, t0, t1)


def flow(model: EpsModel, z, t0: float, t1: float, *, batch_sharding=None, time: str = "t",
         **solver_options):  # fmt: skip
    """Transports z from time t0 to t1 along the PF-ODE (t1 > t0 encodes, t1 < t0 decodes),
    integrating in t or in gamma (time='log_snr'; fixed grids are then uniform in log-SNR).

    Returns:
      (z at t1, solver steps).
    """
    field, s0, s1 = velocity_and_span(model, time, t0, t1)

    def velocity(s, z, args):
        return constrain(field(s, z), batch_sharding)

    return integrate(velocity, z, s0, s1, **solver_options)


@SAMPLERS.register("ode")
def sample(
    model: EpsModel,
    key,
    shape,
    steps: int,
    *,
    solver: str = "heun",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t_eps: float = 0.0,
    time: str = "t",
    batch_sharding=None,
):
    """PF-ODE sampling from z_1 ~ N(0, I) down to t_eps (0: VDM's finite gamma_min needs no
    cut-off), integrated in t or in log-SNR (time='log_snr'); returns z at t_eps."""
    z1 = normal(key, shape, batch_sharding)
    z, _ = flow(
        model, z1, 1.0, t_eps, batch_sharding=batch_sharding, time=time, solver=solver,
        steps=steps, rtol=rtol, atol=atol, max_steps=max_steps,
    )  # fmt: skip
    return z
