"""One experiment's pieces built from its config: data info, network, schedule, losses,
evaluation and sampling, shared by training (vdm/train.py) and the eval/sample modes.

Parameters are a dict {'model': network params, 'schedule': noise-schedule params}, so the
optimiser, EMA and checkpoints treat the learned schedule like any other weight.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdm import data, likelihood, losses, nets, samplers, schedules, sharding
from vdm.schedules import Schedule

# Classifier-free guidance training: how often a label is replaced by the null label.
LABEL_DROP_RATE = 0.1


@dataclasses.dataclass
class Experiment:
    """The config-dependent, parameter-free parts of a run.

    Attributes:
      config: the full (locked) ConfigDict.
      info: the dataset's DatasetInfo (shape, vocab_size, ...).
      model: the flax score network.
      schedule: the noise schedule.
      mesh: the device mesh.
    """

    config: Any
    info: Any
    model: Any
    schedule: Schedule
    mesh: jax.sharding.Mesh

    @classmethod
    def build(cls, config) -> "Experiment":
        """Builds the experiment for `config` on all visible devices."""
        info = data.get_info(config.data)
        if config.model.num_classes > 0 and config.model.num_classes != info.num_classes:
            raise ValueError(
                f"model.num_classes={config.model.num_classes} but data.name="
                f"{config.data.name!r} has {info.num_classes} classes (0: unlabelled); set "
                f"model.num_classes to {info.num_classes} or 0."
            )
        model = nets.build_model(
            config.model,
            gamma_min=config.schedule.gamma_min,
            gamma_max=config.schedule.gamma_max,
        )
        schedule = schedules.get_schedule(config.schedule)
        mesh = sharding.make_mesh(config.train.fsdp)
        return cls(config, info, model, schedule, mesh)

    @property
    def num_dims(self) -> int:
        """Sub-pixels (or coordinates) per example: the bits/dim denominator."""
        return int(math.prod(self.info.shape))

    @property
    def num_classes(self) -> int:
        """Classes the network is conditioned on (0 = unconditional)."""
        return max(int(self.config.model.num_classes), 0)

    def root_key(self, purpose: int) -> jax.Array:
        """Independent key streams from the seed: 0 init, 1 train, 2 eval, 3 sample."""
        return jax.random.fold_in(jax.random.key(self.config.seed), purpose)

    def _dummy_cond(self, n: int):
        cond = {}
        if self.num_classes:
            cond["label"] = jnp.zeros((n,), jnp.int32)
        if self.config.model.cond_aug:
            cond["aug"] = jnp.zeros((n,), jnp.float32)
        return cond or None

    def init_params(self, key) -> dict:
        """Fresh {'model', 'schedule'} parameters."""
        k_model, k_sched = jax.random.split(key)
        z = jnp.zeros((1,) + tuple(self.info.shape), jnp.float32)
        gamma = jnp.zeros((1,), jnp.float32)
        variables = self.model.init({"params": k_model}, z, gamma, self._dummy_cond(1))
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
        if self.config.model.cond_aug:
            n = batch["x"].shape[0]
            cond["aug"] = batch.get("aug", jnp.zeros((n,), jnp.float32)).astype(jnp.float32)
        return cond or None

    def denoiser(self, model_params, *, train: bool = False, dropout_key=None):
        """The network as a loss_terms/sampler denoise_fn (z, gamma, cond) -> prediction."""
        rngs = {"dropout": dropout_key} if train else None

        def denoise(z, gamma, cond):
            return self.model.apply(
                {"params": model_params}, z, gamma, cond, train=train, rngs=rngs
            )

        return denoise

    def loss_terms(self, params, batch, key, *, train: bool):
        """losses.loss_terms for a batch with this config's objective.

        Args:
          params: {'model', 'schedule'} parameters.
          batch: dict with 'x' (and 'label'/'aug').
          key: PRNG key; split into dropout, label-drop and loss keys.
          train: training mode (dropout, label dropping, configured loss type);
            otherwise the plain ELBO with deterministic network.

        Returns:
          The dict of per-example terms from losses.loss_terms.
        """
        k_drop, k_label, k_loss = jax.random.split(key, 3)
        c = self.config
        return losses.loss_terms(
            self.denoiser(params["model"], train=train, dropout_key=k_drop),
            self.schedule,
            params["schedule"],
            batch["x"],
            k_loss,
            vocab_size=self.info.vocab_size,
            cond=self.cond(batch, k_label if train else None),
            parameterization=c.model.parameterization,
            timesteps=c.loss.timesteps,
            antithetic=c.loss.antithetic,
            loss_type=c.loss.type if train else "elbo",
            weighting=c.loss.weighting,
            schedule_grad=c.schedule.grad if train else "elbo",
        )

    def endpoints(self, params):
        """(gamma_0, gamma_1) of the schedule under `params`."""
        return schedules.endpoints(self.schedule, params["schedule"])

    @functools.cached_property
    def _eval_terms(self):
        # One jitted function per experiment, so periodic evals compile once.
        return jax.jit(lambda p, b, k: self.loss_terms(p, b, k, train=False))

    def evaluate(self, params, *, max_examples: int | None = None) -> dict:
        """Full-split ELBO in bits/dim (with breakdown) and the schedule endpoints.

        Args:
          params: the parameters to evaluate (EMA ones, normally).
          max_examples: cap on examples; None = config.eval.max_examples (-1 = all).

        Returns:
          Dict of floats named 'eval/...'.
        """
        c = self.config
        terms = self._eval_terms
        per_process = max(c.data.eval_batch_size // jax.process_count(), 1)
        batches = (
            sharding.global_batch(b, self.mesh)
            for b in data.eval_batches(
                c.data,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                batch_size=per_process,
                max_examples=c.eval.max_examples if max_examples is None else max_examples,
            )
        )
        result = likelihood.evaluate_elbo(
            lambda b, k: terms(params, b, k),
            batches,
            key=self.root_key(2),
            num_draws=c.eval.num_draws,
        )
        out = {}
        for name, value in result.items():
            if np.ndim(value) == 0:
                out[f"eval/{name}"] = float(np.asarray(value))
        g0, g1 = self.endpoints(params)
        out["eval/gamma_0"], out["eval/gamma_1"] = float(g0), float(g1)
        if self.info.log_prob is not None:
            out["eval/true_bpd"] = self.true_bpd(max_examples)
            out["eval/bpd_gap"] = out["eval/bpd"] - out["eval/true_bpd"]
        return out

    def true_bpd(self, max_examples: int | None = None) -> float:
        """The data distribution's own NLL of the eval split in bits/dim (known densities)."""
        cap = self.config.eval.max_examples if max_examples is None else max_examples
        x = [
            b["x"][b["mask"] > 0]
            for b in data.eval_batches(self.config.data, batch_size=1024, max_examples=cap)
        ]
        nll = -self.info.log_prob(np.concatenate(x))
        return float(np.mean(nll) / (self.num_dims * np.log(2.0)))

    def sample(self, params, *, num: int | None = None, key=None) -> np.ndarray:
        """Draws samples with config.sample's sampler, steps and guidance.

        Returns:
          numpy samples [num, *shape] (int32 for discrete data).
        """
        s = self.config.sample
        num = s.num if num is None else num
        key = self.root_key(3) if key is None else key
        cond = null_cond = None
        if self.num_classes:
            labels = np.arange(num) % self.num_classes if s.label < 0 else np.full(num, s.label)
            cond = {"label": jnp.asarray(labels, jnp.int32)}
            null_cond = {"label": jnp.full((num,), self.num_classes, jnp.int32)}
        if self.config.model.cond_aug:
            zeros = jnp.zeros((num,), jnp.float32)  # samples from the un-augmented model
            cond = dict(cond or {}, aug=zeros)
            null_cond = dict(null_cond, aug=zeros) if null_cond else None
        options = {"eta": s.eta} if s.sampler == "ddim" else {}

        def run(p, k):
            return samplers.sample(
                s.sampler,
                self.denoiser(p["model"]),
                self.schedule,
                p["schedule"],
                k,
                (num,) + tuple(self.info.shape),
                vocab_size=self.info.vocab_size,
                steps=s.steps,
                parameterization=self.config.model.parameterization,
                cond=cond,
                guidance=s.guidance,
                null_cond=null_cond,
                **options,
            )

        out = jax.jit(run, out_shardings=sharding.replicated(self.mesh))(params, key)
        return np.asarray(jax.device_get(out))

    def schedule_curve(self, params, n: int = 201):
        """(t, gamma(t)) on a uniform grid, for the schedule plot."""
        t = jnp.linspace(0.0, 1.0, n)
        return np.asarray(t), np.asarray(self.schedule.gamma(params["schedule"], t))
