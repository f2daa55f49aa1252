"""Tests of vdm.data: batch shapes and ranges, order fixed by (seed, step), disjoint process
shares, the offline error for unprepared TFDS data, and the known densities' moments and
normalisation. The TFDS path runs the real pipeline on tfds.testing.mock_data.
"""

import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import train_helpers as th

from vdm.config_defaults import base_config
from vdm.data import densities, memory, tfds_images
from vdm.run.setup import build_dataset


def data_config(**values):
    """config.data with `values`; a dataset's own options (num_train, dim, ...) go to its
    sub-dict config.data.<name>."""
    cfg = base_config().data
    for key, value in values.items():
        if key in cfg and not isinstance(cfg[key], ml_collections.ConfigDict):
            cfg[key] = value
    for key, value in values.items():
        if key not in cfg and cfg.name in cfg:  # digits has no options: num_train is unused
            cfg[cfg.name][key] = value
    return cfg


def train_batches(cfg, **kw):
    return build_dataset(cfg).train_batches(batch_size=cfg.batch_size, augment=cfg.augment, **kw)


def eval_batches(cfg, **kw):
    return build_dataset(cfg).eval_batches(**kw)


def get_info(cfg):
    return build_dataset(cfg).info


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# --- digits (the embedded default) and the in-memory batching --------------------------------


def test_digits_batches_shape_dtype_range_and_split():
    cfg = data_config(name="digits", batch_size=32)
    batch = next(train_batches(cfg, seed=0, start_step=0))
    assert batch["x"].shape == (32, 8, 8, 1) and batch["x"].dtype == np.uint8
    assert batch["x"].max() <= 16 and batch["label"].dtype == np.int32
    info = get_info(cfg)
    assert (info.shape, info.vocab_size, info.num_classes) == ((8, 8, 1), 17, 10)
    train, test = memory.digits("train"), memory.digits("test")
    assert (len(train["x"]), len(test["x"])) == (1500, 297)
    # No test image appears in the training split (the digits set has no exact duplicates
    # across this split; a leak would show as a shared row).
    flat_train = {row.tobytes() for row in train["x"].reshape(1500, -1)}
    assert not any(row.tobytes() in flat_train for row in test["x"].reshape(297, -1))


def test_digits_are_scikit_learns_load_digits_read_without_importing_it(monkeypatch):
    from sklearn.datasets import load_digits  # noqa: PLC0415 - the reference, in this test only

    bunch = load_digits()
    train, test = memory.digits("train"), memory.digits("test")
    order = np.random.default_rng(0).permutation(1797)
    for split, rows in ((test, order[:297]), (train, order[297:])):
        np.testing.assert_array_equal(split["x"][..., 0], bunch.images[rows].astype(np.uint8))
        np.testing.assert_array_equal(split["label"], bunch.target[rows])
    # Without scikit-learn: one message that says what to install.
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install scikit-learn"):
        memory._digits_file()


@pytest.mark.parametrize("name", ["digits", "mixture2d"])
def test_order_is_a_function_of_seed_and_step(name):
    cfg = data_config(name=name, batch_size=64, num_train=500)
    run = take(train_batches(cfg, seed=3, start_step=0), 30)  # crosses epochs
    resumed = take(train_batches(cfg, seed=3, start_step=17), 13)
    for a, b in zip(run[17:], resumed, strict=True):
        assert_batches_equal(a, b)
    other = next(train_batches(cfg, seed=4, start_step=0))
    assert not np.array_equal(other["x"], run[0]["x"])


def test_processes_get_disjoint_shares_of_the_global_batch():
    cfg = data_config(name="digits", batch_size=48)
    whole = take(train_batches(cfg, seed=0, start_step=5), 3)
    shares = [
        take(train_batches(cfg, seed=0, start_step=5, process_index=p, process_count=3), 3)
        for p in range(3)
    ]
    for step in range(3):
        joined = np.concatenate([s[step]["x"] for s in shares])
        np.testing.assert_array_equal(joined, whole[step]["x"])


