"""Every config file builds, is locked (a misspelt key fails, naming it; tests/test_train.py
checks the same through `vdm.main`'s flag parser), and matches the published values it
claims."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from vdm import data, nets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = [
    ("digits", None),
    ("cifar10", None),
    ("cifar10", "small"),
    ("cifar10_aug", None),
    ("imagenet32", None),
    ("imagenet64", None),
    ("imagenet64", "unet"),
    ("mnist", None),
    ("toy", "swirl"),
    ("toy", "mixture2d"),
    ("toy", "gaussian"),
]


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def param_count(config) -> int:
    info = data.get_info(config.data)
    model = nets.build_model(
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
    info = data.get_info(config.data)  # the dataset name is one the data module knows
    assert config.model.num_classes in (0, info.num_classes)
    assert param_count(config) > 0  # the network builds for the data's shape


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
    assert (o.learning_rate, o.b1, o.b2, o.eps, o.weight_decay) == (2e-4, 0.9, 0.99, 1e-8, 0.01)
    assert (o.warmup_steps, o.ema_rate, o.grad_clip) == (100, 0.9999, 0.0)
    assert c.train.num_steps == 10_000_000


@pytest.mark.parametrize(
    ("name", "published"),
    [("cifar10", 30.58e6), ("cifar10_aug", 122e6), ("imagenet64", 238e6)],
)
def test_parameter_counts_match_the_published_models(name, published):
    # Published sizes: 30.58M (CIFAR-10), about 122M (256 channels), about 238M (64 layers).
    assert abs(param_count(load(name)) / published - 1) < 0.02
