"""Datasets whose log-density is known exactly: Gaussians, 2-D Gaussian mixtures, the swirl.

They exist for correctness work: a model trained on one of them can report how far its
bits/dim are from the truth (`log_prob` of the evaluation set), and the Gaussian ones have
exact denoisers in vdm.oracles. Every sampler here is a numpy function of a Generator so the
data of a run is fixed by its seed. Values stay roughly inside [-1, 1], like image data.
"""

import dataclasses

import numpy as np
from scipy import special

_LOG_2PI = np.log(2.0 * np.pi)


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """N(mean, cov) with a full covariance."""

    mean: np.ndarray
    cov: np.ndarray

    @property
    def labelled(self) -> bool:
        return False

    def sample(self, rng: np.random.Generator, n: int):
        """(x [n, D] float32, None)."""
        chol = np.linalg.cholesky(self.cov)
        x = self.mean + rng.standard_normal((n, self.mean.shape[0])) @ chol.T
        return x.astype(np.float32), None

    def log_prob(self, x) -> np.ndarray:
        """Exact log-density (nats) of each row of x."""
        x = np.asarray(x, np.float64)
        chol = np.linalg.cholesky(self.cov)
        white = np.linalg.solve(chol, (x - self.mean).T)
        log_det = 2.0 * np.sum(np.log(np.diag(chol)))
        return -0.5 * (np.sum(white**2, axis=0) + log_det + x.shape[-1] * _LOG_2PI)


def default_gaussian(dim: int) -> Gaussian:
    """A fixed, deliberately anisotropic and correlated Gaussian in `dim` dimensions.

    Eigenvalues spread log-uniformly over [0.01, 0.25] (standard deviations 0.1 to 0.5) in a
    random but fixed rotation, so a model must learn correlations and scales, not just zeros.
    """
    rng = np.random.default_rng(1234 + dim)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eig = np.geomspace(0.01, 0.25, dim) if dim > 1 else np.array([0.1])
    mean = np.linspace(-0.3, 0.3, dim) if dim > 1 else np.array([0.2])
    return Gaussian(mean=mean, cov=(q * eig) @ q.T)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A mixture of diagonal Gaussians; the component index is the class label.

    The same (weights, means, variances) feed vdm.oracles.mixture_eps, the exact denoiser.
    """

    weights: np.ndarray  # [K]
    means: np.ndarray  # [K, D]
    variances: np.ndarray  # [K, D]

    @property
    def labelled(self) -> bool:
        return True

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    def sample(self, rng: np.random.Generator, n: int):
        """(x [n, D] float32, labels [n] int32)."""
        labels = rng.choice(self.num_classes, size=n, p=self.weights)
        eps = rng.standard_normal((n, self.means.shape[1]))
        x = self.means[labels] + np.sqrt(self.variances[labels]) * eps
        return x.astype(np.float32), labels.astype(np.int32)

    def log_prob(self, x) -> np.ndarray:
        """Exact log-density (nats) of each row of x, marginal over the label."""
        x = np.asarray(x, np.float64)[:, None, :]
        per = -0.5 * np.sum(
            (x - self.means) ** 2 / self.variances + np.log(self.variances) + _LOG_2PI, axis=-1
        )
        return special.logsumexp(per + np.log(self.weights), axis=-1)

    def log_prob_given(self, x, labels) -> np.ndarray:
        """Exact log-density (nats) of each row of x given its component (label), log p(x|y)."""
        x = np.asarray(x, np.float64)
        labels = np.asarray(labels)
        mean, var = self.means[labels], self.variances[labels]
        return -0.5 * np.sum((x - mean) ** 2 / var + np.log(var) + _LOG_2PI, axis=-1)


def default_mixture2d(num_components: int = 8) -> Mixture:
    """Equal-weight components on a circle of radius 0.7 with standard deviation 0.08."""
    angles = 2.0 * np.pi * np.arange(num_components) / num_components
    means = 0.7 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return Mixture(
        weights=np.full(num_components, 1.0 / num_components),
        means=means,
        variances=np.full((num_components, 2), 0.08**2),
    )


@dataclasses.dataclass(frozen=True)
class Swirl:
    """The 2-D swirl: a point uniform in arc parameter u on a spiral plus isotropic noise.

    x = c(u) + std * n with c(u) = r(u) (cos theta(u), sin theta(u)), theta = turns 2 pi u + 1,
    r = r_min + (r_max - r_min) u, u ~ U[0, 1]. Its density p(x) = int_0^1 N(x; c(u), std^2)
    du has no closed form but is a smooth one-dimensional integral, evaluated by the midpoint
    rule on `quad_points` nodes; the node spacing along the curve is far below std, so the
    quadrature error is negligible next to any model's error (see tests/data/test_data.py).
    """

    std: float = 0.04
    turns: float = 1.5
    r_min: float = 0.15
    r_max: float = 0.85
    quad_points: int = 4096

    @property
    def labelled(self) -> bool:
        return False

    def _curve(self, u):
        theta = 2.0 * np.pi * self.turns * u + 1.0
        r = self.r_min + (self.r_max - self.r_min) * u
        return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1)

    def sample(self, rng: np.random.Generator, n: int):
        """(x [n, 2] float32, None)."""
        u = rng.uniform(size=n)
        x = self._curve(u) + self.std * rng.standard_normal((n, 2))
        return x.astype(np.float32), None

    def log_prob(self, x, chunk: int = 1024) -> np.ndarray:
        """log p(x) (nats) of each row of x by midpoint quadrature over u."""
        x = np.asarray(x, np.float64)
        nodes = self._curve((np.arange(self.quad_points) + 0.5) / self.quad_points)
        out = []
        for start in range(0, len(x), chunk):  # bounds memory at chunk x quad_points
            d2 = np.sum((x[start : start + chunk, None, :] - nodes) ** 2, axis=-1)
            log_k = -0.5 * d2 / self.std**2 - np.log(2.0 * np.pi * self.std**2)
            out.append(special.logsumexp(log_k, axis=-1) - np.log(self.quad_points))
        return np.concatenate(out) if out else np.zeros((0,))


def get_density(name: str, dim: int):
    """The known-density distribution called `name` (gaussian|mixture2d|swirl)."""
    if name == "gaussian":
        return default_gaussian(dim)
    if name == "mixture2d":
        return default_mixture2d()
    if name == "swirl":
        return Swirl()
    raise ValueError(f"No known-density dataset named {name!r}.")