def test_eval_covers_every_example_once_with_padding():
    cfg = data_config(name="digits")
    test = memory.digits("test")
    per_process = [
        list(eval_batches(cfg, batch_size=40, process_index=p, process_count=2)) for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) == 4  # ceil(297 / 80)
    rows = [b["x"][b["mask"] > 0] for batches in zip(*per_process, strict=True) for b in batches]
    seen = np.concatenate(rows)
    assert len(seen) == 297
    np.testing.assert_array_equal(
        np.sort(seen.reshape(297, -1), 0), np.sort(test["x"].reshape(297, -1), 0)
    )
    capped = list(eval_batches(cfg, batch_size=40, max_examples=50))
    assert sum(b["mask"].sum() for b in capped) == 50


def test_augmentation_applies_dihedral_transforms_and_flags_them():
    cfg = data_config(name="digits", batch_size=256, augment=True)
    plain = next(train_batches(data_config(name="digits", batch_size=256), seed=0, start_step=0))
    aug = next(train_batches(cfg, seed=0, start_step=0))
    flags = aug["aug"]
    assert flags.dtype == np.float32 and 0.3 < flags.mean() < 0.7
    for x0, x1, f in zip(plain["x"], aug["x"], flags, strict=True):
        group = [np.rot90(x0, k) for k in range(4)]
        group += [g[:, ::-1] for g in group]
        if f == 0:
            np.testing.assert_array_equal(x1, x0)
        else:
            assert any(np.array_equal(x1, g) for g in group[1:])
    with pytest.raises(ValueError, match="augment needs image data"):
        next(train_batches(data_config(name="swirl", augment=True), seed=0, start_step=0))


def test_unknown_dataset_name_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown data.name 'cifar100'"):
        get_info(data_config(name="cifar100"))


# --- TFDS pipelines on mock data ---------------------------------------------------------------

N_TRAIN, N_TEST = 40, 11


def fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kw):
    """A stand-in for TFDS's reader that honours even splits and slices: example i of the
    split has label i and every pixel equal to i, so a test can see which rows it got."""
    del self, decoders, read_config, shuffle_files, kw
    if isinstance(split, str):
        name, index, count = split, 0, 1
    else:
        name, index, count = split.split, split.index, split.count
    base, _, cap = re.fullmatch(r"(\w+)(\[:(\d+)\])?", name).groups()
    n = {"train": N_TRAIN, "test": N_TEST}[base]
    n = min(n, int(cap)) if cap else n
    drop = getattr(split, "drop_remainder", False)
    lo, hi = (
        (index * (n // count), (index + 1) * (n // count))
        if drop
        else (index * n // count, (index + 1) * n // count)
    )
    ids = tf.data.Dataset.range(lo, hi)
    return ids.map(lambda i: {"image": tf.fill((32, 32, 3), tf.cast(i, tf.uint8)), "label": i})


def test_tfds_pipeline_on_mock_data():
    cfg = data_config(name="cifar10", batch_size=8, data_dir="/nonexistent", shuffle_buffer=100)
    with tfds.testing.mock_data(num_examples=24):
        batch = next(train_batches(cfg, seed=0, start_step=0))
        ev = list(eval_batches(cfg, batch_size=5))
        # Eval records name the version read (vdm/run/eval_records.py).
        version = tfds_images.full_name("cifar10", "/nonexistent")
    assert version.startswith("cifar10/3."), version
    assert batch["x"].shape == (8, 32, 32, 3) and batch["x"].dtype == np.uint8
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert len(ev) == 5 and sum(b["mask"].sum() for b in ev) == 24  # 24 mock examples


def test_tfds_order_resume_and_process_shares():
    cfg = data_config(name="cifar10", batch_size=8, shuffle_buffer=100)
    with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset):
        run = [b["label"] for b in take(train_batches(cfg, seed=1, start_step=0), 12)]
        resumed = [b["label"] for b in take(train_batches(cfg, seed=1, start_step=7), 5)]
        shares = [
            np.concatenate(
                [
                    b["label"]
                    for b in take(
                        train_batches(cfg, seed=1, start_step=0, process_index=p, process_count=2),
                        5,
                    )
                ]
            )
            for p in range(2)
        ]
        ev = [
            list(eval_batches(cfg, batch_size=3, process_index=p, process_count=2))
            for p in range(2)
        ]
    np.testing.assert_array_equal(np.stack(run[7:]), np.stack(resumed))
    first_epoch = np.concatenate(run[:5])  # 40 examples = one epoch at batch 8
    assert sorted(first_epoch) == list(range(N_TRAIN))
    assert set(shares[0]) == set(range(20)) and set(shares[1]) == set(range(20, 40))
    assert len(ev[0]) == len(ev[1]) == 2  # ceil(ceil(11 / 2) / 3)
    labels = [b["label"][b["mask"] > 0] for batches in ev for b in batches]
    assert sorted(np.concatenate(labels)) == list(range(N_TEST))


@pytest.mark.slow
def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
    # The real command line and TFDS code path with an empty data_dir, no mock: one message.
    proc = th.run_main(
        tmp_path / "run",
        "--config.data.name=imagenet32",
        f"--config.data.data_dir={tmp_path}",
        "--config.model.num_classes=0",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "vdm.main: error:" in proc.stderr
    assert "tfds build downsampled_imagenet/32x32" in proc.stderr
    assert "--config.data.data_dir" in proc.stderr and str(tmp_path) in proc.stderr


# --- known densities -----------------------------------------------------------------------------


def test_gaussian_moments_and_log_density():
    from scipy import stats

    dist = densities.default_gaussian(3)
    x, _ = dist.sample(np.random.default_rng(0), 200_000)
    # Standard errors: mean sqrt(diag cov / n); covariance entries below 2e-3 at this n.
    np.testing.assert_allclose(x.mean(0), dist.mean, atol=4 * np.sqrt(dist.cov.max() / len(x)))
    np.testing.assert_allclose(np.cov(x.T), dist.cov, atol=3e-3)
    ref = stats.multivariate_normal(dist.mean, dist.cov).logpdf(x[:100])
    np.testing.assert_allclose(dist.log_prob(x[:100]), ref, rtol=1e-10)


def test_mixture_moments_and_labels():
    dist = densities.default_mixture2d()
    x, labels = dist.sample(np.random.default_rng(0), 200_000)
    np.testing.assert_allclose(np.bincount(labels) / len(x), dist.weights, atol=4e-3)
    mean = dist.weights @ dist.means
    cov = (
        dist.weights[:, None, None]
        * (
            np.einsum("ki,kj->kij", dist.means, dist.means)
            + np.einsum("ki,ij->kij", dist.variances, np.eye(2))
        )
    ).sum(0) - np.outer(mean, mean)
    np.testing.assert_allclose(x.mean(0), mean, atol=5e-3)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=5e-3)


def test_swirl_moments_follow_its_curve():
    dist = densities.Swirl()
    x, _ = dist.sample(np.random.default_rng(0), 200_000)
    u = (np.arange(100_000) + 0.5) / 100_000
    curve = dist._curve(u)
    mean = curve.mean(0)
    cov = np.cov(curve.T, bias=True) + dist.std**2 * np.eye(2)
    np.testing.assert_allclose(x.mean(0), mean, atol=5e-3)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=5e-3)


@pytest.mark.parametrize(
    "name, half_width", [("gaussian", 3.0), ("mixture2d", 1.3), ("swirl", 1.3)]
)
def test_log_density_integrates_to_one(name, half_width):
    # A Riemann sum of Gaussian bumps with spacing <= std / 2 is exact far beyond float
    # precision, so the tolerance only needs to absorb the mass outside the box.
    dist = densities.get_density(name, 2)
    grid = np.arange(-half_width, half_width + 1e-9, 0.02)
    xx, yy = np.meshgrid(grid, grid)
    pts = np.stack([xx.ravel(), yy.ravel()], -1)
    mass = np.exp(dist.log_prob(pts)).sum() * 0.02**2
    assert mass == pytest.approx(1.0, abs=1e-4)


def test_one_dimensional_gaussian_normalises():
    dist = densities.default_gaussian(1)
    grid = np.linspace(-3, 3, 6001)[:, None]
    assert np.exp(dist.log_prob(grid)).sum() * 0.001 == pytest.approx(1.0, abs=1e-6)
