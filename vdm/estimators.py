"""Likelihood estimators of a DiffusionModel, registered for `--mode=eval` (`eval.estimator`).

Each estimator maps (model, params, batch, key) to per-example bits/dim (and its other terms);
vdm/run/evaluate.py runs it over the whole eval split and reports the mean with its standard
error. Options are the keyword parameters (`config.eval.<estimator>.*`):

  elbo  VDM's variational bound: diffusion + prior + reconstruction, one (t, eps) draw per
        call (eval.num_draws averages several), in bits per sub-pixel of the data's own
        vocabulary; its times uniform or importance-sampled (eval.elbo.proposal).
  ode   the probability-flow ODE likelihood (vdm.sampling.likelihood.ode_nll) with its
        dequantisation, trace estimator and solver, and K = num_samples importance-weighted
        draws per example; it returns the terms prior_bpd + divergence_bpd +
        dequantization_bpd + jacobian_bpd + importance_bpd = bpd. Its accounting, one line
        per dequantisation (`accounting` returns the line for a run's data):
          decoder           bits per integer sub-pixel, VDM's one-latent decoder bound
                            -log p(x|z_0) - log p_ODE(z_0) + log q(z_0|x).
          uniform           bits per integer sub-pixel, uniform dequantisation, [-1, 1]
                            density converted with D log(V/2) (Song et al. 2021).
          truncated_normal  bits per integer sub-pixel, truncated-normal dequantisation
                            (i-DODE), eps in the box |eps| <= alpha/(sigma V) that keeps
                            z/alpha in x's bin, -log p_ODE(z) - D log alpha + log q(z/alpha|x).
          none              bits per dimension of continuous data's own density.
"""

import math

from vdm.registry import Registry
from vdm.sampling import dequantization as dequantization_lib
from vdm.sampling import likelihood
from vdm.sampling import ode as ode_lib

# The ELBO's terms, reported as '<term>_bpd'.
ELBO_TERMS = ("diffusion", "prior", "recon")

ESTIMATORS = Registry(
    "estimator", context=("model", "params", "batch", "key", "batch_sharding", "time_hist")
)


@ESTIMATORS.register("elbo")
def elbo(model, params, batch, key, time_hist=None, *, proposal: str = "uniform"):
    """The negative ELBO in bits/dim, with its diffusion/prior/reconstruction terms in bits/dim
    (they add up to 'bpd').

    Args:
      model, params, batch, key: the model, its parameters, a batch, the draw's key.
      time_hist: the checkpoint's per-t loss histogram (TrainState.time_hist), for
        proposal='adaptive'.
      proposal: uniform|schedule|adaptive: how the diffusion term's times are drawn
        (vdm/core/time_proposals.py, with loss.time's bins and floor). Every proposal has the
        same expectation; a good one has a smaller standard error.
    """
    if proposal == "adaptive" and time_hist is None:
        raise ValueError("eval.elbo.proposal='adaptive' needs the checkpoint's time histogram.")
    probs = model.time_probs(params, time_hist, proposal)
    terms = model.loss_terms(params, batch, key, train=False, time_probs=probs)
    to_bpd = 1.0 / (model.num_dims * math.log(2.0))
    return {"bpd": terms["bpd"], **{f"{n}_bpd": terms[n] * to_bpd for n in ELBO_TERMS}}


def _check_ode_options(o: dict) -> None:
    """Raises ValueError naming a bad `eval.ode.*` value (the registry runs it where the config
    becomes a run, so a bad value is one CLI message before anything is restored or compiled,
    not a traceback from inside the first evaluation)."""
    ode_lib.check_options(o, "eval.ode")  # solver, time, tolerances, controller, step counts
    for key, allowed in (("trace", likelihood.TRACES), ("probe", likelihood.PROBES)):
        if o[key] not in allowed:
            raise ValueError(f"eval.ode.{key}={o[key]!r}: use one of {', '.join(allowed)}.")
    if not o["density_tol"] >= 0:
        raise ValueError(
            f"eval.ode.density_tol={o['density_tol']!r}: use bits/dim > 0, or 0 to bound the "
            "error of z alone."
        )
    for key in ("num_probes", "num_samples"):
        if not o[key] >= 1:
            raise ValueError(f"eval.ode.{key}={o[key]!r}: must be >= 1.")


@ESTIMATORS.register("ode", validate=_check_ode_options)
def ode(
    model,
    params,
    batch,
    key,
    batch_sharding=None,
    *,
    dequantization: str = "decoder",
    trace: str = "hutchinson",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "tsit5",
    time: str = "t",
    steps: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    density_tol: float = 0.0,
    max_steps: int = 4096,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    t_eps: float = 0.0,
    num_samples: int = 1,
):
    """The PF-ODE negative log-likelihood in bits/dim (see vdm.sampling.likelihood.ode_nll).

    Returns:
      Per example [B]: 'bpd', 'nll' (nats) and the bits/dim terms that add up to 'bpd' (TERMS);
      the scalar 'num_steps'.
    """
    out = likelihood.ode_nll(
        model.denoiser(params["model"]),
        model.schedule,
        params["schedule"],
        batch["x"],
        key,
        vocab_size=model.vocab_size,
        dequantization=dequantization,
        t_eps=t_eps,
        num_samples=num_samples,
        parameterization=model.parameterization,
        cond=model.cond(batch),
        trace=trace,
        num_probes=num_probes,
        probe=probe,
        solver=solver,
        time=time,
        steps=steps,
        rtol=rtol,
        atol=atol,
        density_tol=density_tol,
        max_steps=max_steps,
        pcoeff=pcoeff,
        icoeff=icoeff,
        batch_sharding=batch_sharding,
    )
    return {name: out[name] for name in ("bpd", "nll", "num_steps") + TERMS}


# The ode estimator's per-example bits/dim terms, which add up to its 'bpd'.
TERMS = ("prior_bpd", "divergence_bpd", "dequantization_bpd", "jacobian_bpd", "importance_bpd")


def accounting(dequantization: str, vocab_size: int | None, num_samples: int = 1) -> str:
    """One line stating what the ode estimator's bits/dim measures, for an eval record.

    Args:
      dequantization: decoder|uniform|truncated_normal|none.
      vocab_size: V of discrete data (256 for 8-bit images), or None for continuous data.
      num_samples: K importance-weighted draws per example.

    Returns:
      e.g. 'bits per 8-bit sub-pixel (V=256), uniform dequantisation, [-1, 1] density
      converted with D log(V/2), Jensen bound (K=1)'.
    """
    dequantization_lib.check(dequantization, vocab_size, num_samples)
    if vocab_size is None:
        return "bits per dimension of the continuous data's own density (no dequantisation)"
    bits = math.log2(vocab_size)
    unit = f"{int(bits)}-bit" if bits == int(bits) else f"{vocab_size}-valued"
    unit = f"bits per {unit} sub-pixel (V={vocab_size})"
    weighting = f"importance-weighted over K={num_samples} draws" if num_samples > 1 else "K=1"
    if dequantization == "decoder":
        what = ("decoder dequantisation, VDM's one-latent bound -log p(x|z_0) - log p_ODE(z_0)"
                " + log q(z_0|x) with the softmax decoder")  # fmt: skip
    elif dequantization == "uniform":
        what = "uniform dequantisation, [-1, 1] density converted with D log(V/2), Jensen bound"
    else:
        what = (
            "truncated-normal dequantisation (i-DODE), eps in |eps| <= alpha/(sigma V) so "
            "z/alpha stays in x's bin, [-1, 1] density in integer units via log q(z/alpha|x)"
        )
    return f"{unit}, {what} ({weighting})"
