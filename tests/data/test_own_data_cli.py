"""`python -m vdm.main` end to end on a user's own data, files written by the test: an npz
archive (labelled, and unlabelled at 5 bits), a folder of images in class sub-folders and a
TFDS dataset prepared in TFDS's format into tmp_path (read back by name, as a dataset prepared
on another machine would be). Every run's final evaluation must cover the eval split exactly
once. The TFDS run is also killed (SIGKILL) past a checkpoint and relaunched, and must
recompute the steps it had logged after that checkpoint to the same losses, bit for bit (the
uninterrupted run's); for the other sources the same resume guarantee is checked in-process on
their batch streams (here and in test_own_data.py), which is what a relaunch reads, at a
fraction of the cost of another launch each.

The image sources share one shape (8x8x3, 3 classes), so their compiled programs are shared
through the tests' persistent compilation cache.
"""

import itertools
import signal

import numpy as np
import pytest
import tensorflow_datasets as tfds
import train_helpers as th
from PIL import Image

from vdm import data
from vdm.config_defaults import base_config
from vdm.run.setup import build_dataset

# A one-block U-Net on 8x8 images; no sample grid except where a test asks for it.
IMAGES = dict(
    model__type="vdm_unet",
    model__n_embd=8,
    model__n_layers=1,
    model__norm_groups=4,
    data__eval_batch_size=16,
    train__ckpt_every=3,
    train__eval_every=1000,
    train__write_samples=False,
)
CLASSES = ("cat", "dog", "owl")


def flags(**extra):
    return th.overrides(**dict(IMAGES, **extra))


def final_eval(workdir) -> dict:
    return [r for r in th.read_metrics(workdir) if "eval/bpd" in r][-1]


