"""Input data: a registry of datasets, each built as a `Dataset` (its info and its batches).

Registered sources, one interface:
  digits                         scikit-learn's 8x8 digits (ships with the package; the default)
  mnist, cifar10, imagenet32/64  tensorflow-datasets pipelines (vdm/data/tfds_images.py)
  gaussian, mixture2d, swirl     known densities (vdm/data/densities.py), continuous data

A dataset factory's keyword options (e.g. gaussian's dim) are its config sub-dict
`config.data.<name>`; the keys shared by all sources (data_dir, prefetch, shuffle_buffer)
reach a factory when its signature names them. A new source is one factory plus
`@DATASETS.register(name)`.

Batches are dicts of numpy arrays holding this process's rows of the global batch: 'x' (uint8
for images, float32 for continuous data), 'label' int32 for labelled data, 'aug' float32
when augmentation is on; evaluation batches add 'mask' (1 real, 0 padding).
"""

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from vdm.data import densities, memory, tfds_images
from vdm.data.tfds_images import DatasetNotPreparedError
from vdm.registry import Registry

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "DatasetNotPreparedError", "dihedral_augment"]

# The concept is named as the config key that selects it, so errors point at the fix.
DATASETS = Registry("data.name", context=("data_dir", "prefetch", "shuffle_buffer"))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset (known without reading it).

    Attributes:
      name: the config's data.name.
      shape: one example's shape, e.g. (32, 32, 3) or (2,).
      vocab_size: number of integer values per sub-pixel; None for continuous data.
      num_classes: number of labels (0 when unlabelled).
      log_prob: exact log-density (nats) of a batch of examples [N, ...] -> [N], for the
        known-density datasets; None otherwise.
    """

    name: str
    shape: tuple
    vocab_size: int | None
    num_classes: int
    log_prob: Callable | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset's info and its two batch streams.

    Attributes:
      info: the DatasetInfo.
      train_source: (batch_size, seed, start_step, process_index, process_count) keywords ->
        endless local training batches.
      eval_source: (batch_size, process_index, process_count, max_examples) keywords ->
        the eval split once as padded local batches with 'mask'.
    """

    info: DatasetInfo
    train_source: Callable[..., Iterator[dict]] = dataclasses.field(repr=False)
    eval_source: Callable[..., Iterator[dict]] = dataclasses.field(repr=False)

    def train_batches(
        self,
        *,
        batch_size: int,
        seed: int,
        start_step: int,
        process_index: int = 0,
        process_count: int = 1,
        augment: bool = False,
    ) -> Iterator[dict]:
        """This process's share of every global training batch from `start_step` on.

        Args:
          batch_size: the global batch size.
          seed: the run's seed; with the step it fixes each batch (resume-safe).
          start_step: the first step to produce a batch for.
          process_index, process_count: this process and how many there are.
          augment: the paper's dihedral augmentation, with its flag as 'aug'.

        Returns:
          An endless iterator of local batch dicts.
        """
        if batch_size % process_count:
            raise ValueError(
                f"data.batch_size={batch_size} must be divisible by the {process_count} processes."
            )
        if augment and len(self.info.shape) != 3:
            raise ValueError(
                f"data.augment needs image data; {self.info.name} has shape {self.info.shape}."
            )
        batches = self.train_source(
            batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            process_index=process_index,
            process_count=process_count,
        )
        for step, batch in enumerate(batches, start=start_step):
            if augment:
                rng = np.random.default_rng([seed, step, process_index, 7])
                batch["x"], batch["aug"] = dihedral_augment(batch["x"], rng)
            yield batch

    def eval_batches(
        self,
        *,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        max_examples: int = -1,
    ) -> Iterator[dict]:
        """The evaluation split once, in a fixed order, as this process's padded batches.

        Args:
          batch_size: rows per local batch.
          process_index, process_count: this process and how many there are.
          max_examples: use only the split's first max_examples examples (-1: all).

        Returns:
          An iterator of local batch dicts with 'mask'; every process yields as many batches.
        """
        return self.eval_source(
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
        )


