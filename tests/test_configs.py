"""Every config file builds, is locked (a misspelt key fails, naming it, both on the config
object and through the same config_flags parser `vdm.main` uses), documents its launch
command, and matches the published values it claims."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from vdm import nets
from vdm.run.setup import build_dataset, build_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = [
    ("digits", None),
    ("digits", "best"),
    ("cifar10", None),
    ("cifar10", "improved"),
    ("cifar10", "small"),
    ("cifar10_aug", None),
    ("imagenet32", None),
    ("imagenet32", "improved"),
    ("imagenet64", None),
    ("imagenet64", "improved"),
    ("imagenet64", "unet"),
    ("mnist", None),
    ("toy", "swirl"),
    ("toy", "mixture2d"),
    ("toy", "gaussian"),
]


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name, arg=None):
    return load_module(name).get_config(arg)


def parse_flags(*args):
    """Parses command-line flags as vdm.main does, in this process, with fresh FlagValues.

    sys_argv is passed because config_flags otherwise reads the override flags from the
    process's own sys.argv (pytest's here).
    """
    argv = ["vdm.main", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def param_count(config) -> int:
    info = build_dataset(config.data).info
    model = nets.build_network(
        config.model, gamma_min=config.schedule.gamma_min, gamma_max=config.schedule.gamma_max
    )
    z = jnp.zeros((1, *info.shape))
    cond = {"label": jnp.zeros((1,), jnp.int32)} if config.model.num_classes else None
    if config.model.cond_aug:
        cond = dict(cond or {}, aug=jnp.zeros((1,)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), z, jnp.zeros((1,)), cond)
    return nets.count_params(shapes["params"])


def test_every_config_file_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.py")} == {name for name, _ in VARIANTS}


@pytest.mark.parametrize(("name", "arg"), VARIANTS)
def test_config_builds_locked_and_consistent(name, arg):
    config = load(name, arg)
    assert config.is_locked
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optim.learning_rat = 1.0
    info = build_dataset(config.data).info  # the dataset name is one the data module knows
    assert config.model.num_classes in (0, info.num_classes)
    assert param_count(config) > 0  # the network builds for the data's shape


def test_docstring_gives_the_launch_command():
    for name, arg in VARIANTS:
        doc = load_module(name).__doc__
        assert f"python -m vdm.main --config=configs/{name}.py" in doc, name
        if arg is not None:
            assert f"configs/{name}.py:{arg}" in doc, (name, arg)


def test_flag_overrides_parse_and_misspelt_keys_fail(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # relative config paths, as on the command line
    c = parse_flags(
        "--config=configs/toy.py:mixture2d",
        "--config.optim.learning_rate=0.5",
        "--config.model.channel_mult=(1, 2)",
        "--config.train.write_samples=False",
    )
    assert c.is_locked and c.data.name == "mixture2d"
    assert (c.optim.learning_rate, c.model.channel_mult, c.train.write_samples) == (
        0.5, (1, 2), False
    )  # fmt: skip
    with pytest.raises(AttributeError, match="learning_rat"):
        parse_flags("--config=configs/digits.py", "--config.optim.learning_rat=1")
    # A missing top-level group surfaces as KeyError, a missing leaf as AttributeError.
    with pytest.raises(KeyError, match="optimizer"):
        parse_flags("--config=configs/cifar10.py", "--config.optimizer.b1=0.5")
    with pytest.raises(flags.IllegalFlagValueError, match="Unknown cifar10 variant"):
        parse_flags("--config=configs/cifar10.py:smal")


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="Unknown cifar10 variant"):
        load("cifar10", "smal")


def test_cifar10_matches_the_paper():
    c = load("cifar10")
    assert (c.model.type, c.model.n_embd, c.model.n_layers) == ("vdm_unet", 128, 32)
    assert (c.model.dropout, c.model.with_attention) == (0.1, False)
    assert (c.model.fourier_min, c.model.fourier_max) == (6, 7)
    assert (c.schedule.type, c.schedule.gamma_min, c.schedule.gamma_max) == (
        "learned_linear", -13.3, 5.0
    )  # fmt: skip
    assert c.data.batch_size == 128 and c.seed == 1 and c.loss.antithetic
    o = c.optim
    assert o.name == "adamw" and o.learning_rate == 2e-4
    a = o.adamw
    assert (a.b1, a.b2, a.eps, a.weight_decay) == (0.9, 0.99, 1e-8, 0.01)
    assert (o.warmup_steps, o.ema_rate, o.grad_clip) == (100, 0.9999, 0.0)
    assert c.train.num_steps == 10_000_000
    assert c.model.base_measure  # the published output eps_hat = conv_out(h) + z_t


def test_other_published_configs():
    aug = load("cifar10_aug")
    assert (aug.model.n_embd, aug.model.n_layers, aug.model.dropout) == (256, 32, 0.05)
    assert aug.schedule.type == "learned_net" and aug.data.batch_size == 768
    assert aug.optim.learning_rate == 1e-4
    assert aug.data.augment and aug.model.cond_aug  # the flag is fed to the network
    for name, shape in (("imagenet32", (256, 32)), ("imagenet64", (256, 64))):
        c = load(name)
        assert (c.model.type, c.model.n_embd, c.model.n_layers) == ("vdm_unet", *shape)
        assert c.schedule.type == "learned_linear" and c.data.batch_size == 128
        assert (c.schedule.gamma_min, c.schedule.gamma_max) == (-13.3, 5.0)
        assert (c.optim.learning_rate, c.optim.ema_rate) == (2e-4, 0.9999)
    assert load("imagenet64", "unet").model.type == "unet"
    for name, arg in (("cifar10_aug", None), ("imagenet32", None), ("imagenet64", None)):
        assert load(name, arg).model.base_measure, name


def test_learned_net_configs_train_its_shape_by_the_variance_rule():
    """The continuous-time ELBO is invariant to the shape, so a learned_net schedule trained
    by its ELBO gradient wanders: every config with one uses schedule.grad=variance."""
    using = [(n, a) for n, a in VARIANTS if load(n, a).schedule.type == "learned_net"]
    assert {n for n, _ in using} >= {"cifar10_aug", "toy"}
    for name, arg in using:
        config = load(name, arg)
        assert config.schedule.grad == "variance", (name, arg)
        assert config.loss.timesteps == 0, (name, arg)  # the rule needs continuous time


def test_digits_default_is_cpu_sized():
    # The default must train in minutes on 2 CPU cores: keep an eye on whoever grows it.
    c = load("digits")
    assert c.data.name == "digits" and c.model.n_embd <= 64 and c.model.n_layers <= 8
    assert c.train.num_steps <= 5000 and c.sample.steps <= 500


@pytest.mark.parametrize(
    ("name", "published"),
    [("cifar10", 30.58e6), ("cifar10_aug", 122e6), ("imagenet64", 238e6)],
)
def test_parameter_counts_match_the_published_models(name, published):
    # Published sizes: 30.58M (CIFAR-10), about 122M (256 channels), about 238M (64 layers).
    assert abs(param_count(load(name)) / published - 1) < 0.02


def test_base_measure_reaches_the_network_from_the_command_line(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    assert not load("digits").model.base_measure  # the schema default is off
    c = parse_flags("--config=configs/digits.py", "--config.model.base_measure=true")
    net = nets.build_network(c.model, gamma_min=-8.0, gamma_max=5.0)
    assert net.base_measure and net.parameterization == "eps"
    c = parse_flags(
        "--config=configs/toy.py:gaussian",
        "--config.model.base_measure=true",
        "--config.model.parameterization=score",
    )
    with pytest.raises(ValueError, match="base_measure=True is not defined for.*'score'"):
        build_run(c)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize(
    "name, arg",
    [("digits", "best"), ("cifar10", "improved"), ("imagenet32", "improved"),
     ("imagenet64", "improved")],
)  # fmt: skip
def test_best_and_improved_variants_change_the_objective_only(name, arg):
    from vdm.config_defaults import IMPROVED_OBJECTIVE

    base, variant = _flat(load(name).to_dict()), _flat(load(name, arg).to_dict())
    changed = {k for k, v in variant.items() if base[k] != v}
    assert changed and changed <= set(IMPROVED_OBJECTIVE)
    assert all(variant[k] == v for k, v in IMPROVED_OBJECTIVE.items())