def kill_and_resume(tmp_path, steps=40, run_flags=(), **extra):
    """The run SIGKILLed once it has logged a step past a checkpoint, then relaunched: the
    relaunch resumes from the checkpoint, recomputes the steps the killed launch logged after
    it to the same losses, bit for bit (no uninterrupted reference run is needed: those steps
    are the uninterrupted run's), and finishes every step. The killed launch runs in the
    environment a user has (no TF_CPP_MIN_LOG_LEVEL, which this test process got by importing
    vdm). Returns the run's workdir and the killed launch's output."""
    run = tmp_path / "run"
    all_flags = [*flags(train__num_steps=steps, **extra), *run_flags]
    env = th.env_for()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    log = tmp_path / "killed.log"
    proc = th.spawn_main(run, *all_flags, env=env, log=log)
    th.wait_for(lambda: th.logged_past_checkpoint(run), proc=proc, interval=0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, log.read_text()[-3000:]
    assert not (run / "DONE").exists()
    first, ckpt = th.logged_losses(run), th.checkpoint_steps(run)[-1]
    redone = [step for step in first if step > ckpt]
    assert redone, "the killed launch logged nothing after its last checkpoint"
    th.run_main(run, *all_flags)
    second = th.train_losses(run)
    assert sorted(second) == list(range(1, steps + 1))
    for step in redone:
        assert second[step] == first[step], (step, first[step], second[step])
    return run, log.read_text()


@pytest.fixture(scope="module")
def labelled_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "labelled.npz"
    np.savez(
        path,
        train=rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
        test=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
        train_labels=np.arange(64) % 3,
        test_labels=np.arange(20) % 3,
    )
    return str(path)


def resumes_exactly(ds, batch_size=8, seed=3, start=5, count=4):
    """A batch stream started at step `start` (what a relaunch reads) equals the uninterrupted
    stream from that step on, images and labels."""
    stream = ds.train_batches(batch_size=batch_size, seed=seed, start_step=0)
    run = list(itertools.islice(stream, start + count))
    resumed = ds.train_batches(batch_size=batch_size, seed=seed, start_step=start)
    for a, b in zip(run[start:], resumed):  # noqa: B905 - resumed is endless
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.slow
def test_npz_labelled_trains_and_evaluates_the_test_array(tmp_path, labelled_npz):
    run = tmp_path / "run"
    th.run_main(run, *flags(data__name="npz", data__path=labelled_npz, train__num_steps=10))
    assert sorted(th.train_losses(run)) == list(range(1, 11))
    assert final_eval(run)["eval/num_examples"] == 20  # the test array, each example once


@pytest.mark.slow
def test_npz_unlabelled_5_bit_trains_and_samples(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "unlabelled.npz"
    # [N, H, W] greyscale arrays of int64 values: a channel axis is added, 256 values inferred.
    np.savez(path, train=rng.integers(0, 256, (48, 8, 8)), eval=rng.integers(0, 256, (10, 8, 8)))
    run = tmp_path / "run"
    th.run_main(
        run,
        *flags(data__name="npz", data__path=str(path), data__num_bits=5, train__num_steps=10),
        "--config.train.write_samples=true",
    )
    assert final_eval(run)["eval/num_examples"] == 10
    samples = np.load(run / "samples.npy")  # the model's vocabulary is 2^5 values
    assert samples.shape == (8, 8, 8, 1) and 0 <= samples.min() and samples.max() <= 31


def write_image_folder(root) -> str:
    rng = np.random.default_rng(2)
    for split, per_class in (("train", 12), ("test", 3)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                if i % 3 == 2:  # some JPEGs among the PNGs
                    Image.fromarray(image).save(folder / f"{i}.jpg", quality=95)
                else:
                    Image.fromarray(image).save(folder / f"{i}.png")
    return str(root)


@pytest.mark.slow
def test_image_folder_with_class_subfolders_resumes_trains_and_evaluates(tmp_path):
    root = write_image_folder(tmp_path / "images")
    ds = build_dataset(_data_config(name="folder", path=root))
    assert (ds.info.shape, ds.info.num_classes) == ((8, 8, 3), 3)
    assert ds.info.details["class_names"] == list(CLASSES)
    resumes_exactly(ds)  # 36 training images: the 9 batches cross an epoch
    run = tmp_path / "run"
    th.run_main(run, *flags(data__name="folder", data__path=root, train__num_steps=10))
    assert final_eval(run)["eval/num_examples"] == 9  # test/: 3 classes x 3 images


# --- TFDS: a dataset prepared in TFDS's format, read back by name ------------------------------


class VdmTinyImages(tfds.core.GeneratorBasedBuilder):
    """52 labelled 10x12 RGB images in TFDS's format (train 40, test 12)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(10, 12, 3)),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(40, 3), "test": self._generate_examples(12, 4)}

    def _generate_examples(self, num, seed):
        rng = np.random.default_rng(seed)
        for i in range(num):
            image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            yield i, {"image": image, "label": i % len(CLASSES)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A data_dir holding vdm_tiny_images, prepared as `tfds build` would."""
    data_dir = tmp_path_factory.mktemp("tfds")
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    VdmTinyImages(data_dir=str(data_dir)).download_and_prepare(download_config=config)
    return str(data_dir)


def _data_config(**values):
    cfg = base_config().data
    for key, value in values.items():
        node, _, leaf = key.rpartition("__")
        (cfg[node] if node else cfg)[leaf] = value
    return cfg


def test_prepared_tfds_dataset_facts_and_split_errors(tfds_dir):
    cfg = _data_config(name="tfds:vdm_tiny_images", data_dir=tfds_dir, tfds__image_size=8)
    ds = build_dataset(cfg)
    resumes_exactly(ds)
    info = ds.info
    assert (info.shape, info.vocab_size, info.num_classes) == ((8, 8, 3), 256, 3)
    record = data.info_record(info)
    assert record["class_names"] == list(CLASSES) and record["stored_shape"] == [10, 12, 3]
    assert record["num_train"] == 40 and record["num_eval"] == 12
    cfg.tfds.eval_split = "validation"
    with pytest.raises(
        ValueError, match=r"eval_split='validation' is not a split.*'train', 'test'"
    ):
        build_dataset(cfg)


@pytest.mark.slow
def test_tfds_dataset_by_name_killed_resumed_and_quiet(tmp_path, tfds_dir):
    run, first = kill_and_resume(
        tmp_path,
        data__name="tfds:vdm_tiny_images",
        data__data_dir=tfds_dir,
        data__tfds__image_size=8,
    )
    assert final_eval(run)["eval/num_examples"] == 12
    # TensorFlow is imported when the dataset is built, before JAX starts: its C++ start-up
    # INFO lines (CPU features, oneDNN, absl's pre-initialisation banner) must not show.
    assert "Starting at step 0" in first
    for noise in ("cpu_feature_guard", "absl::InitializeLog", "oneDNN custom operations"):
        assert noise not in first, first[:2000]
