"""LoRaD's geometry: which columns it pairs and what one unit of rank costs (WaDi §2).

The one definition the adapter (``wadi_distill.lorad``), the LoRaD fit (:mod:`.spectrum`) and the
planner (:mod:`.plan`) share, so the analysis measures exactly what the adapter trains.

A weight is viewed as rows (out, width), ``width = prod(shape[1:])`` (a Conv2d kernel (o, i, kh, kw)
is flattened row-major to (o, i*kh*kw)). LoRaD pairs adjacent columns (2k, 2k+1) of every row for
k < width // 2; with an odd width the last column has no partner and is never rotated. One angle per
row and pair is the angle field theta, of shape (out, width // 2), which LoRaD factorises as
theta = A @ B (A: out x r, B: r x width // 2), so one unit of rank costs

    cost_per_rank = out + width // 2    trainable parameters.
"""

from __future__ import annotations

import math

import torch


def row_width(weight_shape: torch.Size | tuple[int, ...]) -> int:
    """Flattened input width of a Linear (out, in) or Conv (out, in, *kernel) weight: prod(shape[1:])."""
    return math.prod(weight_shape[1:])


def angle_field_shape(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(out, width // 2): one rotation angle per row and column pair, the shape of LoRaD's theta."""
    return weight_shape[0], row_width(weight_shape) // 2


def cost_per_rank(weight_shape: torch.Size | tuple[int, ...]) -> int:
    """Trainable parameters per unit of LoRaD rank: out + width // 2 (one column of A, one row of B)."""
    return sum(angle_field_shape(weight_shape))


def paired_columns(weight_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(even, odd, unpaired) views of rows (out, width): columns 2k and 2k+1 for k < width // 2, each
    (out, width // 2), and the column without a partner, (out, width % 2)."""
    paired = 2 * (weight_rows.shape[1] // 2)
    return weight_rows[:, 0:paired:2], weight_rows[:, 1:paired:2], weight_rows[:, paired:]
