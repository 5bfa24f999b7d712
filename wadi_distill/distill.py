"""One WaDi iteration on ONE frozen base that plays three roles by switching adapters (WaDi §3):
teacher (no adapter), generator (large-rank adapter ``generator``), fake score (small-rank ``fake``).

``generator_step`` and ``fake_step`` return losses; the caller (the training loop) owns optimisers,
accumulation and devices. Every constant is a field of :class:`VSDConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import activate
from .teacher import Conditioning, Teacher
from .vsd import add_noise, fake_score_loss, generator_loss, guided, predicted_x0

GENERATOR, FAKE = "generator", "fake"


@dataclass
class VSDConfig:
    guidance_real: float = 1.5       # CFG scale of the teacher (real score)
    guidance_fake: float = 1.5       # CFG scale of the fake score
    t_min: int = 20                  # generator-loss timesteps ~ U[t_min, t_max]
    t_max: int = 980
    fake_t_min: int = 0              # fake-score timesteps ~ U[fake_t_min, fake_t_max]
    fake_t_max: int = 999
    prompt_dropout: float = 0.1      # fake-score steps: prompt -> null prompt with this probability
    alpha_T: float | None = None     # one-step a_T; None: the teacher schedule's own last value (published: 0.0047)


def drop_conditioning(conditioning: Conditioning, null: Conditioning, probability: float,
                      generator: torch.Generator) -> Conditioning:
    """Each sample's whole conditioning (embeddings, pooled embeddings, masks) -> the null prompt's, with
    ``probability``."""
    batch = len(conditioning)
    keep = torch.rand(batch, generator=generator) >= probability
    index = torch.where(keep, torch.arange(batch), batch + torch.arange(batch))
    return Conditioning.cat([conditioning, null.repeat_to(batch)]).select(index.to(conditioning.hidden_states.device))


def one_step(teacher: Teacher, model: nn.Module, noise: torch.Tensor, conditioning: Conditioning,
             config: VSDConfig) -> torch.Tensor:
    """x0 = G(z): the generator's prediction from pure noise at the last timestep, in x0 space."""
    activate(model, GENERATOR)
    last = torch.full((noise.shape[0],), teacher.num_timesteps - 1, dtype=torch.long, device=noise.device)
    alpha_T = teacher.alpha_bar(last, noise) if config.alpha_T is None else torch.full_like(
        teacher.alpha_bar(last, noise), config.alpha_T)
    output = teacher.forward(model, noise, last, conditioning)
    return predicted_x0(output, noise, alpha_T.to(output.dtype), teacher.prediction_type)


def guided_epsilon(teacher: Teacher, model: nn.Module, adapter: str | None, noisy: torch.Tensor,
                    timesteps: torch.Tensor, conditioning: Conditioning, null: Conditioning, scale: float):
    activate(model, adapter)
    both = Conditioning.cat([null.repeat_to(len(conditioning)), conditioning])
    eps = teacher.epsilon(model, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), both)
    unconditional, conditional = eps.chunk(2)
    return guided(unconditional, conditional, scale)


def generator_step(teacher: Teacher, model: nn.Module, conditioning: Conditioning, null: Conditioning,
                   config: VSDConfig, generator: torch.Generator,
                   generator_model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator VSD loss, x0). Gradients reach only the generator: the ``generator`` adapter of the
    shared ``model``, or ``generator_model`` when the generator is a separate copy (full fine-tuning)."""
    device = conditioning.hidden_states.device
    shape = (len(conditioning), teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    noise = torch.randn(shape, generator=generator).to(device)
    x0 = one_step(teacher, generator_model if generator_model is not None else model, noise, conditioning, config)
    timesteps = torch.randint(config.t_min, config.t_max + 1, (shape[0],), generator=generator).to(device)
    eps = torch.randn(shape, generator=generator).to(device)
    alpha_t = teacher.alpha_bar(timesteps, x0)
    with torch.no_grad():
        noisy = add_noise(x0.detach(), eps, alpha_t).to(x0.dtype)
        eps_real = guided_epsilon(teacher, model, None, noisy, timesteps, conditioning, null, config.guidance_real)
        eps_fake = guided_epsilon(teacher, model, FAKE, noisy, timesteps, conditioning, null, config.guidance_fake)
    activate(model, GENERATOR)
    return generator_loss(x0, eps_real, eps_fake, alpha_t), x0


def fake_step(teacher: Teacher, model: nn.Module, x0: torch.Tensor, conditioning: Conditioning,
              null: Conditioning, config: VSDConfig, generator: torch.Generator) -> torch.Tensor:
    """Fake-score denoising loss on the generator's (detached) samples. Gradients reach only ``fake``."""
    x0 = x0.detach()
    device = x0.device
    timesteps = torch.randint(config.fake_t_min, config.fake_t_max + 1, (x0.shape[0],), generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
    alpha_t = teacher.alpha_bar(timesteps, x0)
    noisy = add_noise(x0, noise, alpha_t).to(x0.dtype)
    dropped = drop_conditioning(conditioning, null, config.prompt_dropout, generator)
    activate(model, FAKE)
    return fake_score_loss(teacher.epsilon(model, noisy, timesteps, dropped), noise, alpha_t)
