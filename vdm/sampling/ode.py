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

Left out of the norm, though, an accumulator is only as accurate as the state's steps make it,
and a likelihood's divergence can vary much faster than the state near the data (measured on
the digits model: Tsit5 at rtol 1e-5 on z alone is 2.6e-2 bits/dim off per example). So the
likelihood can put its accumulator in the norm as a block of its own, with its own tolerance
(vdm.sampling.likelihood, `density_tol`), at a tolerance well above rounding.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vdm.core.diffusion import alpha_sigma
from vdm.sampling.model import EpsModel
from vdm.sampling.registries import SAMPLERS
from vdm.sampling.sharded import constrain, explicit_axes, normal

# Solver name -> diffrax class name. diffrax (with equinox and optimistix) is imported on first
# solve, not with this module: it is 0.6 s of every `python -m vdm.main` start-up otherwise,
# and most jobs (training, ancestral sampling, the ELBO) never solve an ODE.
SOLVERS = {
    "euler": "Euler",
    "heun": "Heun",
    # 3rd order, 3 evaluations a step: at the loose tolerances a density bound allows, the
    # cheapest adaptive solver for the digits model's likelihood (README, "What an ODE
    # likelihood costs").
    "bosh3": "Bosh3",
    "tsit5": "Tsit5",
    "dopri5": "Dopri5",
    "dopri8": "Dopri8",  # 8th order: fewer, costlier steps at tight tolerances
}
ADAPTIVE = ("bosh3", "tsit5", "dopri5", "dopri8")
# Network evaluations per adaptive step (stages, less the first-same-as-last one reused).
EVALS_PER_STEP = {"euler": 1, "heun": 2, "bosh3": 3, "tsit5": 6, "dopri5": 6, "dopri8": 13}


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


def ve_drift(model: EpsModel, u, x, log_time: bool):
    """The PF-ODE of the scaled state x = z / alpha in EDM's time sigma~ = sigma / alpha =
    exp(gamma / 2): dx/dsigma~ = eps_hat(alpha x, t), or sigma~ eps_hat in u = log sigma~.

    The VP drift's linear part (-0.5 gamma' sigma^2 z) is gone, so on data whose denoiser
    changes slowly the paths are close to straight lines (DDIM is Euler on this ODE).
    """
    g = 2.0 * u if log_time else 2.0 * jnp.log(u)
    alpha, _ = alpha_sigma(g)
    eps = model.eps(alpha * x, model.time_of(g))
    return jnp.exp(0.5 * g) * eps if log_time else eps


class OdeTime(NamedTuple):
    """The PF-ODE between t0 and t1 in one time variable: dy/ds = field(s, y) for s from s0
    to s1, with the state y = scale * z at either end (scale 1 except for the scaled state of
    sigma and log_sigma, where a density of y is one of z times scale^-D)."""

    field: Callable
    s0: jax.Array | float
    s1: jax.Array | float
    scale0: jax.Array | float  # y = scale0 * z at s0
    scale1: jax.Array | float  # y = scale1 * z at s1


# t and log_snr integrate z itself; sigma and log_sigma the scaled state z / alpha.
TIMES = ("t", "log_snr", "sigma", "log_sigma")


def check_options(o: dict, prefix: str) -> None:
    """Raises ValueError naming a bad ODE solver option, `prefix.key=value` (prefix: eval.ode or
    sample.ode), for the keys o has. Registered as the ode sampler's and estimator's
    validators, so a bad value is one message before anything is compiled."""
    for key, allowed in (("solver", tuple(SOLVERS)), ("time", TIMES)):
        if key in o and o[key] not in allowed:
            raise ValueError(f"{prefix}.{key}={o[key]!r}: use one of {', '.join(allowed)}.")
    for key in ("rtol", "atol"):
        if key in o and not o[key] > 0:
            raise ValueError(f"{prefix}.{key}={o[key]!r}: a tolerance must be > 0.")
    # diffrax's PID controller: a zero or negative integral part never settles on a step size.
    if "icoeff" in o and not (o["pcoeff"] >= 0 and o["icoeff"] > 0):
        raise ValueError(
            f"{prefix}.pcoeff={o['pcoeff']!r}, icoeff={o['icoeff']!r}: use pcoeff >= 0 and "
            "icoeff > 0 (0, 1: the integral controller; 0.3, 0.4: a PI controller)."
        )
    for key in ("steps", "max_steps"):
        if key in o and not o[key] >= 1:
            raise ValueError(f"{prefix}.{key}={o[key]!r}: must be >= 1.")