def in_memory(info: DatasetInfo, load: Callable[[str], dict]) -> Dataset:
    """A Dataset over arrays held in host memory; `load('train'|'eval')` gives a split."""

    def train_source(*, batch_size, **kw):
        return memory.train_batches(load("train"), global_batch=batch_size, **kw)

    def eval_source(**kw):
        return memory.eval_batches(load("eval"), **kw)

    return Dataset(info, train_source, eval_source)


@DATASETS.register("digits")
def digits() -> Dataset:
    """scikit-learn's 8x8 digits (17 grey levels, 10 classes), shipped with the package."""
    info = DatasetInfo("digits", (8, 8, 1), memory.DIGITS_VOCAB, 10)
    return in_memory(info, lambda split: memory.digits("train" if split == "train" else "test"))


def _tfds(name: str, shape: tuple, num_classes: int):
    def make(data_dir=None, prefetch: int = 2, shuffle_buffer: int = 50_000) -> Dataset:
        info = DatasetInfo(name, shape, 256, num_classes)
        common = dict(data_dir=data_dir, prefetch=prefetch)

        def train_source(**kw):
            return tfds_images.train_batches(
                name, info, shuffle_buffer=shuffle_buffer, **common, **kw
            )

        def eval_source(**kw):
            return tfds_images.eval_batches(name, info, **common, **kw)

        return Dataset(info, train_source, eval_source)

    make.__doc__ = f"TFDS {tfds_images.SOURCES[name][0]}, prepared offline (8-bit images)."
    return make


for _name, _shape, _classes in (
    ("mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("imagenet32", (32, 32, 3), 0),
    ("imagenet64", (64, 64, 3), 0),
):
    DATASETS.register(_name, _tfds(_name, _shape, _classes))


def _known_density(name: str, dim: int, num_train: int, num_eval: int) -> Dataset:
    dist = densities.get_density(name, dim)
    classes = dist.num_classes if dist.labelled else 0
    info = DatasetInfo(name, (dim,), None, classes, log_prob=dist.log_prob)

    def load(split):
        num = num_train if split == "train" else num_eval
        return memory.synthetic(name, dim, num, split)

    return in_memory(info, load)


@DATASETS.register("gaussian")
def gaussian(*, dim: int = 2, num_train: int = 50_000, num_eval: int = 10_000) -> Dataset:
    """A correlated Gaussian of `dim` dimensions (known density)."""
    return _known_density("gaussian", dim, num_train, num_eval)


@DATASETS.register("mixture2d")
def mixture2d(*, num_train: int = 50_000, num_eval: int = 10_000) -> Dataset:
    """An 8-component 2-d Gaussian mixture, labelled by component (known density)."""
    return _known_density("mixture2d", 2, num_train, num_eval)


@DATASETS.register("swirl")
def swirl(*, num_train: int = 50_000, num_eval: int = 10_000) -> Dataset:
    """A 2-d swirl: a noisy spiral curve (known density)."""
    return _known_density("swirl", 2, num_train, num_eval)


def dihedral_augment(x: np.ndarray, rng: np.random.Generator, prob: float = 0.5):
    """The paper's augmentation: each image, with probability `prob`, gets a random one of
    the 7 non-identity flips/90-degree rotations (the dihedral group of the square).

    Returns:
      (augmented images, flag float32 [B]: 1 where the image was transformed), the flag being
      what the augmented model is conditioned on, so sampling with flag 0 gives clean images.
    """
    n = len(x)
    transform = np.where(rng.uniform(size=n) < prob, rng.integers(1, 8, size=n), 0)
    out = x.copy()
    for i in np.nonzero(transform)[0]:
        img = np.rot90(x[i], k=transform[i] % 4, axes=(0, 1))
        out[i] = img[:, ::-1] if transform[i] >= 4 else img
    return out, (transform > 0).astype(np.float32)
