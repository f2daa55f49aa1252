"""Frechet distance (FID) and kernel distance (KID) between two sets of features.

FID (Heusel et al. 2017) is the squared 2-Wasserstein distance between the Gaussians fitted
to the two feature sets: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The trace of the
matrix root is computed as the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2)
(symmetric, so eigh is stable where sqrtm of the non-symmetric S1 S2 can go complex).

KID (Binkowski et al. 2018) is the unbiased MMD^2 with the polynomial kernel
k(a, b) = (a.b / d + 1)^3, averaged over random subsets, with its standard deviation.
"""

import numpy as np


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) of features [N, d] in float64 (N >= 2)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, d], got shape {f.shape}.")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^(1/2) S2 S1^(1/2))^(1/2)), clipped at 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}.")
    root = _psd_sqrt(cov1)
    cross = root @ cov2 @ root
    ev = np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)
    d = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * np.sum(np.sqrt(ev))
    return float(max(d, 0.0))


def fid(features1, features2) -> float:
    """FID between two feature sets [N1, d], [N2, d].

    With fewer examples than dimensions (e.g. 64 samples in Inception's 2048-d features) the
    covariances have rank < N, and the same value comes from N-sized matrices: with
    S1 = A A^T, S2 = B B^T (A, B the centred features / sqrt(N - 1), d x N), the non-zero
    eigenvalues of S1^(1/2) S2 S1^(1/2) are those of (B^T A)^T (B^T A), so the trace of its
    root is the nuclear norm of B^T A. That costs an SVD of an N2 x N1 matrix instead of
    d x d eigendecompositions (seconds to a minute at d = 2048 on a CPU).
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if min(len(f1), len(f2)) >= f1.shape[-1]:
        return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"features must be [N >= 2, d] of one d, got {f1.shape}, {f2.shape}.")
    a = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    b = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    nuclear = np.sum(np.linalg.svd(b @ a.T, compute_uv=False))
    d = np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.sum(a * a) + np.sum(b * b) - 2.0 * nuclear
    return float(max(d, 0.0))


def kid(features1, features2, *, subsets: int = 10, subset_size: int = 1000, seed: int = 0):
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets.

    Args:
      features1, features2: [N1, d], [N2, d] features.
      subsets: number of random subsets.
      subset_size: examples per subset (capped at the smaller set's size).
      seed: the subsets' seed (the estimate is deterministic given it).
    """
    a, b = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 examples in each set.")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / d + 1.0) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
        vals.append(off(kxx) + off(kyy) - 2.0 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))
