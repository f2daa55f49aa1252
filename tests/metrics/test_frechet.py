"""FID/KID properties: zero on identical sets, symmetric, closed form for two Gaussians."""

import numpy as np

from vdm.metrics import frechet


def _feats(seed, n=400, d=6, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fid_of_a_set_with_itself_is_zero_and_symmetric():
    a, b = _feats(0), _feats(1, shift=0.5)
    assert frechet.fid(a, a) < 1e-8
    np.testing.assert_allclose(frechet.fid(a, b), frechet.fid(b, a), rtol=1e-8)
    assert frechet.fid(a, b) > 1.0


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    v1, v2 = np.array([1.0, 4.0]), np.array([9.0, 0.25])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_kid_is_near_zero_for_one_law_and_positive_for_two():
    same, _ = frechet.kid(_feats(0), _feats(1), subset_size=200)
    diff, _ = frechet.kid(_feats(0), _feats(1, shift=1.0), subset_size=200)
    assert abs(same) < 0.05 < diff
