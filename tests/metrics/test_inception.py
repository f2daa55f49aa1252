"""Inception-v3 (FID variant) with random weights: shapes, resizing, batch invariance, FID
properties on its features, and the weights file's checks.

Most tests run the network at 75x75 (its smallest input) to stay fast on a CPU; one runs the
standard 299x299 path from 8x8 grey images. The parameter shapes do not depend on the size.
"""

import numpy as np
import pytest

from vdm.data import DatasetInfo
from vdm.errors import UserError
from vdm.metrics import features, frechet
from vdm.metrics import inception as inc
from vdm.run.sample_metrics import Storage

SMALL = 75


@pytest.fixture(scope="module")
def variables():
    return inc.random_variables(0)


def _images(seed, n, size=8, channels=1):
    return np.random.default_rng(seed).uniform(size=(n, size, size, channels)).astype(np.float32)


def test_preprocessing_resizes_small_grey_and_rgb_images_to_299_rgb_in_minus_one_one():
    for shape in ((2, 8, 8, 1), (2, 32, 32, 3)):
        out = np.asarray(inc.preprocess(np.full(shape, 0.25, np.float32)))
        assert out.shape == (2, 299, 299, 3)
        np.testing.assert_allclose(out, -0.5, atol=1e-6)  # a flat image stays flat: 2 * 0.25 - 1
    ramp = np.linspace(0, 1, 8, dtype=np.float32)[None, None, :, None] * np.ones((1, 8, 1, 1))
    row = np.asarray(inc.preprocess(ramp))[0, 0, :, 0]
    assert row[0] == pytest.approx(-1.0) and row[-1] == pytest.approx(1.0)
    assert np.all(np.diff(row) >= -1e-6)  # bilinear: monotone along the ramp


def test_features_do_not_depend_on_the_batch_size(variables):
    x = _images(0, 6)
    a = inc.features(variables, x, batch_size=6, size=SMALL)
    b = inc.features(variables, x, batch_size=4, size=SMALL)  # 4 + a padded batch of 2
    assert a.shape == (6, inc.FEATURE_DIM)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.std(a, axis=0).mean() > 1e-3  # the images are told apart
    np.testing.assert_allclose(frechet.gaussian_stats(a)[0], frechet.gaussian_stats(b)[0],
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_fid_on_inception_features_is_zero_for_one_set_and_symmetric(variables):
    a = inc.features(variables, _images(1, 6), batch_size=6, size=SMALL)
    b = inc.features(variables, _images(2, 6) ** 3, batch_size=6, size=SMALL)  # darker images
    assert frechet.fid(a, a) < 1e-6
    np.testing.assert_allclose(frechet.fid(a, b), frechet.fid(b, a), rtol=1e-6)
    assert frechet.fid(a, b) > 100 * max(frechet.fid(a, a), 1e-9)


def test_the_standard_299_path_from_8x8_images_and_a_weights_file(variables, tmp_path):
    x = _images(3, 2)
    want = inc.features(variables, x, batch_size=2)  # resized to 299
    assert want.shape == (2, inc.FEATURE_DIM) and np.all(np.isfinite(want))
    path = tmp_path / "inception.npz"
    np.savez(path, **inc.flatten(variables))
    info = DatasetInfo("digits", (8, 8, 1), 17, 10)
    net = features.FEATURES.build("inception", {"weights": str(path), "batch_size": 2},
                                  info=info, storage=Storage(tmp_path))  # fmt: skip
    codes = np.round(x * 16).astype(np.int32)
    got, pred = net.embed(codes)
    assert pred is None
    np.testing.assert_allclose(got, inc.features(variables, codes / 16.0, batch_size=2), rtol=1e-5)


def test_a_missing_or_wrong_weights_file_names_the_option_and_the_conversion(tmp_path):
    info = DatasetInfo("cifar10", (32, 32, 3), 256, 10)
    build = lambda w: features.FEATURES.build(  # noqa: E731
        "inception", {"weights": w}, info=info, storage=Storage(tmp_path)
    )
    for weights in ("", str(tmp_path / "absent.npz")):
        with pytest.raises(UserError, match="sample.metrics.inception.weights.*convert_inception"):
            build(weights)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"params/Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 8))})
    first = "1 of the wrong shape: params/Conv2d_1a_3x3/conv/kernel"
    with pytest.raises(UserError, match=f"arrays missing, {first}"):
        build(str(wrong))
