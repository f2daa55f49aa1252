"""Input data: a registry of datasets, each built as a `Dataset` (its info and its batches).

Registered sources, one interface:
  digits                         scikit-learn's 8x8 digits (ships with the package; the default)
  mnist, cifar10, imagenet32/64  tensorflow-datasets presets (vdm/data/tfds_images.py)
  tfds:NAME[/CONFIG]             any TFDS image dataset (options in config.data.tfds)
  npz, folder                    a user's .npz arrays or folder of images at data.path
                                 (vdm/data/files.py; options in config.data.npz / .folder)
  gaussian, mixture2d, swirl     known densities (vdm/data/densities.py), continuous data

A dataset factory's keyword options (e.g. gaussian's dim) are its config sub-dict
`config.data.<name>`; the keys shared by all sources (data_dir, prefetch, shuffle_buffer, path,
num_bits, vocab_size) reach a factory when its signature names them, and setting path,
num_bits or vocab_size for a source that does not read it is an error. A new source is one
factory plus `@DATASETS.register(name)`.

Batches are dicts of numpy arrays holding this process's rows of the global batch: 'x' (uint8
for images, int32 for vocabularies above 256, float32 for continuous data), 'label' int32 for
labelled data, 'aug' float32 when augmentation is on; evaluation batches add 'mask' (1 real,
0 padding).

`info_record(info)` is what a run records about its data (workdir/config.json's "dataset").
"""

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vdm.data import densities, files, memory, tfds_images, values
from vdm.data.tfds_images import DatasetNotPreparedError
from vdm.registry import Registry

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "dihedral_augment",
    "in_memory",
    "info_record",
]

# Shared keys that only some sources read, with their "not set" values: setting one for a
# source whose factory does not name it is an error rather than silently ignored.
SOURCE_KEYS = {"path": (None, ""), "num_bits": (0,), "vocab_size": (0,)}
# What eval.split may name: the dataset's evaluation split or its training split.
EVAL_SPLITS = ("eval", "train")


class DatasetRegistry(Registry):
    """The dataset Registry; its build also refuses data.path, data.num_bits or
    data.vocab_size set for a source that does not read them."""

    def build(self, name: str, options=None, **context):
        params = inspect.signature(self.get(name).fn).parameters
        for key, unset in SOURCE_KEYS.items():
            if key in context and context[key] not in unset and key not in params:
                raise ValueError(
                    f"data.{key}={context[key]!r} does not apply to data.name={name!r}; "
                    f"sources that read it: {', '.join(self._reading(key))}."
                )
        return super().build(name, options, **context)

    def _reading(self, key: str) -> list[str]:
        return [
            f"{e.name}:<{e.argument}>" if e.argument else e.name
            for e in self._entries.values()
            if key in inspect.signature(e.fn).parameters
        ]


# The concept is named as the config key that selects it, so errors point at the fix.
DATASETS = DatasetRegistry(
    "data.name",
    context=("data_dir", "prefetch", "shuffle_buffer", "path", "num_bits", "vocab_size"),
)


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
      log_prob_given: exact conditional log-density log p(x | label), (x [N, ...], labels
        [N]) -> [N], for labelled known-density datasets; None otherwise.
      details: further facts found when the dataset was built, JSON-ready (source, path,
        example counts, class names, ...), recorded with the run by `info_record`.
    """

    name: str
    shape: tuple
    vocab_size: int | None
    num_classes: int
    log_prob: Callable | None = dataclasses.field(default=None, repr=False)
    log_prob_given: Callable | None = dataclasses.field(default=None, repr=False)
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


def info_record(info: DatasetInfo) -> dict:
    """The facts a run records about its data: name, shape, vocab_size, num_classes and the
    source's details (e.g. path, example counts, class names, bits), all JSON-ready.

    The run layer writes this as the "dataset" entry of workdir/config.json, so a run on
    inferred data (npz, folder, tfds:NAME) says what was inferred.
    """
    record = {
        "name": info.name,
        "shape": [int(d) for d in info.shape],
        "vocab_size": None if info.vocab_size is None else int(info.vocab_size),
        "num_classes": int(info.num_classes),
    }
    record.update(info.details)
    return record


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset's info and its two batch streams.

    Attributes:
      info: the DatasetInfo.
      train_source: (batch_size, seed, start_step, process_index, process_count) keywords ->
        endless local training batches.
      eval_source: (batch_size, process_index, process_count, max_examples, split)
        keywords -> a split once as padded local batches with 'mask' (split 'eval' is the
        dataset's evaluation split, 'train' its training split).
      split_size: 'eval'|'train' -> the split's number of examples, None when unknown
        without reading it (used for progress and ETA only).
    """

    info: DatasetInfo
    train_source: Callable[..., Iterator[dict]] = dataclasses.field(repr=False)
    eval_source: Callable[..., Iterator[dict]] = dataclasses.field(repr=False)
    split_size: Callable[[str], int | None] = dataclasses.field(
        default=lambda split: None, repr=False
    )

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
        split: str = "eval",
    ) -> Iterator[dict]:
        """A split once, in a fixed order, as this process's padded batches.

        Args:
          batch_size: rows per local batch.
          process_index, process_count: this process and how many there are.
          max_examples: use only the split's first max_examples examples (-1: all).
          split: 'eval' (the dataset's evaluation split) or 'train' (its training split).

        Returns:
          An iterator of local batch dicts with 'mask'; every process yields as many batches.
        """
        if split not in EVAL_SPLITS:
            raise ValueError(f"eval.split={split!r}; use one of {', '.join(EVAL_SPLITS)}.")
        return self.eval_source(
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
            max_examples=max_examples,
            split=split,
        )


