"""Norm / direction decomposition of weight rows: pure functions over tensors.

A weight is viewed as ``(out_channels, -1)``; row j (one output channel) splits into its norm
n_j = ||w_j|| and its direction v_j = w_j / n_j. Between a teacher row t and a student row s:

* relative norm change  = 100 * |n_s - n_t| / n_t                 (percent)
* direction change      = 100 * (1 - cos(s, t))                   (percent)
* angle                 = arccos(cos(s, t))                       (degrees)

``1 - cos`` is not computed from ``cos``: near cos = 1 that cancels catastrophically. With
d = s - t, ||d||^2 = (n_s - n_t)^2 + 2 n_s n_t (1 - cos), so

    1 - cos = (||d|| - |n_s - n_t|) (||d|| + |n_s - n_t|) / (2 n_s n_t),

which keeps full relative precision for tiny rotations, and the angle is 2 asin(sqrt((1 - cos) / 2)).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

BLOCK_ELEMENTS = 1 << 20  # rows are processed in blocks of about this many elements (fits in L2/L3)


def rows(weight: torch.Tensor) -> torch.Tensor:
    """The ``(out_channels, -1)`` view; a Conv2d kernel (o, i, kh, kw) becomes (o, i*kh*kw)."""
    return weight.reshape(weight.shape[0], -1)


@dataclass
class RowNorms:
    """Per-row norms of teacher, student and their difference, in float64."""

    teacher: torch.Tensor
    student: torch.Tensor
    difference: torch.Tensor


_scratch = threading.local()


def _scratch_buffer(elements: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer reused across calls: fresh multi-MB allocations would page-fault every block."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < elements:
        buffer = _scratch.buffer = torch.empty(elements, dtype=dtype)
    return buffer[:elements]


def row_norms(teacher: torch.Tensor, student: torch.Tensor, compute_dtype: torch.dtype = torch.float32,
              block_elements: int = BLOCK_ELEMENTS) -> RowNorms:
    """||t_j||, ||s_j|| and ||s_j - t_j|| for every row, computed blockwise in ``compute_dtype``.

    Half-precision inputs are converted a block of rows at a time into a reused buffer, so the float
    copy stays in cache and no full-size float32 copy of the layer is ever made.
    """
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError("statistics are computed in float32 or float64, never in half precision")
    teacher_rows, student_rows = rows(teacher), rows(student)
    out_rows, width = teacher_rows.shape
    norms = torch.empty(3, out_rows, dtype=compute_dtype)
    step = max(1, min(out_rows, block_elements // max(width, 1)))
    scratch = _scratch_buffer(2 * step * width, compute_dtype).view(2, step, width)
    norm = torch.linalg.vector_norm
    for start in range(0, out_rows, step):
        stop = min(start + step, out_rows)
        pair = scratch[:, : stop - start]
        pair[0].copy_(teacher_rows[start:stop])
        pair[1].copy_(student_rows[start:stop])
        norm(pair, dim=2, out=norms[0:2, start:stop])
        norm(pair[1].sub_(pair[0]), dim=1, out=norms[2, start:stop])
    norms = norms.double()
    return RowNorms(norms[0], norms[1], norms[2])


def relative_norm_change(n: RowNorms) -> torch.Tensor:
    """100 * |n_s - n_t| / n_t per row (inf/nan where the teacher row is zero)."""
    return 100.0 * (n.student - n.teacher).abs() / n.teacher


def one_minus_cos(n: RowNorms) -> torch.Tensor:
    """1 - cos(s_j, t_j) per row, by the cancellation-free formula in the module docstring."""
    gap = (n.student - n.teacher).abs()
    # ||d|| >= |n_s - n_t| holds exactly; rounding can break it by an ulp, so clamp at zero.
    value = (n.difference - gap).clamp_min(0) * (n.difference + gap) / (2.0 * n.student * n.teacher)
    return value.clamp(0.0, 2.0)


def direction_change(n: RowNorms) -> torch.Tensor:
    """100 * (1 - cos) per row, in percent."""
    return 100.0 * one_minus_cos(n)


def angle_degrees(n: RowNorms) -> torch.Tensor:
    """The angle between teacher and student rows, in degrees."""
    return torch.rad2deg(2.0 * torch.asin(torch.sqrt(one_minus_cos(n) / 2.0).clamp(max=1.0)))


def layer_statistics(n: RowNorms) -> dict[str, float | int]:
    """Mean/std (population, ddof=0) over the rows of one layer, plus layer-wide figures.

    Rows where either norm is zero have no direction; they are left out of every per-row statistic
    and counted in ``zero_norm_rows``. Rows with a non-finite norm are left out and counted in
    ``nonfinite_rows``.
    """
    finite = torch.isfinite(n.teacher) & torch.isfinite(n.student) & torch.isfinite(n.difference)
    nonzero = (n.teacher > 0) & (n.student > 0)
    valid = finite & nonzero
    stats: dict[str, float | int] = {
        "rows": int(n.teacher.numel()),
        "valid_rows": int(valid.sum()),
        "zero_norm_rows": int((finite & ~nonzero).sum()),
        "nonfinite_rows": int((~finite).sum()),
    }
    per_row = {
        "norm_change": relative_norm_change(n)[valid],
        "direction_change": direction_change(n)[valid],
        "angle_deg": angle_degrees(n)[valid],
    }
    for key, values in per_row.items():
        empty = values.numel() == 0
        stats[f"{key}_mean"] = math.nan if empty else values.mean().item()
        stats[f"{key}_std"] = math.nan if empty else values.std(correction=0).item()
        stats[f"{key}_max"] = math.nan if empty else values.max().item()
    teacher_energy = (n.teacher[finite] ** 2).sum().item()
    difference_energy = (n.difference[finite] ** 2).sum().item()
    stats["frobenius_change"] = (100.0 * math.sqrt(difference_energy / teacher_energy)
                                 if teacher_energy > 0 else math.nan)
    stats["identical"] = bool(finite.all() and (n.difference == 0).all())
    return stats
