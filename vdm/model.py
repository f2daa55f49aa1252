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

from vdm.core import losses, schedules
from vdm.core.schedules import Schedule
from vdm.sampling import samplers

# Classifier-free guidance training: how often a label is replaced by the null label.
LABEL_DROP_RATE = 0.1


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
    """

    type: str = "elbo"
    weighting: str = "none"
    weighting_options: dict = dataclasses.field(default_factory=dict)
    timesteps: int = 0
    antithetic: bool = True
    schedule_grad: str = "elbo"

    def __post_init__(self):
        # Fails when a run is assembled, not when the first train step is traced.
        losses.check_objective(
            self.type, self.weighting, self.weighting_options, self.timesteps, self.schedule_grad
        )


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to draw samples: a registered sampler, its options, and guidance.

    Attributes:
      sampler: a vdm.sampling SAMPLERS name.
      steps: grid steps (or the ODE's first step 1/steps).
      options: the sampler's own options (validated against its registration).
      guidance: classifier-free guidance weight w (0: unconditional, 1: conditional).
      label: class to sample for conditional models (-1: cycle over classes).
      num: number of samples.
    """

    sampler: str = "ancestral"
    steps: int = 1000
    options: dict = dataclasses.field(default_factory=dict)
    guidance: float = 0.0
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

    def loss_terms(self, params, batch, key, *, train: bool):
        """losses.loss_terms for a batch with this model's objective.

        Args:
          params: {'model', 'schedule'} parameters.
          batch: dict with 'x' (and 'label'/'aug').
          key: PRNG key; split into dropout, label-drop and loss keys.
          train: training mode (dropout, label dropping, the objective's loss type and
            antithetic times); otherwise the plain ELBO with a deterministic network and
            independent uniform times.

        Returns:
          The dict of per-example terms from losses.loss_terms.
        """
        k_drop, k_label, k_loss = jax.random.split(key, 3)
        o = self.objective
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
        )

    def endpoints(self, params):
        """(gamma_0, gamma_1) of the schedule under `params`."""
        return schedules.endpoints(self.schedule, params["schedule"])

    def sample(self, params, key, spec: SamplerSpec, *, batch_sharding=None):
        """Draws spec.num samples with spec's sampler, steps, options and guidance.

        Returns:
          [num, *shape] samples (int32 for discrete data), as a JAX array.
        """
        num = spec.num
        cond = null_cond = None
        if self.num_classes:
            labels = (
                jnp.arange(num) % self.num_classes
                if spec.label < 0
                else jnp.full((num,), spec.label)
            )
            cond = {"label": labels.astype(jnp.int32)}
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
        """(t, gamma(t)) on a uniform grid, for the schedule plot."""
        t = jnp.linspace(0.0, 1.0, n)
        return t, self.schedule.gamma(params["schedule"], t)
