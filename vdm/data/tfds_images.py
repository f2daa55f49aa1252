"""tensorflow-datasets pipelines: the image presets (mnist, cifar10, downsampled ImageNet) and
any TFDS image dataset (data.name=tfds:NAME[/CONFIG]), one code path for both.

Each process reads only its share of a split (`tfds.even_splits`). Training order is fixed by
(seed, step): the process's share is reshuffled every epoch with seed (seed, epoch) and the
local example stream is the concatenation of those epochs, so a run resumed at step s starts
at epoch s b // n and skips only the rest of that epoch (never the whole history). Images stay
integers all the way to the device. Nothing here downloads: an unprepared dataset raises
`DatasetNotPreparedError` saying how to prepare it offline.

Preprocessing (`TfdsSource`): each example's image feature `image_key` (and its ClassLabel
`label_key`, when the dataset has one) is taken; `channels` 1 converts to greyscale
(tf.image.rgb_to_grayscale, ITU-R 601 luma) and 3 to RGB (alpha dropped); with `image_size`
> 0 the image is cropped to its centred square and shrunk to image_size x image_size by area
averaging (tf.image.resize method 'area', a box filter), the usual preprocessing for
likelihood work on CelebA, LSUN and similar, then rounded back to integers.
"""

import dataclasses
import math

import numpy as np

from vdm.data import values
from vdm.errors import UserError


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """Which TFDS dataset to read and how to make its examples into images.

    Attributes:
      name: the TFDS name, NAME or NAME/CONFIG (optionally :VERSION), as `tfds build` takes it.
      train_split, eval_split: TFDS split names or slices (e.g. 'train[:95%]').
      image_key: the image feature.
      label_key: the ClassLabel feature ('' for none; 'label' is skipped when absent).
      image_size: 0 keeps the stored size; s > 0 centre-crops to a square and area-resizes
        to s x s.
      channels: 0 keeps the stored channels; 1 greyscale; 3 RGB.
    """

    name: str
    train_split: str = "train"
    eval_split: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    image_size: int = 0
    channels: int = 0


# data.name -> (source, image shape, classes). The downsampled ImageNet in TFDS is the older
# (not anti-aliased) version of van den Oord et al. 2016, the one the VDM paper reports on.
# Their facts are known without reading the data, so a run can be assembled (e.g. to count
# parameters) where the data is not prepared.
PRESETS = {
    "mnist": (TfdsSource("mnist"), (28, 28, 1), 10),
    "cifar10": (TfdsSource("cifar10"), (32, 32, 3), 10),
    "imagenet32": (
        TfdsSource("downsampled_imagenet/32x32", eval_split="validation", label_key=""),
        (32, 32, 3),
        0,
    ),
    "imagenet64": (
        TfdsSource("downsampled_imagenet/64x64", eval_split="validation", label_key=""),
        (64, 64, 3),
        0,
    ),
}


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """A TFDS dataset is not in data_dir, and this code never downloads at run time."""


def _prepare_hint(tfds_name: str, data_dir) -> str:
    where = data_dir or "~/tensorflow_datasets (the TFDS default)"
    return (
        f"TFDS dataset '{tfds_name}' is not prepared in {where}. Nothing is downloaded at run "
        "time. On a machine with internet access run\n"
        f"  tfds build {tfds_name} --data_dir=DIR\n"
        "(downsampled_imagenet fetches its archives from image-net.org), copy DIR to this "
        "machine and pass --config.data.data_dir=DIR."
    )


def _tf():
    """TensorFlow, kept off the accelerators (input pipelines never take their memory)."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def full_name(name: str, data_dir) -> str:
    """The TFDS name with config and version (e.g. 'cifar10/3.0.2') that the pipeline reads,
    for records that must say which version a figure is on; the bare name if TFDS knows none."""
    try:
        return _builder(name, data_dir).info.full_name
    except DatasetNotPreparedError:
        return name


def _builder(name: str, data_dir):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        # Neither a dataset TFDS knows nor one prepared (e.g. a custom builder) in data_dir.
        raise DatasetNotPreparedError(
            f"TFDS knows no dataset '{name}' and none is prepared under "
            f"{data_dir or '~/tensorflow_datasets'} (data.name=tfds:{name}). Check the name "
            "(as `tfds build NAME[/CONFIG]` takes it) and --config.data.data_dir.\n"
            + _prepare_hint(name, data_dir)
        ) from err


def _full_name(builder) -> str:
    return builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")


def _read(builder, split, data_dir):
    """builder.as_dataset(split) in file order, with TFDS's 'no data' error made actionable."""
    import tensorflow_datasets as tfds

    try:
        return builder.as_dataset(
            split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)
        )
    except AssertionError as err:  # TFDS's "could not find data in ..." for unprepared data
        raise DatasetNotPreparedError(_prepare_hint(_full_name(builder), data_dir)) from err


