"""Exponential moving average of adapter weights (off by default, as in the published recipe)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class AdapterEMA:
    """shadow <- decay * shadow + (1 - decay) * weight, for the named parameters of one adapter."""

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError("ema_decay must be between 0 and 1")
        self.decay = decay
        self.parameters = parameters
        self.shadow = {name: p.detach().clone().float() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, parameter in self.parameters.items():
            self.shadow[name].lerp_(parameter.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.contiguous().cpu() for name, tensor in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the adapter")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """Temporarily put the averaged weights into the adapter (e.g. to save or sample them)."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        for name, parameter in self.parameters.items():
            parameter.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(saved[name])
