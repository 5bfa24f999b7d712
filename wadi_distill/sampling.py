"""Multi-step sampling from a teacher: plain functions over tensors (k-diffusion style), no scheduler state.

DDIM (η = 0) on the teacher's own ᾱ table with "trailing" timestep spacing, so one step starts at the
last training timestep — the same x_T the one-step generator starts from — and the teacher used as a
one-step generator is simply ``ddim(steps=1)``.
"""

from __future__ import annotations

import torch

from .teacher import Conditioning, Teacher
from .distill import guided_epsilon


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps from the last one down, evenly spaced ("trailing", as in diffusers)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [int(round(num_timesteps - i * num_timesteps / steps)) - 1 for i in range(steps)]


@torch.no_grad()
def ddim(teacher: Teacher, model, noise: torch.Tensor, conditioning: Conditioning, null: Conditioning,
         steps: int, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM from x_T = ``noise`` to x_0 in ``steps`` teacher evaluations (each with CFG)."""
    x = noise
    timesteps = trailing_timesteps(teacher.num_timesteps, steps)
    alphas = teacher.alphas_cumprod.to(device=noise.device)
    for index, timestep in enumerate(timesteps):
        timesteps_now = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
        epsilon = guided_epsilon(teacher, model, None, x, timesteps_now, conditioning, null, guidance_scale)
        alpha = alphas[timestep].to(x.dtype)
        x0 = (x - (1 - alpha).sqrt() * epsilon) / alpha.sqrt()
        if index + 1 == len(timesteps):
            return x0
        alpha_next = alphas[timesteps[index + 1]].to(x.dtype)
        x = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * epsilon
    return x
