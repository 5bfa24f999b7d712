"""Sample-quality metrics on feature vectors (N, D): each a plain function, float64 throughout.

* Fréchet distance (Heusel et al. 2017) between Gaussians fitted to two feature sets, computed as
  pytorch-fid does (``scipy.linalg.sqrtm``, a small diagonal offset when the product is singular).
* KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (xᵀy / D + 1)³, averaged over random subsets smaller than the sets (mean and standard
  deviation; :func:`kid_subset_size`).
* k-NN precision and recall (Kynkäänniemi et al. 2019): the share of generated samples inside the real
  samples' k-NN balls, and of real samples inside the generated samples' balls.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from wadi_analysis.errors import InvalidValue


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


KID_SUBSETS = 100       # subsets drawn, as torchmetrics and clean-fid do
KID_MAX_SUBSET = 1000   # their subset size, for sets of 10k-50k samples


def kid_subset_size(count: int) -> int:
    """The default KID subset size for ``count`` samples per set: min(1000, count // 2).

    1000 is the usual protocol's size (Bińkowski et al., torchmetrics, clean-fid: subsets of 1000 drawn
    from 10k-50k samples). Below that, half the set: a subset as large as the set makes every subset the
    whole set, and the standard deviation over subsets 0 by construction (it was ~1e-15 at 1,000
    samples). At m = n/2 the spread means something: the subset value's expectation given the sets is
    the full-set value, so by the law of total variance Var(subset value | sets) = Var_m − Var_n, which is
    Var_n when an estimate's variance goes as 1/(sample count) (its leading order): the standard
    deviation over half-size subsets is about the standard error of the full-set KID itself."""
    return max(2, min(KID_MAX_SUBSET, count // 2))


def kernel_inception_distance(features1, features2, subsets: int = KID_SUBSETS,
                              subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over ``subsets`` random subsets of the unbiased polynomial-kernel MMD²:

        MMD²_u = Σ_{i≠j} k(a_i, a_j) / (m(m−1)) + Σ_{i≠j} k(b_i, b_j) / (m(m−1))
                 − 2 Σ_{i,j} k(a_i, b_j) / m²

    over subsets a, b of ``subset_size`` = m samples of each set, drawn without replacement. Each subset's
    value is unbiased, and so is their mean: over random subsets its expectation is the full-set MMD²_u.
    ``subset_size`` defaults to :func:`kid_subset_size` of the smaller set. The rule for a given size:
    2 ≤ m ≤ the smaller set's count, and m equal to that count only for ``subsets=1`` (the full-set
    value), since many subsets that are all the whole set have no spread (:func:`check_kid_subset`)."""
    x, y = _array(features1), _array(features2)
    count = min(len(x), len(y))
    size = kid_subset_size(count) if subset_size is None else subset_size
    check_kid_subset(size, count, subsets)
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


def check_kid_subset(size, count: int, subsets: int = KID_SUBSETS) -> None:
    """The subset-size rule of :func:`kernel_inception_distance` (``InvalidValue``, a ``ValueError``)."""
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise InvalidValue(f"KID needs at least one subset, not {subsets!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
        raise InvalidValue(f"the KID subset size must be an integer of at least 2, not {size!r}")
    if size > count or (size == count and subsets > 1):
        raise InvalidValue(f"the KID subset size ({size}) must be below the sample count ({count}): subsets of "
                           "the whole set are all the same, so their spread says nothing")


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
