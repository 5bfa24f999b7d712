"""DMD's regression term beside VSD (Yin et al. 2024, §3.3): the one-step generator also regresses onto
the teacher's own multi-step samples from the same noise,

    L_reg = mse(G(z), y),   y = DDIM_teacher(z, c; steps, guidance),

on a fixed set of (z, c, y) pairs made once at the start of a run. The generator loss is then
L_VSD + lambda L_reg (``RunConfig.regression_weight``; 0, the default, is plain WaDi).

Why (measured, README "The VSD recipe"): generators with the capacity to learn a good one-step map (Conv2d
targets, a full copy) get there by regression onto these pairs in the run's budget, while VSD alone takes
them nowhere steady; the regression anchors the map's large-scale layout, VSD keeps matching the teacher's
distribution rather than its particular ODE endpoints. Latent MSE stands in for DMD's LPIPS (no pretrained
perceptual network ships here).

Pairs are drawn with their own random generator (``seed``), so making them does not shift the run's
draws, and are made again, bit for bit, on resume. With several processes each makes its own share
(``count / processes``, rounded up, from ``seed + rank``): together they hold ``count`` pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distill import one_step
from .sampling import ddim
from .teacher import Conditioning, Teacher
from .vsd import VSDConfig

PAIR_CHUNK = 256  # teacher samples made per DDIM batch


@dataclass
class Pairs:
    """Fixed regression pairs: noise z (N, C, H, W), the index of each pair's prompt among the run's
    prompts, and the teacher's DDIM sample y from that z and prompt."""

    noise: torch.Tensor
    prompt_index: torch.Tensor
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.noise)

    def to(self, device) -> "Pairs":
        return Pairs(self.noise.to(device), self.prompt_index.to(device), self.target.to(device))


def regression_loss(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_reg = mse(x0, y), reduced in float32 at least (the generator may run in fp16/bf16)."""
    x0 = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
    return F.mse_loss(x0, target.to(x0.dtype))


def pair_count(config) -> int:
    """Pairs a run makes: ``regression_pairs``, but no more than its ``steps × batch_size`` draws can use (a
    short run, such as a smoke test of the defaults, does not pay for 2,048 teacher samples)."""
    return min(config.regression_pairs, config.steps * config.batch_size)


def share(count: int, processes: int) -> int:
    """Pairs each process makes: count / processes, rounded up (every process makes as many)."""
    return math.ceil(count / processes)


@torch.no_grad()
def teacher_pairs(teacher: Teacher, prompts: Conditioning, null: Conditioning, count: int, steps: int,
                  guidance: float, seed: int, device=None) -> Pairs:
    """``count`` pairs (z, prompt, y): z ~ N(0, I) at the generator's input shape, prompts uniform over
    ``prompts``, y the teacher's ``steps``-step DDIM sample at CFG ``guidance`` from z (no adapter active)."""
    rng = torch.Generator().manual_seed(seed)
    shape = (count, teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    noise = torch.randn(shape, generator=rng)
    prompt_index = torch.randint(0, len(prompts), (count,), generator=rng)
    device = device if device is not None else prompts.hidden_states.device
    targets = []
    for start in range(0, count, PAIR_CHUNK):
        index = prompt_index[start:start + PAIR_CHUNK]
        targets.append(ddim(teacher, teacher.denoiser, noise[start:start + PAIR_CHUNK].to(device),
                            prompts.select(index.to(device)), null, steps, guidance).float().cpu())
    return Pairs(noise, prompt_index, torch.cat(targets))


def regression_batch_loss(teacher: Teacher, model, pairs: Pairs, prompts: Conditioning, batch_size: int,
                          config: VSDConfig, rng: torch.Generator) -> torch.Tensor:
    """L_reg on ``batch_size`` pairs drawn uniformly with ``rng``; ``model`` carries the generator
    (its adapter is activated by :func:`~wadi_distill.distill.one_step`)."""
    index = torch.randint(0, len(pairs), (batch_size,), generator=rng).to(pairs.noise.device)
    conditioning = prompts.select(pairs.prompt_index[index].to(prompts.hidden_states.device))
    x0 = one_step(teacher, model, pairs.noise[index], conditioning, config)
    return regression_loss(x0, pairs.target[index])
