"""Sample-quality metrics on feature vectors (N, D): each a plain function, float64 throughout.

* Fréchet distance (Heusel et al. 2017) between Gaussians fitted to two feature sets, computed as
  pytorch-fid does (``scipy.linalg.sqrtm``, a small diagonal offset when the product is singular).
* KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (xᵀy / D + 1)³, averaged over random subsets (mean and standard deviation).
* k-NN precision and recall (Kynkäänniemi et al. 2019): the share of generated samples inside the real
  samples' k-NN balls, and of real samples inside the generated samples' balls.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def _array(features) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError("features must be a (N >= 2, D) array")
    return array


def gaussian(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set."""
    array = _array(features)
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)."""
    difference = mu1 - mu2
    covariance_mean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covariance_mean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covariance_mean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covariance_mean = covariance_mean.real
    return float(difference.dot(difference) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covariance_mean))


def frechet_distance(features1, features2) -> float:
    return frechet_distance_from_statistics(*gaussian(features1), *gaussian(features2))


def kernel_inception_distance(features1, features2, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) over ``subsets`` random subsets of the unbiased polynomial-kernel MMD²."""
    x, y = _array(features1), _array(features2)
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    dimension = x.shape[1]
    values = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), size, replace=False)]
        b = y[rng.choice(len(y), size, replace=False)]
        k_xx = (a @ a.T / dimension + 1) ** 3
        k_yy = (b @ b.T / dimension + 1) ** 3
        k_xy = (a @ b.T / dimension + 1) ** 3
        off_diagonal = size * (size - 1)
        values.append((k_xx.sum() - np.trace(k_xx)) / off_diagonal + (k_yy.sum() - np.trace(k_yy)) / off_diagonal
                      - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour (itself excluded)."""
    distances = _pairwise(features, features)
    return np.partition(distances, k, axis=1)[:, k]


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0))


def precision_recall(real, generated, k: int = 3) -> tuple[float, float]:
    """k-NN precision (generated samples on the real manifold) and recall (real samples on the generated one)."""
    real, generated = _array(real), _array(generated)
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    between = _pairwise(real, generated)
    precision = (between <= _knn_radii(real, k)[:, None]).any(axis=0).mean()
    recall = (between <= _knn_radii(generated, k)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)
