"""The diffusion model as one object: score network + noise schedule + parameterisation +
objective. Pure: no mesh, no data pipeline, no config, no files.

Parameters are a dict {'model': network params, 'schedule': noise-schedule params}, so the
optimiser, EMA and checkpoints treat the learned schedule like any other weight. vdm/run/setup.py
builds a DiffusionModel from a config; tests and notebooks can build one directly.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm import runtime
from vdm.core import losses, schedules, time_proposals
from vdm.core.schedules import Schedule
from vdm.sampling import samplers

runtime.unroll_threefry()  # same bits, faster on CPU (VDM_THREEFRY_UNROLLED=0: jax's own)

# Classifier-free guidance training: how often a label is replaced by the null label.
LABEL_DROP_RATE = 0.1

# Samplers that work elementwise with a multivariate schedule (gamma per element).
MULTIVARIATE_SAMPLERS = ("ancestral",)


def check_multivariate(schedule: Schedule, shape: tuple, objective) -> None:
    """Raises ValueError if a multivariate schedule does not fit the data or the objective."""
    if tuple(schedule.event_shape) != tuple(shape):
        raise ValueError(
            f"The multivariate schedule is shaped {tuple(schedule.event_shape)} but the data "
            f"are {tuple(shape)}."
        )
    losses.check_multivariate(objective.type, objective.schedule_grad)
    if objective.time.proposal == "schedule":
        raise ValueError(
            "loss.time.proposal='schedule' is uniform in one gamma per example; with "
            "schedule.type=multivariate use uniform|adaptive|adaptive_lambda."
        )


@dataclasses.dataclass(frozen=True)
class TimeProposal:
    """How diffusion times are drawn (vdm/core/time_proposals.py; config.loss.time).

    Attributes:
      proposal: uniform|schedule|adaptive|adaptive_lambda.
      bins: K bins of t for the proposal and the per-t loss histogram.
      floor: the share of uniform mixed into a non-uniform proposal.
      rate: EMA decay of the per-bin mean squared diffusion loss kept in the train state.
    """

    proposal: str = "uniform"
    bins: int = 32
    floor: float = 0.1
    rate: float = 0.99

    def __post_init__(self):
        time_proposals.check(self.proposal, self.bins, self.floor)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"loss.time.rate must be in [0, 1), got {self.rate}.")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the training loss is (the ELBO is always what gets reported).

    Attributes:
      type: elbo|simple|weighted (config.loss.type).
      weighting: a vdm.core.losses.WEIGHTINGS name (loss_type=weighted).
      weighting_options: that weighting's options.
      timesteps: T of the discrete-time loss; 0 for continuous time.
      antithetic: low-discrepancy times over the training batch (evaluation always draws
        independent times, so its standard error treats examples as independent rightly).
      schedule_grad: elbo|variance (the paper's variance-minimising rule; continuous time
        only). Whatever `type` is, the schedule is trained by the ELBO (or this rule).
      time: how training times are drawn (importance sampling over t).
    """

    type: str = "elbo"
    weighting: str = "none"
    weighting_options: dict = dataclasses.field(default_factory=dict)
    timesteps: int = 0
    antithetic: bool = True
    schedule_grad: str = "elbo"
    time: TimeProposal = TimeProposal()

    def __post_init__(self):
        # Fails when a run is assembled, not when the first train step is traced.
        losses.check_objective(
            self.type, self.weighting, self.weighting_options, self.timesteps, self.schedule_grad
        )
        if self.time.proposal != "uniform" and self.timesteps:
            raise ValueError(
                f"loss.time.proposal={self.time.proposal!r} needs continuous time; the "
                f"discrete-time loss (loss.timesteps={self.timesteps}) samples its grid uniformly."
            )


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to draw samples: a registered sampler, its options, and guidance.

    Attributes:
      sampler: a vdm.sampling SAMPLERS name.
      steps: grid steps (or the ODE's first step 1/steps).
      options: the sampler's own options (validated against its registration).
      guidance: classifier-free guidance weight w of eps_null + w (eps_cond - eps_null): 0 is
        unconditional, 1 conditional (the default), > 1 over-weights the label. Ho & Salimans
        (2022) write (1 + w') eps_cond - w' eps_null, so their w' = w - 1. Ignored by a model
        with num_classes = 0 (it has no labels).
      label: class to sample for conditional models (-1: cycle over classes).
      num: number of samples.
    """

    sampler: str = "ancestral"
    steps: int = 1000
    options: dict = dataclasses.field(default_factory=dict)
    guidance: float = 1.0
    label: int = -1
    num: int = 64


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionModel:
    """Network, schedule, parameterisation and objective of one VDM.

    Attributes:
      network: the flax score network (vdm.nets.build_network).
      schedule: the noise schedule.
      shape: one example's shape.
      vocab_size: integer values per sub-pixel, None for continuous data.
      parameterization: eps|x|v|score: what the network predicts.
      num_classes: classes the network is conditioned on (0 = unconditional).
      cond_aug: the network takes the augmentation flag as conditioning.
      objective: the training objective.
    """

    network: Any
    schedule: Schedule
    shape: tuple
    vocab_size: int | None
    parameterization: str = "eps"
    num_classes: int = 0
    cond_aug: bool = False
    objective: Objective = Objective()

    def __post_init__(self):
        if self.schedule.event_shape:
            check_multivariate(self.schedule, self.shape, self.objective)

    @property
    def num_dims(self) -> int:
        """Sub-pixels (or coordinates) per example: the bits/dim denominator."""
        return int(math.prod(self.shape))

    def _dummy_cond(self, n: int):
        cond = {}
        if self.num_classes:
            cond["label"] = jnp.zeros((n,), jnp.int32)
        if self.cond_aug:
            cond["aug"] = jnp.zeros((n,), jnp.float32)
        return cond or None

    def init_params(self, key) -> dict:
        """Fresh {'model', 'schedule'} parameters."""
        k_model, k_sched = jax.random.split(key)
        z = jnp.zeros((1,) + tuple(self.shape), jnp.float32)
        gamma = jnp.zeros((1,), jnp.float32)
        variables = self.network.init({"params": k_model}, z, gamma, self._dummy_cond(1))
        return {"model": variables["params"], "schedule": self.schedule.init(k_sched)}

    def cond(self, batch: dict, label_drop_key=None):
        """Conditioning dict for the network from a batch, or None when unconditional.

        Args:
          batch: dict with 'x' and optionally 'label' / 'aug'.
          label_drop_key: when given (training), each label becomes the null label
            (= num_classes) with probability LABEL_DROP_RATE, for classifier-free guidance.
        """
        cond = {}
        if self.num_classes and "label" in batch:
            label = batch["label"].astype(jnp.int32)
            if label_drop_key is not None:
                drop = jax.random.bernoulli(label_drop_key, LABEL_DROP_RATE, label.shape)
                label = jnp.where(drop, self.num_classes, label)
            cond["label"] = label
        if self.cond_aug:
            n = batch["x"].shape[0]
            cond["aug"] = batch.get("aug", jnp.zeros((n,), jnp.float32)).astype(jnp.float32)
        return cond or None

    def denoiser(self, model_params, *, train: bool = False, dropout_key=None):
        """The network as a loss_terms/sampler denoise_fn (z, gamma, cond) -> prediction."""
        rngs = {"dropout": dropout_key} if train else None

        def denoise(z, gamma, cond):
            return self.network.apply(
                {"params": model_params}, z, gamma, cond, train=train, rngs=rngs
            )

        return denoise

    def time_probs(self, params, time_hist, proposal: str):
        """The bin probabilities of a time proposal, or None for uniform times.

        Args:
          params: {'model', 'schedule'} parameters ('schedule' reads the schedule).
          time_hist: [bins] running mean squared diffusion loss per bin (the train state's).
          proposal: uniform|schedule|adaptive|adaptive_lambda (the last reads the histogram
            as the mean weighted loss, which is what training records under it).
        """
        p = self.objective.time
        if proposal == "uniform":
            return None
        if proposal == "schedule":
            gamma = lambda t: self.schedule.gamma(params["schedule"], t)
            return time_proposals.schedule_bins(gamma, p.bins, p.floor)
        if proposal == "adaptive_lambda":
            return time_proposals.weighted_loss_bins(time_hist, p.floor)
        return time_proposals.adaptive_bins(time_hist, p.floor)

    def loss_weight(self, gamma):
        """w(gamma) of the training loss (ones unless loss.type=weighted)."""
        o = self.objective
        if o.type != "weighted":
            return jnp.ones_like(gamma)
        return losses.WEIGHTINGS.build(o.weighting, o.weighting_options, gamma=gamma)

    def loss_terms(self, params, batch, key, *, train: bool, time_probs=None):
        """losses.loss_terms for a batch with this model's objective.

        Args:
          params: {'model', 'schedule'} parameters.
          batch: dict with 'x' (and 'label'/'aug').
          key: PRNG key; split into dropout, label-drop and loss keys.
          train: training mode (dropout, label dropping, the objective's loss type and
            antithetic times); otherwise the plain ELBO with a deterministic network and
            independent uniform times.
          time_probs: optional [bins] proposal over t (`time_probs`); the diffusion term is
            then importance-weighted, its expectation unchanged.

        Returns:
          The dict of per-example terms from losses.loss_terms.
        """
        k_drop, k_label, k_loss = jax.random.split(key, 3)
        o = self.objective
        t = weight = None
        if time_probs is not None:
            u = losses.sample_times(jax.random.fold_in(k_loss, 1), batch["x"].shape[0],
                                    o.antithetic and train)  # fmt: skip
            t, weight = time_proposals.sample(time_probs, u)
        return losses.loss_terms(
            self.denoiser(params["model"], train=train, dropout_key=k_drop),
            self.schedule,
            params["schedule"],
            batch["x"],
            k_loss,
            vocab_size=self.vocab_size,
            cond=self.cond(batch, k_label if train else None),
            parameterization=self.parameterization,
            timesteps=o.timesteps,
            # Antithetic times correlate the examples of a batch: fine for a training
            # gradient, wrong for an evaluation whose standard error assumes independence.
            antithetic=o.antithetic and train,
            loss_type=o.type if train else "elbo",
            weighting=o.weighting,
            weighting_options=o.weighting_options,
            schedule_grad=o.schedule_grad if train else "elbo",
            t=t,
            time_weight=weight,
        )

    def endpoints(self, params):
        """(gamma_0, gamma_1) of the schedule under `params` (for a multivariate schedule the
        means over the elements, the figures the logs report)."""
        g0, g1 = schedules.endpoints(self.schedule, params["schedule"])
        return jnp.mean(g0), jnp.mean(g1)

    def sample_labels(self, spec: SamplerSpec) -> np.ndarray | None:
        """The class each of spec.num samples is drawn for (int32 [num]); None when the model
        is unconditional. Cycles over the classes unless spec.label fixes one."""
        if not self.num_classes:
            return None
        if spec.label < 0:
            return (np.arange(spec.num) % self.num_classes).astype(np.int32)
        return np.full((spec.num,), spec.label, np.int32)

    def sample(self, params, key, spec: SamplerSpec, *, batch_sharding=None):
        """Draws spec.num samples with spec's sampler, steps, options and guidance.

        Returns:
          [num, *shape] samples (int32 for discrete data), as a JAX array.
        """
        num = spec.num
        cond = null_cond = None
        if self.num_classes:
            cond = {"label": jnp.asarray(self.sample_labels(spec))}
            null_cond = {"label": jnp.full((num,), self.num_classes, jnp.int32)}
        if self.cond_aug:
            zeros = jnp.zeros((num,), jnp.float32)  # samples from the un-augmented model
            cond = dict(cond or {}, aug=zeros)
            null_cond = dict(null_cond, aug=zeros) if null_cond else None
        extra = {"batch_sharding": batch_sharding} if batch_sharding is not None else {}
        return samplers.sample(
            spec.sampler,
            self.denoiser(params["model"]),
            self.schedule,
            params["schedule"],
            key,
            (num,) + tuple(self.shape),
            vocab_size=self.vocab_size,
            steps=spec.steps,
            parameterization=self.parameterization,
            cond=cond,
            guidance=spec.guidance,
            null_cond=null_cond,
            **spec.options,
            **extra,
        )

    def schedule_curve(self, params, n: int = 201):
        """(t, gamma(t)) on a uniform grid, for the schedule plot (a multivariate schedule's
        mean over the elements, the gamma its network is conditioned on)."""
        t = jnp.linspace(0.0, 1.0, n)
        return t, schedules.network_gamma(self.schedule.gamma(params["schedule"], t))

    def check_sampler(self, spec: SamplerSpec) -> None:
        """Raises ValueError if spec's sampler cannot run with this model's schedule."""
        if self.schedule.event_shape and spec.sampler not in MULTIVARIATE_SAMPLERS:
            raise ValueError(
                f"sample.sampler={spec.sampler!r} needs a scalar gamma per example; with "
                f"schedule.type=multivariate use sample.sampler="
                f"{'|'.join(MULTIVARIATE_SAMPLERS)}."
            )
