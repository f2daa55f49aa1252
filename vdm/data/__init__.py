"""Input data: what a dataset is (`get_info`) and its training and evaluation batches.

Three kinds of source, one interface:
  digits                       scikit-learn's 8x8 digits (ships with the package; the default)
  mnist, cifar10, imagenet32/64  tensorflow-datasets pipelines (vdm/data/tfds_images.py)
  gaussian, mixture2d, swirl   known densities (vdm/data/densities.py), continuous data

Batches are dicts of numpy arrays holding this process's rows of the global batch: 'x' (uint8
for images, float32 for continuous data), 'label' int32 for labelled data, 'aug' float32
when augmentation is on; evaluation batches add 'mask' (1 real, 0 padding).
"""

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from vdm.data import densities, memory, tfds_images
from vdm.data.tfds_images import DatasetNotPreparedError

__all__ = ["DatasetInfo", "DatasetNotPreparedError", "eval_batches", "get_info", "train_batches"]

NAMES = ("digits", "mnist", "cifar10", "imagenet32", "imagenet64", "gaussian", "mixture2d", "swirl")


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


_IMAGES = {
    "digits": ((8, 8, 1), memory.DIGITS_VOCAB, 10),
    "mnist": ((28, 28, 1), 256, 10),
    "cifar10": ((32, 32, 3), 256, 10),
    "imagenet32": ((32, 32, 3), 256, 0),
    "imagenet64": ((64, 64, 3), 256, 0),
}


def get_info(cfg) -> DatasetInfo:
    """The DatasetInfo for config.data (`cfg`); reads no data."""
    if cfg.name in _IMAGES:
        shape, vocab, classes = _IMAGES[cfg.name]
        return DatasetInfo(cfg.name, shape, vocab, classes)
    if cfg.name in ("gaussian", "mixture2d", "swirl"):
        dist = densities.get_density(cfg.name, cfg.dim)
        dim = cfg.dim if cfg.name == "gaussian" else 2
        classes = dist.num_classes if dist.labelled else 0
        return DatasetInfo(cfg.name, (dim,), None, classes, log_prob=dist.log_prob)
    raise ValueError(f"Unknown data.name {cfg.name!r}; choose one of {', '.join(NAMES)}.")


def _arrays(cfg, split: str) -> dict:
    if cfg.name == "digits":
        return memory.digits("train" if split == "train" else "test")
    num = cfg.num_train if split == "train" else cfg.num_eval
    return memory.synthetic(cfg.name, cfg.dim if cfg.name == "gaussian" else 2, num, split)


def train_batches(
    cfg, *, seed: int, start_step: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict]:
    """This process's share of every global training batch from `start_step` on.

    Args:
      cfg: config.data (batch_size is the global batch).
      seed: the run's seed; with the step it fixes each batch (resume-safe).
      start_step: the first step to produce a batch for.
      process_index, process_count: this process and how many there are.

    Returns:
      An endless iterator of local batch dicts.
    """
    info = get_info(cfg)
    if cfg.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} must be divisible by the {process_count} processes."
        )
    if cfg.augment and len(info.shape) != 3:
        raise ValueError(f"data.augment needs image data; {cfg.name} has shape {info.shape}.")
    kw = dict(seed=seed, start_step=start_step, process_index=process_index)
    if cfg.name in tfds_images.SOURCES:
        batches = tfds_images.train_batches(cfg.name, info, cfg, process_count=process_count, **kw)
    else:
        batches = memory.train_batches(
            _arrays(cfg, "train"), global_batch=cfg.batch_size, process_count=process_count, **kw
        )
    for step, batch in enumerate(batches, start=start_step):
        if cfg.augment:
            rng = np.random.default_rng([seed, step, process_index, 7])
            batch["x"], batch["aug"] = augment(batch["x"], rng)
        yield batch


def eval_batches(
    cfg, *, batch_size: int, process_index: int = 0, process_count: int = 1, max_examples=-1
) -> Iterator[dict]:
    """The evaluation split once, in a fixed order, as this process's padded batches.

    Args:
      cfg: config.data.
      batch_size: rows per local batch.
      process_index, process_count: this process and how many there are.
      max_examples: use only the split's first max_examples examples (-1: all).

    Returns:
      An iterator of local batch dicts with 'mask'; every process yields as many batches.
    """
    info = get_info(cfg)
    kw = dict(
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        max_examples=max_examples,
    )
    if cfg.name in tfds_images.SOURCES:
        return tfds_images.eval_batches(cfg.name, info, cfg, **kw)
    return memory.eval_batches(_arrays(cfg, "eval"), **kw)


def augment(x: np.ndarray, rng: np.random.Generator, prob: float = 0.5):
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
