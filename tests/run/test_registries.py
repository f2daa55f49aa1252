"""Every registered part and every one of its options is reachable from the command line, an
unknown option or name is an error naming it, and a part registered here (in a test, editing
no library file) is usable from a config.

The command-line tests parse flags in this process exactly as `vdm.main` does (config_flags
over the digits config file); they are parametrised over the registries, so a new sampler,
schedule, weighting, optimiser or dataset option is covered without touching this file.
"""

import contextlib
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th

from vdm import data, optim
from vdm.core import losses, schedules
from vdm.estimators import ESTIMATORS
from vdm.registry import Registry
from vdm.run import loop
from vdm.run.sample import draw_samples
from vdm.run.setup import KeyStream, build_run, sampler_spec
from vdm.sampling.registries import CORRECTORS, PREDICTORS, SAMPLERS

CONFIG = str(Path(th.REPO) / "configs" / "digits.py")

# (registry, config node, selector key) for every concept whose parts have config options.
CONCEPTS = {
    "sample": (SAMPLERS, "sample", "sampler"),
    "schedule": (schedules.SCHEDULES, "schedule", "type"),
    "weighting": (losses.WEIGHTINGS, "loss", "weighting"),
    "optimizer": (optim.OPTIMIZERS, "optim", "name"),
    "dataset": (data.DATASETS, "data", "name"),
    "estimator": (ESTIMATORS, "eval", "estimator"),
}


parse_flags = th.parse_flags


def changed(value):
    """A value of the same type that differs from `value` (for any option default)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.25
    if isinstance(value, str):
        return value + "_x"
    raise TypeError(f"no rule for option values of type {type(value).__name__}")


def options_of(registry: Registry):
    return [(n, o, d) for n, opts in registry.defaults().items() for o, d in opts.items()]


@pytest.mark.parametrize(("concept", "part", "option", "default"), [
    (concept, *item) for concept, (reg, _, _) in CONCEPTS.items() for item in options_of(reg)
])  # fmt: skip
def test_every_option_of_every_part_parses_from_the_command_line(concept, part, option, default):
    _, node, selector = CONCEPTS[concept]
    value = changed(default)
    flag_value = str(value).lower() if isinstance(value, bool) else repr(value).strip("'")
    config = parse_flags(
        f"--config.{node}.{selector}={part}", f"--config.{node}.{part}.{option}={flag_value}"
    )
    assert config[node][selector] == part
    assert config[node][part][option] == value
    assert type(config[node][part][option]) is type(value)


@pytest.mark.parametrize(("sampler", "option", "default"), options_of(SAMPLERS))
def test_every_sampler_option_reaches_the_sampler(sampler, option, default, monkeypatch):
    """From the command line through build_run to the registered sampler's keyword."""
    seen = {}
    entry = SAMPLERS.get(sampler)

    def recorder(model, key, shape, steps, **kwargs):
        seen.update(kwargs, steps=steps)
        return jnp.zeros(shape)

    monkeypatch.setitem(SAMPLERS._entries, sampler, type(entry)(
        entry.name, recorder, entry.options, entry.doc))  # fmt: skip
    value = changed(default)
    flag_value = str(value).lower() if isinstance(value, bool) else repr(value).strip("'")
    config = parse_flags(
        *th.overrides(sample__num=4),
        f"--config.sample.sampler={sampler}",
        f"--config.sample.{sampler}.{option}={flag_value}",
        "--config.sample.steps=3",
    )
    run = build_run(config)
    assert run.sampler.options[option] == value
    params = run.model.init_params(run.key(KeyStream.INIT))
    samples = draw_samples(run, params)
    assert samples.shape == (4, *run.info.shape)
    assert seen[option] == value and seen["steps"] == 3
    # Every other option arrives with its registered default.
    for other, other_default in entry.options.items():
        if other != option:
            assert seen[other] == other_default, other


