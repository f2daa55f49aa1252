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


def test_few_examples_in_many_dimensions_give_the_covariance_route_value():
    # N < d takes the nuclear-norm route; the d x d eigendecomposition route is the reference.
    a, b = _feats(0, n=20, d=50), _feats(1, n=30, d=50, shift=0.3)
    want = frechet.frechet_distance(*frechet.gaussian_stats(a), *frechet.gaussian_stats(b))
    # rtol 1e-6: the reference takes roots of rank-deficient covariances' ~0 eigenvalues.
    np.testing.assert_allclose(frechet.fid(a, b), want, rtol=1e-6)
    np.testing.assert_allclose(frechet.fid(b, a), want, rtol=1e-6)
    assert frechet.fid(a, a) < 1e-8


def test_frechet_distance_matches_closed_form_for_rotated_gaussians():
    # S1 = I and S2 = Q diag(l) Q^T commute, so tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum (1 - sqrt l)^2.
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(5, 5)))
    lam = np.array([0.1, 0.5, 1.0, 2.0, 7.0])
    got = frechet.frechet_distance(np.zeros(5), np.eye(5), np.ones(5), (q * lam) @ q.T)
    np.testing.assert_allclose(got, 5.0 + np.sum((1.0 - np.sqrt(lam)) ** 2), rtol=1e-10)
