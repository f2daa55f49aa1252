"""The one place a config becomes a run: `build_run(config) -> Run`.

Every entry point (train, eval, sample, the benchmarks, the tests) calls `build_run`, which
reads the config once and builds the dataset, the model (network + schedule + objective),
the optimiser, the mesh, the state's shardings, the sampler settings and the key streams.
Parts chosen by name come from their registries through `build_part`: the selected part's
sub-dict is passed as its options and the concept's shared keys as context, so no config key
is mapped to an argument by hand here or anywhere else.
"""

import dataclasses
import enum
import inspect
from typing import Any

import jax
import ml_collections
import optax

from vdm import data, nets, optim, parallel
from vdm.core import schedules
from vdm.estimators import ESTIMATORS
from vdm.metrics.features import FEATURES
from vdm.model import DiffusionModel, Objective, SamplerSpec, TimeProposal
from vdm.registry import Registry
from vdm.run.checkpoint import Checkpoints
from vdm.run.state import TrainState, create_state
from vdm.run.step import compile_steps, make_train_step
from vdm.sampling.registries import SAMPLERS


class KeyStream(enum.IntEnum):
    """Independent key streams derived from the seed (the numbers are part of the results)."""

    INIT = 0
    TRAIN = 1
    EVAL = 2
    SAMPLE = 3


def root_key(seed: int, stream: KeyStream) -> jax.Array:
    """The key of one stream: fold_in(key(seed), stream)."""
    return jax.random.fold_in(jax.random.key(seed), int(stream))


def part_options(node: ml_collections.ConfigDict, name: str) -> dict:
    """The options sub-dict `node.<name>` as a plain dict ({} when the part has none)."""
    sub = node.get(name) if name in node else None
    return sub.to_dict() if isinstance(sub, ml_collections.ConfigDict) else {}


def shared_keys(node: ml_collections.ConfigDict, *exclude: str) -> dict:
    """The node's plain (non-sub-dict) keys and values, less `exclude`."""
    return {
        k: v
        for k, v in node.items()
        if k not in exclude and not isinstance(v, ml_collections.ConfigDict)
    }


def call_with(fn, node: ml_collections.ConfigDict, **extra):
    """Calls fn with the node's shared keys that its signature names, plus `extra`.

    This is how a config node reaches a function or dataclass: by matching names, so a new
    keyword on the function is settable from the config by adding the key to the schema.
    """
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in shared_keys(node).items() if k in params and k not in extra}
    return fn(**kwargs, **extra)


def build_part(registry: Registry, node: ml_collections.ConfigDict, selector: str, **extra):
    """Builds the part that `node.<selector>` names from its registry.

    Args:
      registry: the concept's registry.
      node: the concept's config node (e.g. config.data).
      selector: the key holding the part's name (e.g. 'name', 'type').
      **extra: further context arguments.

    Returns:
      registry.build(name, node.<part>, **shared keys of node, **extra); shared keys reach the
      part only when its signature names them. The part of 'part:argument' (e.g. data.name
      'tfds:celeb_a') takes its options from node.<part> (config.data.tfds).
    """
    name = node[selector]
    shared = shared_keys(node, selector)
    return registry.build(name, part_options(node, registry.part_name(name)), **shared, **extra)


def build_dataset(data_config: ml_collections.ConfigDict) -> data.Dataset:
    """The Dataset that config.data selects."""
    return build_part(data.DATASETS, data_config, "name")


