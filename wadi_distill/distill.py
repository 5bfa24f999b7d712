"""One WaDi iteration on ONE frozen base that plays three roles by switching adapters (WaDi §3):
teacher (no adapter), generator (large-rank adapter ``generator``), fake score (small-rank ``fake``).
The fake score's LoRaD weights, built under ``no_grad`` for the generator step, serve its own training
step unbuilt (:mod:`wadi_distill.lorad.model`; not with gradient checkpointing, where memory comes first).

:func:`attach_roles` wires the roles onto the teacher's denoiser; ``generator_step`` and ``fake_step``
return losses; the caller (the training loop) owns optimisers, accumulation and devices. Every
constant is a field of :class:`~wadi_distill.vsd.VSDConfig`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from wadi_analysis.errors import UserError

from . import adapters, lorad
from .adapters import activate
from .teacher import Conditioning, Teacher
from .vsd import VSDConfig, add_noise, fake_score_loss, generator_loss, guided, predicted_x0

if TYPE_CHECKING:
    from .config import RunConfig

GENERATOR, FAKE = "generator", "fake"
ROLES = (GENERATOR, FAKE)


class TrainingError(UserError):
    """A run that cannot start or go on; one line for the user."""


@dataclass
class Roles:
    """The shared frozen base (teacher, and the fake score's adapter) and the generator: an adapter of
    the same base, or — full fine-tuning — its own copy of the denoiser."""

    base: nn.Module
    generator: nn.Module

    @property
    def separate_generator(self) -> bool:
        return self.generator is not self.base

    def parameters(self, role: str) -> list[nn.Parameter]:
        if role == GENERATOR and self.separate_generator:
            return list(self.generator.parameters())
        return adapters.adapter_parameters(self.base, role)

    def named_parameters(self, role: str) -> dict[str, nn.Parameter]:
        if role == GENERATOR and self.separate_generator:
            return dict(self.generator.named_parameters())
        ids = {id(p) for p in self.parameters(role)}
        return {n: p for n, p in self.base.named_parameters() if id(p) in ids}

    def frozen_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The base's own weights: everything of ``base`` that no role trains."""
        trained = {id(p) for role in ROLES for p in self.parameters(role)}
        return [(n, p) for n, p in self.base.named_parameters() if id(p) not in trained]


def attach_roles(teacher: Teacher, config: RunConfig) -> tuple[Roles, dict[str, int]]:
    """Generator and fake-score adapters on the teacher's own denoiser (full fine-tuning: a generator
    copy, the fake score still a LoRaD adapter of the base); returns them and their parameter counts."""
    model = teacher.denoiser
    generator_targets = lorad.read_plan(config.plan) if config.plan else lorad.resolve_preset(
        model, config.generator_preset, config.generator_rank)
    fake_targets = lorad.resolve_preset(model, config.fake_preset, config.fake_rank)
    roles = Roles(model, model)
    counts = {}
    if config.adapter == "full":
        roles.generator = copy.deepcopy(model).requires_grad_(True)
        counts[GENERATOR] = sum(p.numel() for p in roles.generator.parameters())
    for role, targets, seed in ((GENERATOR, generator_targets, config.seed), (FAKE, fake_targets, config.seed + 1)):
        if role == GENERATOR and roles.separate_generator:
            continue
        method = "lorad" if config.adapter == "full" else config.adapter
        if method != "lorad":
            targets = adapters.lora_ranks_at_equal_budget(model, targets)
        try:
            counts[role] = adapters.attach(model, method, targets, role, seed=seed)
        except ValueError as exc:
            raise TrainingError(f"{role} targets do not fit this teacher: {exc}") from None
    if config.gradient_checkpointing:  # memory first: the fake score's rotated weights are not kept from
        lorad.set_rotation_reuse(model, False)  # the generator step (no_grad) to its own step
    return roles, counts


def drop_conditioning(conditioning: Conditioning, null: Conditioning, probability: float,
                      rng: torch.Generator, scope: str = "sample") -> Conditioning:
    """Each sample's whole conditioning (embeddings, pooled embeddings, masks) -> the null prompt's, with
    ``probability``; with ``scope="batch"`` one draw decides for the whole batch (the published code)."""
    batch = len(conditioning)
    keep = torch.rand(batch if scope == "sample" else 1, generator=rng).expand(batch) >= probability
    index = torch.where(keep, torch.arange(batch), batch + torch.arange(batch))
    return Conditioning.cat([conditioning, null.repeat_to(batch)]).select(index.to(conditioning.hidden_states.device))


def one_step(teacher: Teacher, model: nn.Module, noise: torch.Tensor, conditioning: Conditioning,
             config: VSDConfig) -> torch.Tensor:
    """x0 = G(z): the generator's prediction from pure noise at the last timestep, in x0 space."""
    activate(model, GENERATOR)
    last = torch.full((noise.shape[0],), teacher.num_timesteps - 1, dtype=torch.long, device=noise.device)
    alpha_T = teacher.alpha_bar(last, noise) if config.alpha_T is None else torch.full_like(
        teacher.alpha_bar(last, noise), config.alpha_T)
    output = teacher.network_output(model, noise, last, conditioning)
    return predicted_x0(output, noise, alpha_T.to(output.dtype), teacher.prediction_type)


def guided_epsilon(teacher: Teacher, model: nn.Module, adapter: str | None, noisy: torch.Tensor,
                    timesteps: torch.Tensor, conditioning: Conditioning, null: Conditioning, scale: float):
    activate(model, adapter)
    both = Conditioning.cat([null.repeat_to(len(conditioning)), conditioning])
    eps = teacher.epsilon(model, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), both)
    unconditional, conditional = eps.chunk(2)
    return guided(unconditional, conditional, scale)


