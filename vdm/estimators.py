"""Likelihood estimators of a DiffusionModel, registered for `--mode=eval` (`eval.estimator`).

Each estimator maps (model, params, batch, key) to per-example bits/dim (and its other terms);
vdm/run/evaluate.py runs it over the whole eval split and reports the mean with its standard
error. Options are the keyword parameters (`config.eval.<estimator>.*`):

  elbo  VDM's variational bound: diffusion + prior + reconstruction, one (t, eps) draw per
        call (eval.num_draws averages several), in bits per sub-pixel of the data's own
        vocabulary; its times uniform or importance-sampled (eval.elbo.proposal).
  ode   the probability-flow ODE likelihood (vdm.sampling.likelihood.ode_nll) with its
        dequantisation (decoder: VDM's one-latent bound; uniform: Song et al.'s; none:
        continuous data), trace estimator and solver.
"""

import math

from vdm.registry import Registry
from vdm.sampling import likelihood

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
    probs = model.time_probs(params, time_hist, proposal)
    if proposal == "adaptive" and time_hist is None:
        raise ValueError("eval.elbo.proposal='adaptive' needs the checkpoint's time histogram.")
    terms = model.loss_terms(params, batch, key, train=False, time_probs=probs)
    to_bpd = 1.0 / (model.num_dims * math.log(2.0))
    return {"bpd": terms["bpd"], **{f"{n}_bpd": terms[n] * to_bpd for n in ELBO_TERMS}}


@ESTIMATORS.register("ode")
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
    steps: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t_eps: float = 0.0,
):
    """The PF-ODE negative log-likelihood in bits/dim (see vdm.sampling.likelihood.ode_nll)."""
    out = likelihood.ode_nll(
        model.denoiser(params["model"]),
        model.schedule,
        params["schedule"],
        batch["x"],
        key,
        vocab_size=model.vocab_size,
        dequantization=dequantization,
        t_eps=t_eps,
        parameterization=model.parameterization,
        cond=model.cond(batch),
        trace=trace,
        num_probes=num_probes,
        probe=probe,
        solver=solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        batch_sharding=batch_sharding,
    )
    return {"bpd": out["bpd"], "nll": out["nll"], "num_steps": out["num_steps"]}
