"""Comparisons of tensors the tests share."""

from __future__ import annotations

import torch


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()
