"""Comparisons of tensors the tests share."""

from __future__ import annotations

import torch


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def adapted_model_pass(kernel: str, channels: int, size: int, out_features: int, ranks: dict) -> list:
    """Output and adapter gradients of a LoRaD-adapted Conv2d + Linear model (fixed seeds) with the rotation
    run by ``kernel`` (``set_rotation_kernel``): what the rotation kernels' tests compare with eager's."""
    from torch import nn

    from wadi_distill import lorad
    from wadi_distill.lorad.rotation import set_rotation_kernel

    set_rotation_kernel(kernel)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, channels + 2, 3, padding=1), nn.Flatten(),
                          nn.Linear((channels + 2) * size * size, out_features))
    lorad.add_adapter(model, "g", ranks)
    lorad.set_adapter(model, "g")
    with torch.no_grad():
        for p in lorad.adapter_parameters(model, "g"):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    out = model(torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(3)))
    out.square().sum().backward()
    return [out.detach()] + [p.grad for p in lorad.adapter_parameters(model, "g")]