def test_unknown_option_or_name_fails_naming_it():
    with pytest.raises(Exception, match="rtl"):
        parse_flags("--config.sample.ode.rtl=0.1")
    with pytest.raises(Exception, match="eta"):
        parse_flags("--config.sample.eta=0.5")  # moved to sample.ddim.eta
    config = parse_flags(*th.overrides(), "--config.sample.sampler=dpm")
    with pytest.raises(ValueError, match="Unknown sampler 'dpm'; choose one of ancestral"):
        build_run(config)
    config = parse_flags(*th.overrides(), "--config.optim.name=adamax")
    with pytest.raises(ValueError, match="Unknown optimizer 'adamax'"):
        build_run(config)
    # Python callers get the registry's check too.
    with pytest.raises(ValueError, match="sampler 'ode' got unknown options rtl"):
        SAMPLERS.check("ode", {"rtl": 1.0})
    with pytest.raises(ValueError, match="Unknown predictor 'euler'"):
        PREDICTORS.get("euler")
    reg = Registry("thing")
    reg.register("x", lambda *, alpha=1: alpha)
    assert reg.build("x", {"alpha": 2}) == 2
    with pytest.raises(ValueError, match="thing 'x' got unknown options beta; it accepts alpha"):
        reg.build("x", {"beta": 2})
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", lambda: None)


def test_schema_has_exactly_the_registered_options():
    config = parse_flags()
    for registry, node, _ in CONCEPTS.values():
        for part, opts in registry.defaults().items():
            if opts:
                assert config[node][part].to_dict() == opts, (node, part)