def build_diffusion_model(
    config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> DiffusionModel:
    """The DiffusionModel of a config for data described by `info`."""
    m, s, loss = config.model, config.schedule, config.loss
    if m.num_classes > 0 and m.num_classes != info.num_classes:
        raise ValueError(
            f"model.num_classes={m.num_classes} but data.name={info.name!r} has "
            f"{info.num_classes} classes (0: unlabelled); set model.num_classes to "
            f"{info.num_classes} or 0."
        )
    objective = call_with(
        Objective,
        loss,
        weighting_options=part_options(loss, loss.weighting),
        schedule_grad=s.grad,
        time=TimeProposal(**loss.time),
    )
    return call_with(
        DiffusionModel,
        m,
        network=nets.build_network(m, gamma_min=s.gamma_min, gamma_max=s.gamma_max),
        schedule=build_part(schedules.SCHEDULES, s, "type", data_shape=tuple(info.shape)),
        shape=tuple(info.shape),
        vocab_size=info.vocab_size,
        objective=objective,
    )


def sampler_spec(sample_config: ml_collections.ConfigDict) -> SamplerSpec:
    """The SamplerSpec of config.sample (the selected sampler's sub-dict as its options).

    The sampler and its options are checked here, so a wrong name fails when the run is
    assembled, not when training ends and the sample grid is drawn.
    """
    spec = call_with(
        SamplerSpec, sample_config, options=part_options(sample_config, sample_config.sampler)
    )
    SAMPLERS.check(spec.sampler, spec.options)
    return spec


def check_sample_metrics(metrics_config: ml_collections.ConfigDict) -> None:
    """Fails when the run is assembled on a wrong sample.metrics feature network, option or
    split, not after a checkpoint was restored and sampled from."""
    FEATURES.check(metrics_config.features, part_options(metrics_config, metrics_config.features))
    if metrics_config.split not in data.EVAL_SPLITS:
        raise ValueError(
            f"sample.metrics.split={metrics_config.split!r}; use one of "
            f"{', '.join(data.EVAL_SPLITS)}."
        )


CONDITIONS = ("label", "null")


def eval_conditions(eval_config: ml_collections.ConfigDict, num_classes: int) -> tuple:
    """The conditionings config.eval.condition names, checked; () for unconditional models."""
    names = tuple(n.strip() for n in str(eval_config.condition).split(",") if n.strip())
    bad = [n for n in names if n not in CONDITIONS]
    if bad or not names:
        raise ValueError(
            f"eval.condition={eval_config.condition!r}: use label, null or label,null "
            "(label: -log p(x|y); null: -log p(x) through the null label)."
        )
    return names if num_classes else ()


def estimator_options(eval_config: ml_collections.ConfigDict) -> dict[str, dict]:
    """{estimator: its options} for the comma-separated config.eval.estimator, checked."""
    names = [n.strip() for n in str(eval_config.estimator).split(",") if n.strip()]
    if not names:
        raise ValueError("eval.estimator is empty; use elbo, ode or elbo,ode.")
    out = {}
    for name in names:
        out[name] = part_options(eval_config, name)
        ESTIMATORS.check(name, out[name])
    return out


@dataclasses.dataclass(eq=False)
class Run:
    """Everything a train/eval/sample job needs, assembled once from a config.

    Attributes:
      config: the (locked) config, kept to write workdir/config.json.
      dataset: the Dataset.
      model: the DiffusionModel.
      optimizer: the optax update rule.
      lr_fn: its learning-rate schedule.
      mesh: the device mesh.
      abstract_state: the state's ShapeDtypeStructs carrying shardings (restore target).
      state_shardings: the state's sharding tree.
      sampler: the SamplerSpec of config.sample.
      estimators: {name: options} of the likelihood estimators config.eval.estimator names.
      conditions: the conditionings evaluated for a class-conditional model (label, null);
        () for an unconditional one.
      seed: the run's seed.
    """

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    model: DiffusionModel
    optimizer: optax.GradientTransformation
    lr_fn: Any
    mesh: jax.sharding.Mesh
    abstract_state: Any
    state_shardings: Any
    sampler: SamplerSpec
    estimators: dict
    conditions: tuple
    seed: int

    @property
    def info(self) -> data.DatasetInfo:
        """The dataset's DatasetInfo."""
        return self.dataset.info

    def key(self, stream: KeyStream) -> jax.Array:
        """The root key of one stream."""
        return root_key(self.seed, stream)

    def init_state(self) -> TrainState:
        """A fresh state from the seed, placed with the run's shardings."""
        model, optimizer, key = self.model, self.optimizer, self.key(KeyStream.INIT)
        make = jax.jit(
            lambda: create_state(model, optimizer, key), out_shardings=self.state_shardings
        )
        return make()

    def train_step(self, *, fail_at_step: int | None = None):
        """The pure train step (not jitted) with the config's optimiser settings."""
        return call_with(
            make_train_step,
            self.config.optim,  # accum_steps, ema_rate, ema_warmup
            model=self.model,
            optimizer=self.optimizer,
            lr_fn=self.lr_fn,
            fail_at_step=fail_at_step,
        )

    def compiled_steps(self, *, fail_at_step: int | None = None):
        """get(num) -> the jitted, state-donating `num`-steps-per-call train function."""
        return compile_steps(
            self.train_step(fail_at_step=fail_at_step), self.mesh, self.state_shardings
        )

    def train_batches(self, start_step: int):
        """This process's share of the training batches from `start_step` on."""
        return call_with(
            self.dataset.train_batches,
            self.config.data,  # batch_size, augment
            seed=self.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_batches(self, max_examples: int | None = None):
        """This process's padded share of config.eval.split (config.eval.max_examples if
        `max_examples` is None)."""
        cap = self.config.eval.max_examples if max_examples is None else max_examples
        return self.dataset.eval_batches(
            batch_size=max(self.config.data.eval_batch_size // jax.process_count(), 1),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_examples=cap,
            split=self.config.eval.split,
        )

    def eval_params(self, state: TrainState):
        """The parameters used for evaluation and samples (EMA unless eval.use_ema is off)."""
        return state.ema_params if self.config.eval.use_ema else state.params

    def checkpoints(self, workdir) -> Checkpoints:
        """The workdir's checkpoint manager with the config's retention."""
        return Checkpoints(workdir, keep=self.config.train.keep_ckpts)


def build_run(config: ml_collections.ConfigDict) -> Run:
    """Assembles a run from a config on all visible devices (the only place that does).

    Args:
      config: a locked config (vdm/config_defaults.py schema).

    Returns:
      The Run.
    """
    dataset = build_dataset(config.data)
    if config.eval.split not in data.EVAL_SPLITS:
        raise ValueError(
            f"eval.split={config.eval.split!r}; use one of {', '.join(data.EVAL_SPLITS)}."
        )
    check_sample_metrics(config.sample.metrics)
    model = build_diffusion_model(config, dataset.info)
    spec = sampler_spec(config.sample)
    model.check_sampler(spec)
    estimator_opts = estimator_options(config.eval)
    if model.schedule.event_shape and set(estimator_opts) - {"elbo"}:
        raise ValueError(
            f"eval.estimator={config.eval.estimator!r}: the PF-ODE likelihood needs a scalar "
            "gamma per example; with schedule.type=multivariate use eval.estimator=elbo."
        )
    o = config.optim
    optimizer = call_with(optim.make_optimizer, o, options=part_options(o, o.name))
    mesh = parallel.make_mesh(config.train.fsdp)
    key = root_key(config.seed, KeyStream.INIT)
    shapes = jax.eval_shape(lambda: create_state(model, optimizer, key))
    shardings = parallel.state_shardings(mesh, shapes)
    return Run(
        config=config,
        dataset=dataset,
        model=model,
        optimizer=optimizer,
        lr_fn=call_with(optim.learning_rate_schedule, o),
        mesh=mesh,
        abstract_state=parallel.with_shardings(shapes, shardings),
        state_shardings=shardings,
        sampler=spec,
        estimators=estimator_opts,
        conditions=eval_conditions(config.eval, model.num_classes),
        seed=int(config.seed),
    )