def in_memory(info: DatasetInfo, load: Callable[[str], dict]) -> Dataset:
    """A Dataset over arrays held in host memory; `load('train'|'eval')` gives a split."""

    def train_source(*, batch_size, **kw):
        return memory.train_batches(load("train"), global_batch=batch_size, **kw)

    def eval_source(split="eval", **kw):
        return memory.eval_batches(load(split), **kw)

    return Dataset(info, train_source, eval_source, lambda split: len(load(split)["x"]))


@DATASETS.register("digits")
def digits() -> Dataset:
    """scikit-learn's 8x8 digits (17 grey levels, 10 classes), shipped with the package."""
    info = DatasetInfo("digits", (8, 8, 1), memory.DIGITS_VOCAB, 10)
    return in_memory(info, lambda split: memory.digits("train" if split == "train" else "test"))


def reduce_bits(dataset: Dataset, num_bits: int) -> Dataset:
    """The dataset with each value reduced to its top `num_bits` bits (x >> (log2 V - bits)),
    vocabulary 2^num_bits; num_bits 0 returns it unchanged. Padding rows stay zero."""
    info = dataset.info
    shift = values.bit_shift(info.vocab_size, num_bits, info.name)
    if not shift:
        return dataset
    vocab = 2**num_bits
    details = dict(info.details, num_bits=num_bits, stored_vocab_size=info.vocab_size)
    reduced = dataclasses.replace(info, vocab_size=vocab, details=details)
    dtype = values.code_dtype(vocab)

    def shifted(batches):
        for batch in batches:
            batch["x"] = (batch["x"] >> shift).astype(dtype)
            yield batch

    return Dataset(
        reduced,
        lambda **kw: shifted(dataset.train_source(**kw)),
        lambda **kw: shifted(dataset.eval_source(**kw)),
        dataset.split_size,
    )


def _tfds_dataset(source, info, data_dir, prefetch, shuffle_buffer, check_vocab=False):
    common = dict(data_dir=data_dir, prefetch=prefetch)

    def checked(batches):
        for batch in batches:
            if check_vocab and batch["x"].size and batch["x"].max() >= info.vocab_size:
                raise ValueError(
                    f"TFDS dataset '{source.name}' has values up to {batch['x'].max()}, outside "
                    f"[0, {info.vocab_size}) (data.vocab_size)."
                )
            yield batch

    def train_source(**kw):
        return checked(
            tfds_images.train_batches(source, info, shuffle_buffer=shuffle_buffer, **common, **kw)
        )

    def eval_source(**kw):
        return checked(tfds_images.eval_batches(source, info, **common, **kw))

    def split_size(split):
        return info.details.get("num_train" if split == "train" else "num_eval")

    return Dataset(info, train_source, eval_source, split_size)


def _tfds_preset(name: str):
    source, shape, num_classes = tfds_images.PRESETS[name]

    def make(
        data_dir=None, prefetch: int = 2, shuffle_buffer: int = 50_000, num_bits: int = 0
    ) -> Dataset:
        # Static facts: the dataset is read (and its version known) only when first used.
        facts = {"source": "tfds", "tfds_name": source.name, "train_split": source.train_split,
                 "eval_split": source.eval_split, "data_dir": data_dir}  # fmt: skip
        info = DatasetInfo(name, shape, values.EIGHT_BIT, num_classes, details=facts)
        dataset = _tfds_dataset(source, info, data_dir, prefetch, shuffle_buffer)
        return reduce_bits(dataset, num_bits)

    make.__doc__ = f"TFDS {source.name}, prepared offline (8-bit images)."
    return make


