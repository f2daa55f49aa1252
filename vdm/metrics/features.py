"""Feature networks for sample-quality metrics: a registry (`FEATURES`) of extractors.

`sample.metrics.features` selects one; its options are `sample.metrics.<name>.*`:

  digits_classifier  the small MLP of digits_classifier.py, trained on the digits train split
                     on first use and cached (no download); 64-d features and class predictions
  inception          Inception-v3 pool3 (2048-d), the standard FID features, from a local
                     weights file (sample.metrics.inception.weights)

A factory is called with the dataset's `info` and a `storage` (supplied by the run layer,
which owns the files): `storage.cached(name, make)` returns the bytes of a cache file,
calling `make()` and saving its result when the file is absent, and `storage.read_npz(path,
option)` reads a weights file given by a config option. Both raise UserError with the fix
when a file is missing or unreadable. A factory returns a `FeatureNet`.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import serialization

from vdm.errors import UserError
from vdm.metrics import digits_classifier as dc
from vdm.metrics import inception as inception_lib
from vdm.registry import Registry

FEATURES = Registry("feature network", context=("info", "storage"))

INCEPTION_HELP = (
    "convert the standard FID Inception weights once on a machine with internet: "
    "python -m experiments.convert_inception --download --out=inception_fid.npz "
    "(README, 'Sample quality')"
)


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """A feature extractor for integer-coded images.

    Attributes:
      name: the FEATURES name.
      fingerprint: a digest of its weights (reference statistics are cached per fingerprint).
      embed: codes [N, ...] -> (features [N, d] float64, predicted classes [N] or None).
      details: JSON-ready facts for the record (e.g. the classifier's test accuracy).
    """

    name: str
    fingerprint: str
    embed: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    details: dict = dataclasses.field(default_factory=dict)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@FEATURES.register("digits_classifier")
def digits_classifier(
    info,
    storage,
    *,
    hidden: int = 128,
    feature_dim: int = 64,
    steps: int = 400,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> FeatureNet:
    """MLP classifier on the digits train split (trained in seconds, cached); 64-d features."""
    from vdm.data import memory

    if tuple(info.shape) != (8, 8, 1) or info.num_classes != 10 or not info.vocab_size:
        raise UserError(
            f"sample.metrics.features=digits_classifier needs the 8x8 digits (data.name=digits);"
            f" data.name={info.name!r} has shape {tuple(info.shape)}: use "
            "sample.metrics.features=inception."
        )
    options = dc.TrainOptions(hidden, feature_dim, steps, learning_rate, weight_decay, seed)
    key = _digest(json.dumps(dataclasses.asdict(options), sort_keys=True).encode())[:8]

    def make() -> bytes:  # trains on the full 17 grey levels, whatever the run's data.num_bits
        train, test = memory.digits("train"), memory.digits("test")
        params = dc.train(train["x"], train["label"], memory.DIGITS_VOCAB, options)
        acc = dc.accuracy(params, test["x"], test["label"], memory.DIGITS_VOCAB)
        meta = dict(dataclasses.asdict(options), test_accuracy=acc)
        return serialization.msgpack_serialize({"params": params, "meta": meta})

    name = f"digits_classifier_{key}.msgpack"
    data = storage.cached(name, make)
    try:
        stored = serialization.msgpack_restore(data)
        params, meta = stored["params"], stored["meta"]
    except Exception as err:  # truncated or overwritten: msgpack raises several types
        raise UserError(
            f"the cached digits classifier {storage.path(name)} is corrupt ({type(err).__name__});"
            " delete it and it is retrained on the next call."
        ) from err
    vocab = info.vocab_size
    return FeatureNet(
        "digits_classifier",
        _digest(data),
        lambda codes: dc.features_and_predictions(params, codes, vocab),
        {"classifier_test_accuracy": float(meta["test_accuracy"]), "file": storage.path(name)},
    )


@FEATURES.register("inception")
def inception(info, storage, *, weights: str = "", batch_size: int = 50) -> FeatureNet:
    """Inception-v3 pool3 features (2048-d) from a converted local weights file."""
    if len(info.shape) != 3 or not info.vocab_size:
        raise UserError(
            f"sample.metrics.features=inception needs image data; data.name={info.name!r} has "
            f"shape {tuple(info.shape)}."
        )
    if not weights:
        raise UserError(
            "sample.metrics.features=inception needs sample.metrics.inception.weights=FILE.npz "
            f"(nothing is downloaded at run time); {INCEPTION_HELP}."
        )
    arrays, fingerprint = storage.read_npz(weights, "sample.metrics.inception.weights")
    check_inception_arrays(arrays, weights)
    variables = inception_lib.unflatten(arrays)
    scale = 1.0 / (info.vocab_size - 1)

    def embed(codes):
        images = np.asarray(codes, np.float32) * scale
        return inception_lib.features(variables, images, batch_size=batch_size), None

    return FeatureNet("inception", fingerprint, embed, {"weights": str(weights)})


def check_inception_arrays(arrays: dict[str, Any], path: str) -> None:
    """Raises UserError listing the arrays a weights file lacks or holds in the wrong shape."""
    want = inception_lib.expected_shapes()
    missing = sorted(set(want) - set(arrays))
    common = sorted(set(want) & set(arrays))
    wrong = [f"{k} {arrays[k].shape} (want {want[k]})" for k in common
             if tuple(arrays[k].shape) != want[k]]  # fmt: skip
    if missing or wrong:
        bad = wrong + missing
        listed = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise UserError(
            f"sample.metrics.inception.weights={path} is not an Inception-v3 FID weights file "
            f"({len(missing)} arrays missing, {len(wrong)} of the wrong shape: {listed}); "
            f"{INCEPTION_HELP}."
        )
