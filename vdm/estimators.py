"""Likelihood estimators of a DiffusionModel, registered for `--mode=eval` (`eval.estimator`).

Each estimator maps (model, params, batch, key) to per-example bits/dim (and its other terms);
vdm/run/evaluate.py runs it over the whole eval split and reports the mean with its standard
error. Options are the keyword parameters (`config.eval.<estimator>.*`):

  elbo  VDM's variational bound: diffusion + prior + reconstruction, one (t, eps) draw per
        call (eval.num_draws averages several), in bits per sub-pixel of the data's own
        vocabulary.
  ode   the probability-flow ODE likelihood (vdm.sampling.likelihood.ode_nll) with its
        dequantisation (decoder: VDM's one-latent bound; uniform: Song et al.'s; none:
        continuous data), trace estimator and solver.
"""

import math

from vdm.registry import Registry
from vdm.sampling import likelihood

# The ELBO's terms, reported as '<term>_bpd'.
ELBO_TERMS = ("diffusion", "prior", "recon")

ESTIMATORS = Registry("estimator", context=("model", "params", "batch", "key", "batch_sharding"))


@ESTIMATORS.register("elbo")
def elbo(model, params, batch, key):
    """The negative ELBO in bits/dim, with its diffusion/prior/reconstruction terms in bits/dim
    (they add up to 'bpd')."""
    terms = model.loss_terms(params, batch, key, train=False)
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