@pytest.mark.parametrize("name", optim.OPTIMIZERS.names())
def test_every_optimizer_trains_from_the_config(name):
    run = build_run(th.load_config(optim__name=name, optim__warmup_steps=0))
    state = run.init_state()
    step = jax.jit(run.train_step())
    batch = jax.tree.map(jnp.asarray, next(run.train_batches(0)))
    new, metrics = step(state, batch, run.key(KeyStream.TRAIN))
    assert int(new.step) == 1 and np.isfinite(float(metrics["train/loss"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, state.params)
    assert any(jax.tree.leaves(moved)), name


def test_optimizer_options_flow_from_the_config():
    plain = build_run(th.load_config(optim__name="sgd", optim__sgd__momentum=0.0))
    heavy = build_run(th.load_config(optim__name="sgd", optim__sgd__momentum=0.9))
    # Momentum keeps a trace in the optimiser state; plain SGD keeps none.
    assert len(jax.tree.leaves(heavy.init_state().opt_state)) > len(
        jax.tree.leaves(plain.init_state().opt_state)
    )


def test_pc_composes_any_registered_predictor_and_corrector():
    config = th.load_config(sample__sampler="pc", sample__num=4, sample__steps=3)
    for predictor in PREDICTORS.names():
        for corrector in CORRECTORS.names():
            config.sample.pc.predictor, config.sample.pc.corrector = predictor, corrector
            run = build_run(config)
            params = run.model.init_params(run.key(KeyStream.INIT))
            out = draw_samples(run, params)
            assert out.shape == (4, 2) and np.all(np.isfinite(out)), (predictor, corrector)


@contextlib.contextmanager
def registered(registry: Registry, name: str, fn):
    registry.register(name, fn)
    try:
        yield
    finally:
        registry.unregister(name)


def load_digits_config():
    spec = importlib.util.spec_from_file_location("digits_cfg", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_parts_registered_in_a_test_are_usable_from_a_config(tmp_path):
    """A new sampler, schedule and dataset: one function and one registration each."""

    def scaled_prior(model, key, shape, steps, *, scale=0.5, batch_sharding=None):
        """Returns scaled prior noise (a stand-in sampler)."""
        del model, steps, batch_sharding
        return scale * jax.random.normal(key, shape)

    def power(gamma_min, gamma_max, *, exponent=2.0):
        """gamma = gamma_min + (gamma_max - gamma_min) t^exponent (fixed)."""
        return schedules.Schedule(
            "power", lambda key: {}, lambda p, t: gamma_min + (gamma_max - gamma_min) * t**exponent
        )

    def ring(*, radius=2.0, num=256):
        """Points on a noisy circle of `radius` (continuous 2-d data)."""
        rng = np.random.default_rng(0)
        angle = rng.uniform(0, 2 * np.pi, num)
        x = np.stack([np.cos(angle), np.sin(angle)], 1) * radius
        x = (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
        info = data.DatasetInfo("ring", (2,), None, 0)
        return data.in_memory(info, lambda split: {"x": x})

    with (
        registered(SAMPLERS, "scaled_prior", scaled_prior),
        registered(schedules.SCHEDULES, "power", power),
        registered(data.DATASETS, "ring", ring),
    ):
        config = load_digits_config()  # the schema now has the new parts' sub-dicts
        config.update_from_flattened_dict({k: v for k, v in th.TINY.items() if "gaussian" not in k})
        config.update_from_flattened_dict({
            "data.name": "ring", "data.ring.radius": 3.0, "data.ring.num": 128,
            "schedule.type": "power", "schedule.power.exponent": 1.5,
            "sample.sampler": "scaled_prior", "sample.scaled_prior.scale": 0.25,
            "train.num_steps": 2, "train.eval_every": 2,
        })  # fmt: skip
        run = build_run(config)
        assert run.info.name == "ring" and run.sampler.options == {"scale": 0.25}
        g = run.model.schedule.gamma({}, jnp.asarray(0.5))
        np.testing.assert_allclose(g, -8.0 + 13.0 * 0.5**1.5, rtol=1e-6)  # digits: gamma_min -8
        batch = next(run.train_batches(0))
        np.testing.assert_allclose(np.linalg.norm(batch["x"], axis=1).mean(), 3.0, atol=0.05)
        out = loop.train(run, str(tmp_path), tensorboard=False)
        assert out["step"] == 2 and np.isfinite(out["eval/bpd"])
        samples = np.load(tmp_path / "samples.npy")
        assert samples.shape == (8, 2)
        assert 0.1 < samples.std() < 0.4  # the stand-in sampler's 0.25 scale was used
    assert "ring" not in data.DATASETS and "power" not in schedules.SCHEDULES


def test_sampler_spec_reads_only_the_selected_samplers_options():
    config = parse_flags("--config.sample.sampler=ddim", "--config.sample.ddim.eta=0.5")
    spec = sampler_spec(config.sample)
    assert (spec.sampler, spec.options) == ("ddim", {"eta": 0.5})


@pytest.mark.slow
def test_sampler_options_from_the_real_command_line(trained_workdir):
    """`python -m vdm.main --mode=sample` with a solver, its tolerance and step-size controller,
    and a composed pc."""
    tmp_path = trained_workdir
    ode = th.run_main(
        tmp_path,
        *th.overrides(sample__sampler="ode", sample__steps=4),
        "--config.sample.ode.solver=bosh3",
        "--config.sample.ode.rtol=1e-3",
        "--config.sample.ode.atol=1e-3",
        "--config.sample.ode.pcoeff=0.3",
        "--config.sample.ode.icoeff=0.4",
        mode="sample",
    )
    pc = th.run_main(
        tmp_path,
        *th.overrides(sample__sampler="pc", sample__steps=4),
        "--config.sample.pc.predictor=ddpm",
        "--config.sample.pc.variance=posterior",
        "--config.sample.pc.corrector=none",
        mode="sample",
    )
    a = np.load(tmp_path / "samples_2_ode_4.npy")
    b = np.load(tmp_path / "samples_2_pc_4.npy")
    assert a.shape == b.shape == (8, 2) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert not np.allclose(a, b)
    assert "samples_2_ode_4.png" in ode.stdout and "samples_2_pc_4.png" in pc.stdout
    bad = th.run_main(
        tmp_path, *th.overrides(), "--config.sample.ode.rtl=1e-3", mode="sample", check=False
    )
    assert bad.returncode != 0 and "rtl" in bad.stderr
    # A bad value is one message before anything is restored or compiled (ode.check_options).
    bad = th.run_main(
        tmp_path, *th.overrides(sample__sampler="ode"), "--config.sample.ode.icoeff=0",
        mode="sample", check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "sample.ode.pcoeff=0.0, icoeff=0" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
