"""Sample-quality metrics: Fréchet distance and KID against torchmetrics on the same features; KID and
k-NN precision/recall on planted distributions."""

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