def generator_step(teacher: Teacher, model: nn.Module, conditioning: Conditioning, null: Conditioning,
                   config: VSDConfig, rng: torch.Generator,
                   generator_model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator VSD loss, x0). Gradients reach only the generator: the ``generator`` adapter of the
    shared ``model``, or ``generator_model`` when the generator is a separate copy (full fine-tuning)."""
    device = conditioning.hidden_states.device
    shape = (len(conditioning), teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    noise = torch.randn(shape, generator=rng).to(device)
    x0 = one_step(teacher, generator_model if generator_model is not None else model, noise, conditioning, config)
    timesteps = torch.randint(config.t_min, config.t_max + 1, (shape[0],), generator=rng).to(device)
    eps = torch.randn(shape, generator=rng).to(device)
    alpha_t = teacher.alpha_bar(timesteps, x0)
    with torch.no_grad():
        noisy = add_noise(x0.detach(), eps, alpha_t).to(x0.dtype)
        eps_real = guided_epsilon(teacher, model, None, noisy, timesteps, conditioning, null, config.guidance_real)
        eps_fake = guided_epsilon(teacher, model, FAKE, noisy, timesteps, conditioning, null, config.guidance_fake)
    activate(model, GENERATOR)
    return generator_loss(x0, eps_real, eps_fake, alpha_t, noisy, config.generator_weighting), x0


def fake_step(teacher: Teacher, model: nn.Module, x0: torch.Tensor, conditioning: Conditioning,
              null: Conditioning, config: VSDConfig, rng: torch.Generator) -> torch.Tensor:
    """Fake-score denoising loss on the generator's (detached) samples. Gradients reach only ``fake``."""
    x0 = x0.detach()
    device = x0.device
    timesteps = torch.randint(config.fake_t_min, config.fake_t_max + 1, (x0.shape[0],), generator=rng).to(device)
    noise = torch.randn(x0.shape, generator=rng).to(device=device, dtype=x0.dtype)
    alpha_t = teacher.alpha_bar(timesteps, x0)
    noisy = add_noise(x0, noise, alpha_t).to(x0.dtype)
    dropped = drop_conditioning(conditioning, null, config.prompt_dropout, rng, config.prompt_dropout_scope)
    activate(model, FAKE)
    return fake_score_loss(teacher.epsilon(model, noisy, timesteps, dropped), noise, alpha_t, config.fake_weighting)
