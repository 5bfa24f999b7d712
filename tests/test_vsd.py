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


def _flow_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    x0, noise = (torch.randn(4, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([0.0, 0.3, 0.8, 1.0], dtype=torch.float64).view(4, 1, 1, 1)
    return x0, noise, sigma


def test_flow_parametrisations_round_trip():
    x0, noise, sigma = _flow_batch(3)
    noisy = vsd.flow_add_noise(x0, noise, sigma)
    velocity = vsd.flow_velocity(x0, noise)
    assert torch.allclose(vsd.flow_x0(velocity, noisy, sigma), x0, atol=1e-6)
    assert torch.allclose(vsd.flow_epsilon(velocity, noisy, sigma), noise, atol=1e-6)
    assert torch.allclose(vsd.flow_velocity(vsd.flow_x0(velocity, noisy, sigma),
                                            vsd.flow_epsilon(velocity, noisy, sigma)), velocity, atol=1e-6)
    # the VP view: same eps, x_sigma / s is add_noise at a(sigma), and the eps equations recover x0
    eps, noisy_vp, alpha_bar = vsd.flow_as_epsilon(velocity, noisy, sigma)
    assert torch.allclose(noisy_vp, vsd.add_noise(x0, noise, alpha_bar), atol=1e-6)
    inner = slice(1, 3)  # a = 0 at sigma = 1 and eps is undefined at sigma = 0 for the eps -> x0 division
    assert torch.allclose(vsd.predicted_x0(eps[inner], noisy_vp[inner], alpha_bar[inner], "epsilon"), x0[inner],
                          atol=1e-6)


def test_shifted_sigmas_are_the_flow_match_euler_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0, 6.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        unshifted = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
        expected = scheduler.sigmas.double()  # the training sigmas, before set_timesteps
        assert torch.allclose(vsd.shifted_sigma(unshifted, shift), expected, atol=1e-6)
        assert scheduler.sigmas[0].item() == pytest.approx(1.0)  # sigma_max: pure noise for every shift
    assert vsd.shifted_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_flow_generator_gradient_is_the_published_weighting_in_velocity_units():
    generator = torch.Generator().manual_seed(4)
    shape = (3, 4, 8, 8)
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    noisy, v_real, v_fake = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.2, 0.6, 0.95], dtype=torch.float64).view(3, 1, 1, 1)
    eps_real, noisy_vp, alpha_bar = vsd.flow_as_epsilon(v_real, noisy, sigma)
    eps_fake, _, _ = vsd.flow_as_epsilon(v_fake, noisy, sigma)
    vsd.generator_loss(x0, eps_real, eps_fake, alpha_bar, noisy_vp).backward()
    weight = sigma ** 2 * (1 - sigma) / ((1 - sigma) ** 2 + sigma ** 2)
    expected = weight * (v_real - v_fake) / x0.numel()
    assert torch.allclose(x0.grad, expected, rtol=1e-6, atol=1e-12)
    assert torch.allclose(vsd.flow_published_gradient(v_real, v_fake, sigma) / x0.numel(), expected)
    # pure noise carries no signal about x0: the weight vanishes at sigma = 1
    assert vsd.flow_published_gradient(v_real, v_fake, torch.tensor(1.0)).abs().max() == 0


def test_flow_prediction_type_in_vp_units():
    x0, noise, sigma = _flow_batch(5)
    velocity = vsd.flow_velocity(x0, noise)
    noisy_vp = vsd.add_noise(x0, noise, vsd.flow_alpha_bar(sigma))  # = x_sigma / s(sigma)
    alpha_bar = vsd.flow_alpha_bar(sigma)
    assert torch.allclose(noisy_vp * vsd.flow_scale(sigma), vsd.flow_add_noise(x0, noise, sigma), atol=1e-6)
    assert torch.allclose(vsd.predicted_x0(velocity, noisy_vp, alpha_bar, "flow"), x0, atol=1e-6)
    assert torch.allclose(vsd.predicted_epsilon(velocity, noisy_vp, alpha_bar, "flow"), noise, atol=1e-6)
    # the one-step generator's start: a = 0 is sigma = 1, pure noise, and x0 = eps - v
    assert torch.allclose(vsd.predicted_x0(velocity[3:], noise[3:], alpha_bar[3:], "flow"), x0[3:], atol=1e-6)
