"""The digits feature network: deterministic, accurate, cached, and refused for other data."""

import numpy as np
import pytest
from flax import serialization

from vdm.data import DatasetInfo, memory
from vdm.errors import UserError
from vdm.metrics import digits_classifier as dc
from vdm.metrics import features, frechet
from vdm.run.sample_metrics import Storage

DIGITS = DatasetInfo("digits", (8, 8, 1), memory.DIGITS_VOCAB, 10)


@pytest.fixture(scope="module")
def trained():
    train = memory.digits("train")
    return dc.train(train["x"], train["label"], memory.DIGITS_VOCAB)


# Trains the classifier twice (with the module fixture): 5.2 s at -O0 against 3.7 s at -O1.
@pytest.mark.run_bound
def test_training_is_deterministic_and_beats_90_percent_test_accuracy(trained):
    train, test = memory.digits("train"), memory.digits("test")
    again = dc.train(train["x"], train["label"], memory.DIGITS_VOCAB)
    assert serialization.to_bytes(again) == serialization.to_bytes(trained)
    acc = dc.accuracy(trained, test["x"], test["label"], memory.DIGITS_VOCAB)
    assert acc > 0.9, acc  # measured: 0.983 on the 297 test images
    shuffled = np.random.default_rng(0).permutation(test["label"])
    assert dc.accuracy(trained, test["x"], shuffled, memory.DIGITS_VOCAB) < 0.3


def test_features_separate_the_test_split_from_noise(trained):
    test = memory.digits("test")
    feats, _ = dc.features_and_predictions(trained, test["x"], memory.DIGITS_VOCAB)
    assert feats.shape == (297, 64)
    noise = np.random.default_rng(0).integers(0, 17, test["x"].shape)
    noise_feats, _ = dc.features_and_predictions(trained, noise, memory.DIGITS_VOCAB)
    half = len(feats) // 2
    same = frechet.fid(feats[:half], feats[half:])
    assert frechet.fid(feats, noise_feats) > 10 * same


def test_the_network_is_trained_once_then_read_from_its_cache_file(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    options = dict(steps=30)  # a short training: only the caching is under test
    first = features.FEATURES.build("digits_classifier", options, info=DIGITS, storage=storage)
    (cached,) = tmp_path.glob("digits_classifier_*.msgpack")
    assert first.details["file"] == str(cached)

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache file exists")

    monkeypatch.setattr(dc, "train", no_training)
    second = features.FEATURES.build("digits_classifier", options, info=DIGITS, storage=storage)
    assert second.fingerprint == first.fingerprint
    x = memory.digits("test")["x"][:10]
    np.testing.assert_array_equal(first.embed(x)[0], second.embed(x)[0])

    cached.write_bytes(cached.read_bytes()[:100])  # truncated, e.g. by a full disk
    with pytest.raises(UserError, match="corrupt.*delete it"):
        features.FEATURES.build("digits_classifier", options, info=DIGITS, storage=storage)


def test_other_data_is_refused_with_the_alternative(tmp_path):
    cifar = DatasetInfo("cifar10", (32, 32, 3), 256, 10)
    with pytest.raises(UserError, match="features=inception"):
        features.FEATURES.build("digits_classifier", {}, info=cifar, storage=Storage(tmp_path))
