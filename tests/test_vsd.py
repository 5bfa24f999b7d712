"""The VSD equations: conversions between parametrisations, loss values and gradients."""

import pytest
import torch

from wadi_distill import vsd


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parametrisations_round_trip(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    alpha_bar = torch.tensor([0.0047, 0.5, 0.99], dtype=torch.float64).view(3, 1, 1, 1)
    noisy = vsd.add_noise(x0, noise, alpha_bar)
    output = {"epsilon": noise, "sample": x0,
              "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0}[prediction_type]
    assert torch.allclose(vsd.predicted_x0(output, noisy, alpha_bar, prediction_type), x0, atol=1e-10)
    assert torch.allclose(vsd.predicted_epsilon(output, noisy, alpha_bar, prediction_type), noise, atol=1e-10)


def test_generator_loss_gradient_is_the_weighted_score_difference():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    eps_real = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps_fake = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    alpha_bar = torch.tensor([0.3, 0.8], dtype=torch.float64).view(2, 1, 1, 1)
    vsd.generator_loss(x0, eps_real, eps_fake, alpha_bar).backward()
    expected = (1 - alpha_bar) * (eps_real - eps_fake) / x0.numel()
    assert torch.allclose(x0.grad.double(), expected, rtol=1e-6, atol=1e-12)


def test_generator_loss_ignores_non_finite_scores():
    x0 = torch.zeros(1, 2, requires_grad=True)
    loss = vsd.generator_loss(x0, torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, 2), torch.tensor([[0.5]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x0.grad).all()


def test_fake_score_loss_and_guidance():
    noise = torch.ones(2, 3)
    alpha_bar = torch.tensor([[0.25], [1.0]])
    assert vsd.fake_score_loss(noise, noise, alpha_bar) == 0
    assert vsd.fake_score_loss(torch.zeros(2, 3), noise, alpha_bar).item() == pytest.approx((0.25 + 1.0) / 2)
    assert torch.equal(vsd.guided(torch.zeros(2), torch.ones(2), 1.5), torch.full((2,), 1.5))


def test_dmd_weighting_is_the_published_direction_normalised_per_sample():
    generator = torch.Generator().manual_seed(1)
    shape = (3, 4, 8, 8)
    x0, noise, eps_real, eps_fake = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(4))
    alpha_bar = torch.tensor([0.01, 0.4, 0.95], dtype=torch.float64).view(3, 1, 1, 1)
    noisy = vsd.add_noise(x0, noise, alpha_bar)
    dmd = vsd.dmd_gradient(x0, noisy, eps_real, eps_fake, alpha_bar)
    published = vsd.published_gradient(x0, noisy, eps_real, eps_fake, alpha_bar)
    x0_real = (noisy - (1 - alpha_bar).sqrt() * eps_real) / alpha_bar.sqrt()
    distance = (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    # same direction per sample, scaled by sqrt((1 - a) / a) / (1 - a) / mean |x0 - x0_real|
    assert torch.allclose(dmd, published * ((1 - alpha_bar) / alpha_bar).sqrt() / (1 - alpha_bar) / distance)
    # each sample's gradient is in units of its own distance: scaling that distance leaves g's size in step
    far = vsd.dmd_gradient(x0_real + 10 * (x0 - x0_real), noisy, eps_real, eps_fake, alpha_bar)
    assert torch.allclose(far, dmd / 10)


def test_generator_loss_with_dmd_weighting_has_that_gradient():
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    noisy, eps_real, eps_fake = (torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    alpha_bar = torch.tensor([0.2, 0.7], dtype=torch.float64).view(2, 1, 1, 1)
    vsd.generator_loss(x0, eps_real, eps_fake, alpha_bar, noisy, "dmd").backward()
    expected = vsd.dmd_gradient(x0.detach(), noisy, eps_real, eps_fake, alpha_bar) / x0.numel()
    assert torch.allclose(x0.grad, expected)


def test_uniform_fake_weighting_is_the_plain_denoising_loss():
    alpha_bar = torch.tensor([[0.25], [1.0]])
    assert vsd.fake_score_loss(torch.zeros(2, 3), torch.ones(2, 3), alpha_bar, "uniform").item() == 1.0
