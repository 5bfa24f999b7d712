"""Sample-quality metrics: Fréchet distance and KID against torchmetrics on the same features; KID and
k-NN precision/recall on planted distributions; KID's subsets (below the sample count, unbiased mean)."""

import numpy as np
import pytest
import torch

from wadi_distill.evaluation import metrics


def gaussian_features(count, dimension=16, shift=0.0, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dimension, dimension, generator=torch.Generator().manual_seed(99)) / dimension ** 0.5
    return (torch.randn(count, dimension, generator=generator) @ mixing) * scale + shift


class Identity(torch.nn.Module):
    """torchmetrics' feature-extractor hook: the 'images' are already feature vectors."""

    num_features = 16

    def forward(self, x):
        return x


def test_frechet_distance_equals_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = gaussian_features(400, seed=1), gaussian_features(300, shift=0.3, scale=1.2, seed=2)
    reference = FrechetInceptionDistance(feature=Identity(), normalize=False)
    reference.set_dtype(torch.float64)
    reference.update(real.double(), real=True)
    reference.update(fake.double(), real=False)
    assert metrics.frechet_distance(fake, real) == pytest.approx(reference.compute().item(), rel=1e-6)


def test_frechet_distance_analytic():
    """Two Gaussians' statistics in closed form: ‖Δμ‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) with diagonal Σ."""
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    sigma1, sigma2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    expected = 5.0 + (1 + 4 + 9 + 4 + 1 + 9) - 2 * (2 + 2 + 9)
    assert metrics.frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) == pytest.approx(expected)


def test_kid_equals_torchmetrics_on_one_full_subset():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = gaussian_features(200, seed=3), gaussian_features(200, shift=0.2, seed=4)
    reference = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=200, normalize=False)
    reference.update(real.double(), real=True)
    reference.update(fake.double(), real=False)
    mean, _ = reference.compute()
    ours, _ = metrics.kernel_inception_distance(fake, real, subsets=1, subset_size=200)
    assert ours == pytest.approx(mean.item(), rel=1e-6, abs=1e-9)


def test_kid_is_unbiased_and_grows_with_the_shift():
    real = gaussian_features(600, seed=5)
    same, same_std = metrics.kernel_inception_distance(gaussian_features(600, seed=6), real, subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-4
    shifts = [metrics.kernel_inception_distance(gaussian_features(600, shift=s, seed=7), real, subsets=20,
                                                subset_size=300)[0] for s in (0.2, 0.5, 1.0)]
    assert shifts[0] > 3 * same_std and shifts[0] < shifts[1] < shifts[2]


def polynomial_kernel(a, b):
    return (a @ b.T / a.shape[1] + 1) ** 3


def test_kid_subsets_are_below_the_sample_count_and_their_spread_is_real():
    """The default subset is min(1000, n // 2) of the smaller set, so the subsets differ and their
    standard deviation is a spread, not rounding (it was ~1e-15 when the subset was the whole set)."""
    assert metrics.kid_subset_size(1000) == 500 and metrics.kid_subset_size(50_000) == metrics.KID_MAX_SUBSET
    real, fake = gaussian_features(200, seed=12), gaussian_features(300, shift=0.1, seed=13)
    _, spread = metrics.kernel_inception_distance(fake, real)
    assert spread > 1e-6
    _, one_set = metrics.kernel_inception_distance(fake, real, subsets=1, subset_size=200)  # allowed: one subset
    assert one_set == 0.0
    for size in (200, 201):  # the whole set, many times, or more than there is
        with pytest.raises(ValueError, match=rf"KID subset size \({size}\) must be below the sample count \(200\)"):
            metrics.kernel_inception_distance(fake, real, subset_size=size)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kernel_inception_distance(fake, real, subset_size=1)


def test_kid_mean_over_subsets_is_the_full_set_unbiased_mmd():
    """Over random subsets the mean of the subset U-statistics is the full-set MMD²_u (computed here
    directly), within 4 standard errors; a biased estimate (diagonals kept) would miss by more."""
    x, y = gaussian_features(300, seed=14).double(), gaussian_features(300, shift=0.15, scale=1.1, seed=15).double()
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    n = len(x)
    off_xx, off_yy = (k_xx.sum() - k_xx.trace()) / (n * (n - 1)), (k_yy.sum() - k_yy.trace()) / (n * (n - 1))
    full = (off_xx + off_yy - 2 * k_xy.mean()).item()
    subsets, size = 400, metrics.kid_subset_size(n)
    mean, spread = metrics.kernel_inception_distance(y, x, subsets=subsets, seed=3)
    tolerance = 4 * spread / subsets ** 0.5
    assert abs(mean - full) < tolerance
    # the V-statistic on subsets of ``size`` is off by (mean diagonal - mean off-diagonal) / size per set
    bias = ((k_xx.diagonal().mean() - off_xx) + (k_yy.diagonal().mean() - off_yy)).item() / size
    assert bias > 2 * tolerance


def test_precision_recall_planted():
    real = gaussian_features(500, seed=8)
    precision, recall = metrics.precision_recall(real, gaussian_features(500, seed=9))
    assert precision > 0.75 and recall > 0.75
    # mode collapse: every sample near the centre -> on the real manifold, but covering little of it
    precision, recall = metrics.precision_recall(real, gaussian_features(500, scale=0.1, seed=10))
    assert precision > 0.95 and recall < 0.3
    # samples far from the data: off the manifold
    precision, _ = metrics.precision_recall(real, gaussian_features(500, shift=10.0, seed=11))
    assert precision < 0.01


def test_metrics_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"features must be a \(N >= 2, D\) array"):
        metrics.frechet_distance(torch.zeros(5), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="precision/recall with k=3 needs more than 3 samples per set"):
        metrics.precision_recall(torch.zeros(3, 2), torch.zeros(3, 2), k=3)