def describe(source: TfdsSource, data_dir, vocab_size: int = 0) -> dict:
    """What a TFDS dataset holds, read from its metadata; fails at once when it is not
    prepared or does not fit `source`.

    Args:
      source: the dataset and its preprocessing.
      data_dir: the TFDS data_dir (None: TFDS's default).
      vocab_size: data.vocab_size (0: 256, the range of 8-bit images).

    Returns:
      {'shape', 'vocab_size', 'num_classes', 'facts'}: the preprocessed image shape, the
      vocabulary, the number of classes (0: unlabelled) and further facts to record
      (TFDS full name, splits and their sizes, class names).

    Raises:
      DatasetNotPreparedError: the dataset is not in data_dir (with the `tfds build` command).
      ValueError: a missing feature, an unknown split, a bad option.
    """
    _tf()
    import tensorflow_datasets as tfds

    if source.image_size < 0:
        raise ValueError(f"data.tfds.image_size={source.image_size} must be >= 0 (0: as stored).")
    if source.channels not in (0, 1, 3):
        raise ValueError(f"data.tfds.channels={source.channels} must be 0 (as stored), 1 or 3.")
    builder = _builder(source.name, data_dir)
    full = _full_name(builder)
    features = builder.info.features
    if source.image_key not in features:
        raise ValueError(
            f"TFDS dataset '{full}' has no feature {source.image_key!r} "
            f"(data.tfds.image_key); it has {', '.join(features.keys())}."
        )
    image = features[source.image_key]
    shape = tuple(getattr(image, "shape", ()) or ())
    if len(shape) != 3 or shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Feature {source.image_key!r} of TFDS dataset '{full}' is not an image "
            f"(shape {shape}); set data.tfds.image_key to its image feature."
        )
    dtype = np.dtype(image.np_dtype)
    if dtype == np.uint8:
        vocab = vocab_size or values.EIGHT_BIT
    elif vocab_size:
        vocab = vocab_size
    else:
        raise ValueError(
            f"Images of TFDS dataset '{full}' are {dtype}; set data.vocab_size to the number "
            "of values per sub-pixel."
        )
    if source.image_size:
        height = width = source.image_size
    elif None in shape[:2]:
        raise ValueError(
            f"Images of TFDS dataset '{full}' vary in size ({shape}); set data.tfds.image_size "
            "to centre-crop and resize them to one square size."
        )
    else:
        height, width = shape[:2]
    channels = source.channels or (3 if shape[-1] == 4 else shape[-1])
    num_classes, class_names = 0, None
    if source.label_key and (source.label_key in features or source.label_key != "label"):
        label = features[source.label_key] if source.label_key in features else None
        if label is None or not isinstance(label, tfds.features.ClassLabel):
            what = "has no feature" if label is None else "has a non-ClassLabel feature"
            raise ValueError(
                f"TFDS dataset '{full}' {what} {source.label_key!r} (data.tfds.label_key); "
                f"its features are {', '.join(features.keys())}. Set data.tfds.label_key to a "
                "ClassLabel feature, or '' for unlabelled data."
            )
        num_classes, class_names = label.num_classes, list(label.names)
    counts = {}
    for key, split in (("train_split", source.train_split), ("eval_split", source.eval_split)):
        try:
            counts[key] = int(_read(builder, split, data_dir).cardinality())
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"data.tfds.{key}={split!r} is not a split of TFDS dataset '{full}': {err}"
            ) from err
        if counts[key] == 0:
            raise ValueError(f"data.tfds.{key}={split!r} of TFDS dataset '{full}' is empty.")
    facts = {
        "source": "tfds",
        "tfds_name": builder.info.full_name,
        "train_split": source.train_split,
        "eval_split": source.eval_split,
        "num_train": counts["train_split"],
        "num_eval": counts["eval_split"],
        "stored_shape": [d if d is not None else -1 for d in shape],
    }
    if class_names:
        facts["class_names"] = class_names
    return {
        "shape": (height, width, channels),
        "vocab_size": vocab,
        "num_classes": num_classes,
        "facts": facts,
    }