for _name in tfds_images.PRESETS:
    DATASETS.register(_name, _tfds_preset(_name))


@DATASETS.register("tfds", argument="source")
def any_tfds(
    source: str,
    data_dir=None,
    prefetch: int = 2,
    shuffle_buffer: int = 50_000,
    num_bits: int = 0,
    vocab_size: int = 0,
    *,
    train_split: str = "train",
    eval_split: str = "test",
    image_key: str = "image",
    label_key: str = "label",
    image_size: int = 0,
    channels: int = 0,
) -> Dataset:
    """Any TFDS image dataset, data.name=tfds:NAME[/CONFIG], prepared offline.

    Args:
      source: the TFDS name (the text after 'tfds:').
      data_dir, prefetch, shuffle_buffer: the shared TFDS keys of config.data.
      num_bits: data.num_bits (0: as stored).
      vocab_size: data.vocab_size (0: 256 for uint8 images).
      train_split, eval_split: TFDS split names or slices ('train[:95%]').
      image_key: the image feature.
      label_key: the ClassLabel feature used as labels ('' for none; the default 'label' is
        skipped when the dataset has no such feature).
      image_size: 0 keeps the stored size; s > 0 crops each image to its centred square and
        shrinks it to s x s by area (box-filter) averaging.
      channels: 0 as stored (RGBA loses alpha), 1 greyscale, 3 RGB.
    """
    spec = tfds_images.TfdsSource(
        source, train_split, eval_split, image_key, label_key, image_size, channels
    )
    found = tfds_images.describe(spec, data_dir, vocab_size)
    info = DatasetInfo(
        f"tfds:{source}",
        found["shape"],
        found["vocab_size"],
        found["num_classes"],
        details=found["facts"],
    )
    dataset = _tfds_dataset(
        spec, info, data_dir, prefetch, shuffle_buffer, check_vocab=bool(vocab_size)
    )
    return reduce_bits(dataset, num_bits)


def _from_files(name: str, loaded, num_bits: int) -> Dataset:
    splits, vocab, num_classes, facts = loaded
    info = DatasetInfo(name, splits["train"]["x"].shape[1:], vocab, num_classes, details=facts)
    return reduce_bits(in_memory(info, lambda split: splits[split]), num_bits)


@DATASETS.register("npz")
def npz(path=None, num_bits: int = 0, vocab_size: int = 0, *, eval_fraction: float = 0.1):
    """A numpy .npz archive at data.path: arrays train, test (or eval), optional labels.

    Args:
      path: data.path, the .npz file.
      num_bits: data.num_bits (0: as stored).
      vocab_size: data.vocab_size (0: 256 for integer arrays; needed for float arrays).
      eval_fraction: the fraction of train held out (fixed permutation) when the archive has
        no test/eval array.
    """
    loaded = files.load_npz(path, vocab_size=vocab_size, eval_fraction=eval_fraction)
    return _from_files("npz", loaded, num_bits)


@DATASETS.register("folder")
def folder(
    path=None,
    num_bits: int = 0,
    vocab_size: int = 0,
    *,
    image_size: int = 0,
    channels: int = 0,
    eval_fraction: float = 0.1,
) -> Dataset:
    """A folder of PNG/JPEG images at data.path; class sub-folders become labels.

    Args:
      path: data.path, the folder (with train/ and test/ or eval/ folders, or one pool).
      num_bits: data.num_bits (0: as stored).
      vocab_size: data.vocab_size (0: 256).
      image_size: 0 keeps the images' size (they must agree); s > 0 crops each image to its
        centred square and shrinks it to s x s by area (box-filter) averaging.
      channels: 0 greyscale if every image is, else RGB; 1 greyscale; 3 RGB.
      eval_fraction: the fraction held out (fixed permutation) without a test/ or eval/ folder.
    """
    loaded = files.load_folder(
        path,
        image_size=image_size,
        channels=channels,
        vocab_size=vocab_size,
        eval_fraction=eval_fraction,
    )
    return _from_files("folder", loaded, num_bits)


def _known_density(name: str, dim: int, num_train: int, num_eval: int) -> Dataset:
    dist = densities.get_density(name, dim)
    classes = dist.num_classes if dist.labelled else 0
    info = DatasetInfo(
        name,
        (dim,),
        None,
        classes,
        log_prob=dist.log_prob,
        log_prob_given=dist.log_prob_given if dist.labelled else None,
    )

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
