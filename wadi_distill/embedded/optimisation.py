"""The optimisation every embedded model's training shares (the VAE, both teachers, the ControlNet):
AdamW whose learning rate warms up linearly over ``warmup`` steps, then decays as a cosine to 0 at
``steps``; each step's gradients clipped to norm 1; the EMA of the saved weights."""

from __future__ import annotations

import math

import torch


def adamw_warmup_cosine(parameters, lr: float, warmup: int, steps: int):
    """(optimizer, schedule): AdamW (no weight decay) at lr · min(1, (s + 1) / warmup) · ½(1 + cos(π min(s, steps) / steps))."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, schedule


def clipped_step(loss: torch.Tensor, optimizer, schedule, parameters, max_norm: float = 1.0) -> float:
    """Backpropagate ``loss``, clip the gradients of ``parameters`` to ``max_norm``, step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()
    schedule.step()
    return loss.item()


@torch.no_grad()
def ema_update(pairs, step: int, decay: float) -> None:
    """averaged ← averaged + (1 − d)(live − averaged) for each (averaged, live) pair, d = min(decay, (1 + step) / (10 + step))
    (a short memory early on, as the first steps' weights are far from the last)."""
    d = min(decay, (1 + step) / (10 + step))
    for averaged, live in pairs:
        averaged.lerp_(live, 1 - d)