def _to_example(source: TfdsSource, info):
    """The per-example map: image -> 'x' (channels, crop and resize), label -> 'label'."""
    import tensorflow as tf

    dtype = tf.as_dtype(values.code_dtype(info.vocab_size))
    size, channels = source.image_size, info.shape[-1]

    def convert(ex):
        image = ex[source.image_key]
        stored = image.shape[-1]
        if stored == 4:
            image = image[..., :3]  # alpha carries no image content
        if channels == 1 and image.shape[-1] == 3:
            image = tf.image.rgb_to_grayscale(image)
        elif channels == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if size:
            height, width = tf.shape(image)[0], tf.shape(image)[1]
            side = tf.minimum(height, width)
            image = tf.image.crop_to_bounding_box(
                image, (height - side) // 2, (width - side) // 2, side, side
            )
            image = tf.image.resize(image, (size, size), method="area")
            image = tf.clip_by_value(tf.round(image), 0.0, float(dtype.max))
        # ensure_shape makes a wrongly sized dataset fail here, not deep inside the model.
        out = {"x": tf.ensure_shape(tf.cast(image, dtype), info.shape)}
        if info.num_classes > 0:
            out["label"] = tf.cast(ex[source.label_key], tf.int32)
        return out

    return convert


def _options():
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    return options


def train_batches(
    source, info, *, batch_size, data_dir, shuffle_buffer, prefetch, seed, start_step,
    process_index, process_count,
):  # fmt: skip
    """Endless local training batches (numpy dicts) of a global `batch_size` from `start_step`.

    Args:
      source: the TfdsSource.
      info: the DatasetInfo of the images it makes (shape, vocab_size, num_classes).
    """
    import tensorflow_datasets as tfds

    tf = _tf()
    builder = _builder(source.name, data_dir)
    split = tfds.even_splits(source.train_split, n=process_count, drop_remainder=True)
    share = _read(builder, split[process_index], data_dir)
    share = share.map(_to_example(source, info))
    n_local = int(share.cardinality())
    local = batch_size // process_count
    if n_local < local:
        raise ValueError(f"data.batch_size={batch_size} exceeds the training set.")
    first_example = start_step * local
    first_epoch = first_example // n_local

    def epoch(e):
        # A tensor seed derived from (seed, epoch): every epoch gets its own fixed order.
        return share.shuffle(
            min(shuffle_buffer, n_local),
            seed=seed * 1_000_003 + e,
            reshuffle_each_iteration=False,
        )

    epochs = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
    ds = epochs.skip(first_example - first_epoch * n_local).batch(local, drop_remainder=True)
    ds = ds.with_options(_options()).prefetch(max(prefetch, 1))
    yield from tfds.as_numpy(ds)


def eval_batches(
    source,
    info,
    *,
    data_dir,
    prefetch,
    batch_size,
    process_index,
    process_count,
    max_examples,
    split="eval",
):
    """The eval split (or, split='train', the training split) once, this process's share, as
    padded batches with a 'mask'.

    Every process yields ceil(ceil(N / P) / b) batches (its share has floor or ceil of N / P
    examples), padding with zero images of mask 0, so they stay in step for collectives.
    """
    import tensorflow_datasets as tfds

    _tf()
    builder = _builder(source.name, data_dir)
    split = source.train_split if split == "train" else source.eval_split
    n = int(_read(builder, split, data_dir).cardinality())
    if max_examples >= 0 and max_examples < n:
        if "[" in split or "+" in split:
            raise ValueError(
                f"eval.max_examples={max_examples} cannot cap the sliced eval split {split!r}; "
                "put the cap in the slice (e.g. 'test[:1000]') and set eval.max_examples=-1."
            )
        split, n = f"{split}[:{max_examples}]", max_examples
    num_batches = math.ceil(math.ceil(n / process_count) / batch_size)
    share = _read(builder, tfds.even_splits(split, n=process_count)[process_index], data_dir)
    share = share.map(_to_example(source, info)).with_options(_options())
    batches = tfds.as_numpy(share.batch(batch_size).prefetch(max(prefetch, 1)))
    template = {"x": np.zeros((batch_size, *info.shape), values.code_dtype(info.vocab_size))}
    if info.num_classes > 0:
        template["label"] = np.zeros((batch_size,), np.int32)
    count = 0
    for batch in batches:
        yield _pad(batch, template)
        count += 1
    for _ in range(count, num_batches):  # shares one example short of the largest one
        yield _pad({k: v[:0] for k, v in template.items()}, template)


def _pad(batch, template):
    """`batch` completed to the template's size with its zero rows, plus a 'mask'."""
    size, real = len(template["x"]), len(batch["x"])
    out = {k: np.concatenate([v, template[k][real:]]) for k, v in batch.items()}
    out["mask"] = (np.arange(size) < real).astype(np.float32)
    return out