def time_change(model: EpsModel, time: str, t0, t1) -> OdeTime:
    """The PF-ODE from t0 to t1 in time variable `time` (one of TIMES)."""
    if time == "t":
        return OdeTime(lambda s, z: drift(model, s, z), t0, t1, 1.0, 1.0)
    g0, g1 = model.gamma(t0), model.gamma(t1)
    if time == "log_snr":
        return OdeTime(lambda s, z: log_snr_drift(model, s, z), g0, g1, 1.0, 1.0)
    if time in ("sigma", "log_sigma"):
        log_time = time == "log_sigma"
        s0, s1 = (0.5 * g0, 0.5 * g1) if log_time else (jnp.exp(0.5 * g0), jnp.exp(0.5 * g1))
        field = lambda s, x: ve_drift(model, s, x, log_time)  # noqa: E731
        return OdeTime(field, s0, s1, 1.0 / alpha_sigma(g0)[0], 1.0 / alpha_sigma(g1)[0])
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


def block_max_rms(blocks) -> jax.Array:
    """The worst of batch_max_rms over blocks (a tuple of pytrees): every block meets the
    tolerance on its own, so a one-number block (a log-density) is not averaged away by the
    thousands of entries of the state beside it."""
    return functools.reduce(jnp.maximum, [batch_max_rms(b) for b in blocks])


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
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    args=None,
    control: Callable | None = None,
):
    """Solves dy/dt = vector_field(t, y, args) from t0 to t1 (either direction) with diffrax.

    Args:
      vector_field: (t, y, args) -> dy/dt for a pytree y of [B, ...] leaves.
      y0: initial state.
      t0, t1: start and end times.
      solver: euler|heun (fixed uniform grid of `steps` steps) or bosh3|tsit5|dopri5|dopri8
        (adaptive, PID controller with rtol/atol, global norm `batch_max_rms`, first step
        (t1 - t0) / steps).
      steps: fixed step count, or the adaptive solvers' first step.
      rtol, atol: adaptive tolerances.
      pcoeff, icoeff: the step-size controller's proportional and integral coefficients
        (diffrax.PIDController; 0, 1 is the classic integral controller). A PI controller
        (e.g. 0.3, 0.4) reacts less to one noisy error estimate (Tsit5 at 1e-5 on the digits
        model: 88 steps instead of 94, and a closer likelihood).
      max_steps: adaptive step budget.
      args: arrays the vector field needs (passed, not closed over, so that they share the
        solve's sharding mode).
      control: y -> a tuple of the blocks of the state whose errors the adaptive controller
        bounds, each block on its own (`block_max_rms`); default all of y as one block. See the
        module docstring for why accumulators are left out unless asked for.

    Returns:
      (y at t1, number of solver steps taken incl. rejected ones). A solve that fails (step
      budget exhausted) gives NaN states rather than raising: raising would need a host
      callback inside the sharded program.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {solver!r}; choose one of {sorted(SOLVERS)}.")
    adaptive = solver in ADAPTIVE
    import diffrax  # noqa: PLC0415 - deferred: see SOLVERS

    def solve(y0, args, t0, t1):
        # Everything array-valued is built in here, so it lives in solve's sharding mode; the
        # times come in as arguments too (in log-SNR time they are arrays: gamma of t0, t1).
        if adaptive:
            norm = batch_max_rms if control is None else lambda err: block_max_rms(control(err))
            controller = diffrax.PIDController(
                rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff, norm=norm
            )
            dt0, budget = (t1 - t0) / steps, max_steps
        else:
            controller = diffrax.StepTo(ts=jnp.linspace(t0, t1, steps + 1))
            dt0, budget = None, steps
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            getattr(diffrax, SOLVERS[solver])(),
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
    integrating in any of TIMES (fixed grids are then uniform in that variable).

    Returns:
      (z at t1, solver steps).
    """
    ode = time_change(model, time, t0, t1)

    def velocity(s, y, args):
        return constrain(ode.field(s, y), batch_sharding)

    y1, steps = integrate(velocity, ode.scale0 * z, ode.s0, ode.s1, **solver_options)
    return y1 / ode.scale1, steps


@SAMPLERS.register("ode", validate=lambda o: check_options(o, "sample.ode"))
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
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    t_eps: float = 0.0,
    time: str = "t",
    batch_sharding=None,
):
    """PF-ODE sampling from z_1 ~ N(0, I) down to t_eps (0: VDM's finite gamma_min needs no
    cut-off), integrated in any of TIMES (t, log_snr, or EDM's sigma / log_sigma with the
    state z / alpha); returns z at t_eps."""
    z1 = normal(key, shape, batch_sharding)
    z, _ = flow(
        model, z1, 1.0, t_eps, batch_sharding=batch_sharding, time=time, solver=solver,
        steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, pcoeff=pcoeff, icoeff=icoeff,
    )  # fmt: skip
    return z
