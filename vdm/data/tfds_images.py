"""tensorflow-datasets pipelines for the image datasets (mnist, cifar10, downsampled ImageNet).

Each process reads only its share of a split (`tfds.even_splits`). Training order is fixed by
(seed, step): the process's share is reshuffled every epoch with seed (seed, epoch) and the
local example stream is the concatenation of those epochs, so a run resumed at step s starts
at epoch s b // n and skips only the rest of that epoch (never the whole history). Images stay
uint8 all the way to the device. Nothing here downloads: an unprepared dataset raises
`DatasetNotPreparedError` saying how to prepare it offline.
"""

import math

import numpy as np

# name -> (TFDS name, train split, eval split). The downsampled ImageNet in TFDS is the older
# (not anti-aliased) version of van den Oord et al. 2016, the one the VDM paper reports on.
SOURCES = {
    "mnist": ("mnist", "train", "test"),
    "cifar10": ("cifar10", "train", "test"),
    "imagenet32": ("downsampled_imagenet/32x32", "train", "validation"),
    "imagenet64": ("downsampled_imagenet/64x64", "train", "validation"),
}


class DatasetNotPreparedError(FileNotFoundError):
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


def _builder(name: str, data_dir):
    import tensorflow_datasets as tfds

    return tfds.builder(SOURCES[name][0], data_dir=data_dir)


def _read(builder, split, data_dir):
    """builder.as_dataset(split) in file order, with TFDS's 'no data' error made actionable."""
    import tensorflow_datasets as tfds

    try:
        return builder.as_dataset(
            split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)
        )
    except AssertionError as err:  # TFDS's "could not find data in ..." for unprepared data
        full_name = builder.name + (
            f"/{builder.builder_config.name}" if builder.builder_config else ""
        )
        raise DatasetNotPreparedError(_prepare_hint(full_name, data_dir)) from err


def _to_example(shape, with_label: bool):
    import tensorflow as tf

    def convert(ex):
        # ensure_shape makes a wrongly sized dataset fail here, not deep inside the model.
        out = {"x": tf.ensure_shape(tf.cast(ex["image"], tf.uint8), shape)}
        if with_label:
            out["label"] = tf.cast(ex["label"], tf.int32)
        return out

    return convert


def _options():
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    return options


def train_batches(
    name, info, *, batch_size, data_dir, shuffle_buffer, prefetch, seed, start_step,
    process_index, process_count,
):  # fmt: skip
    """Endless local training batches (numpy dicts) of a global `batch_size` from `start_step`."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")  # input pipelines never take accelerator memory
    builder = _builder(name, data_dir)
    split = tfds.even_splits(SOURCES[name][1], n=process_count, drop_remainder=True)
    share = _read(builder, split[process_index], data_dir)
    share = share.map(_to_example(info.shape, info.num_classes > 0))
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
    name, info, *, data_dir, prefetch, batch_size, process_index, process_count, max_examples
):
    """The eval split once, this process's share, as padded batches with a 'mask'.

    Every process yields ceil(ceil(N / P) / b) batches (its share has floor or ceil of N / P
    examples), padding with zero images of mask 0, so they stay in step for collectives.
    """
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir)
    split = SOURCES[name][2]
    n = int(_read(builder, split, data_dir).cardinality())
    if max_examples >= 0 and max_examples < n:
        split, n = f"{split}[:{max_examples}]", max_examples
    num_batches = math.ceil(math.ceil(n / process_count) / batch_size)
    share = _read(builder, tfds.even_splits(split, n=process_count)[process_index], data_dir)
    share = share.map(_to_example(info.shape, info.num_classes > 0)).with_options(_options())
    batches = tfds.as_numpy(share.batch(batch_size).prefetch(max(prefetch, 1)))
    template = {"x": np.zeros((batch_size, *info.shape), np.uint8)}
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
