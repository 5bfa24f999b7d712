"""Norm / direction decomposition of weight rows: pure functions over tensors.

A weight is viewed as ``(out_channels, -1)``; row j (one output channel) splits into its norm
n_j = ||w_j|| and its direction v_j = w_j / n_j. Between a teacher row t and a student row s, with
d = s - t:

* relative norm change  = 100 * |n_s - n_t| / n_t                 (percent)
* direction change      = 100 * (1 - cos(s, t))                   (percent; second order, ~ theta^2 / 2)
* angle                 = arccos(cos(s, t))                       (degrees)
* radial part           = d . v_t = n_s cos - n_t                 (the rescaling; percent of n_t)
* tangential part       = ||d - (d . v_t) v_t|| = n_s sin         (the rotation; percent of n_t)

Radial and tangential parts are the first-order split of the change: ||d||^2 = radial^2 + tangential^2,
a pure rotation by theta gives (cos theta - 1, sin theta) * 100 %, a pure scaling by s gives (s - 1, 0).
The tangential part is computed directly as the norm of d minus its radial component (not as
sqrt(||d||^2 - radial^2), which loses half the digits when the change is nearly all rescaling).

Nothing is taken from a difference of separately computed norms. From ||s||^2 = ||t||^2 + 2 d.t + ||d||^2,

    n_s - n_t = (2 d.t + ||d||^2) / (n_s + n_t),

whose rounding error scales with ||d|| rather than with n (so a pure rotation measures a norm change
at the storage rounding, not at the summation error of two long norms), and

    1 - cos = (||d|| - |n_s - n_t|) (||d|| + |n_s - n_t|) / (2 n_s n_t),

which keeps full relative precision for tiny rotations; the angle is 2 asin(sqrt((1 - cos) / 2)).

Rounding level. One rounding of every element to a format of unit roundoff u (u = eps / 2) moves a
row's relative norm by at most u, and independent roundings average out: about u / sqrt(width) over a
row of ``width`` elements. :func:`norm_rounding_level` is ``ROUNDING_ULPS`` times that, with float32
as the floor (training arithmetic is float32 at best); a layer whose mean relative norm change is at
most this level has its norms preserved at rounding, and a direction / norm ratio is then no
measurement.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

BLOCK_ELEMENTS = 1 << 16  # rows are processed in blocks of about this many elements: two float32 slots fit in L2
PER_ROW_STATISTICS = ("norm_change", "direction_change", "angle_deg", "radial_change", "tangential_change")
ROUNDING_ULPS = 4  # the rounding level, in units of roundoff averaged over a row (see the module docstring)


def rows(weight: torch.Tensor) -> torch.Tensor:
    """The ``(out_channels, -1)`` view; a Conv2d kernel (o, i, kh, kw) becomes (o, i*kh*kw)."""
    return weight.reshape(weight.shape[0], -1)


@dataclass
class RowNorms:
    """Per row, in float64: the norms of teacher, student and difference d = s - t, the radial part
    d . v_t (signed) and the tangential part ||d - (d . v_t) v_t||, all in the weight's units."""

    teacher: torch.Tensor
    student: torch.Tensor
    difference: torch.Tensor
    radial: torch.Tensor
    tangential: torch.Tensor


_scratch = threading.local()


def _scratch_buffer(elements: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer reused across calls: fresh multi-MB allocations would page-fault every block."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < elements:
        buffer = _scratch.buffer = torch.empty(elements, dtype=dtype)
    return buffer[:elements]


def row_norms(teacher: torch.Tensor, student: torch.Tensor, compute_dtype: torch.dtype = torch.float32,
              block_elements: int = BLOCK_ELEMENTS) -> RowNorms:
    """Norms, radial and tangential parts of every row, computed blockwise in ``compute_dtype``.

    One pass over the inputs: a block of rows of t and d = s - t is converted into a reused,
    cache-sized buffer and one batched product gives each row's Gram matrix [t; d] [t; d]^T, i.e.
    ||t||^2, d.t and ||d||^2, each summed directly (no full-size float copy of the layer is made).
    Then ||s||^2 = ||t||^2 + 2 d.t + ||d||^2, a sum of terms that cannot cancel much where
    ||t||^2 + 2 |d.t| + ||d||^2 <= 2 ||s||^2 (rounding at most doubled); the rows outside that (a row
    shrunk to or near zero) are summed directly. The tangential part is sqrt(||d||^2 - radial^2) where
    the rotation carries at least half of ||d||^2 (no cancellation there), and ||d - radial v_t||
    summed directly for the other rows. The rows summed directly are read from the inputs again.
    """
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError("statistics are computed in float32 or float64, never in half precision")
    teacher_rows, student_rows = rows(teacher), rows(student)
    out_rows, width = teacher_rows.shape
    gram = torch.empty(out_rows, 2, 2, dtype=compute_dtype)
    step = max(1, min(out_rows, block_elements // max(width, 1)))
    scratch = _scratch_buffer(2 * step * width, compute_dtype).view(step, 2, width)
    full = _block_views(scratch)  # made once; only a last, shorter block needs its own
    # split() makes every block's input views in one call: per block, four kernel calls and no more.
    for t_block, s_block, g_block in zip(teacher_rows.split(step), student_rows.split(step), gram.split(step)):
        count = t_block.shape[0]
        teacher_slot, difference_slot, block, block_t = full if count == step else _block_views(scratch[:count])
        teacher_slot.copy_(t_block)
        difference_slot.copy_(s_block).sub_(teacher_slot)
        torch.bmm(block, block_t, out=g_block)  # while the block is still in cache
    gram = gram.double()
    teacher_energy, along, difference_energy = gram[:, 0, 0], gram[:, 1, 0], gram[:, 1, 1]
    student_energy = teacher_energy + 2.0 * along + difference_energy
    cancelling = ~(teacher_energy + 2.0 * along.abs() + difference_energy <= 2.0 * student_energy)  # NaN included
    if cancelling.any():
        index = cancelling.nonzero().squeeze(1)
        student_energy[index] = _direct_norms(student_rows, index, step, compute_dtype).square()
    teacher_norm, student_norm, difference_norm = teacher_energy.sqrt(), student_energy.sqrt(), difference_energy.sqrt()
    radial = along / teacher_norm
    tangential = (difference_energy - radial.square()).clamp_min(0).sqrt()
    # radial^2 > ||d||^2 / 2, i.e. (d.t)^2 > ||d||^2 ||t||^2 / 2 (NaN rows included: they stay NaN)
    rescaling = ~(along.square() <= 0.5 * difference_energy * teacher_energy)
    if rescaling.any():
        index = rescaling.nonzero().squeeze(1)
        coefficient = torch.where(teacher_energy > 0, along / teacher_energy, 0.0).to(compute_dtype)
        tangential[index] = _direct_tangential(teacher_rows, student_rows, coefficient, index, step, compute_dtype)
    return RowNorms(teacher_norm, student_norm, difference_norm, radial, tangential)


def _block_views(block: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The teacher and difference slots of a ``(rows, 2, width)`` block, it and its transpose."""
    return (*block.unbind(1), block, block.transpose(1, 2))


def _direct_norms(weight_rows: torch.Tensor, index: torch.Tensor, step: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """``||w_j||`` for the rows ``index``, ``step`` rows at a time, in float64."""
    return torch.cat([torch.linalg.vector_norm(weight_rows[chunk].to(compute_dtype), dim=1).double()
                      for chunk in index.split(step)])


def _direct_tangential(teacher_rows: torch.Tensor, student_rows: torch.Tensor, coefficient: torch.Tensor,
                       index: torch.Tensor, step: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """``||d - c t||`` (c = d.t / ||t||^2) for the rows ``index``, ``step`` rows at a time, in float64."""
    out = []
    for chunk in index.split(step):
        teacher_block = teacher_rows[chunk].to(compute_dtype)
        residual = student_rows[chunk].to(compute_dtype).sub_(teacher_block)
        residual.sub_(teacher_block.mul_(coefficient[chunk].unsqueeze(1)))
        out.append(torch.linalg.vector_norm(residual, dim=1).double())
    return torch.cat(out)


def norm_gap(n: RowNorms) -> torch.Tensor:
    """n_s - n_t per row, as (2 d.t + ||d||^2) / (n_s + n_t) (see the module docstring)."""
    twice_along = torch.where(n.teacher > 0, 2.0 * n.radial * n.teacher, 0.0)  # 2 d.t (zero teacher row: 0)
    return (twice_along + n.difference.square()) / (n.student + n.teacher)


def relative_norm_change(n: RowNorms, gap: torch.Tensor | None = None) -> torch.Tensor:
    """100 * |n_s - n_t| / n_t per row (inf/nan where the teacher row is zero); ``gap``: norm_gap(n)."""
    return 100.0 * (norm_gap(n) if gap is None else gap).abs() / n.teacher


def one_minus_cos(n: RowNorms, gap: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cos(s_j, t_j) per row, by the cancellation-free formula in the module docstring."""
    gap = (norm_gap(n) if gap is None else gap).abs()
    # ||d|| >= |n_s - n_t| holds exactly; rounding can break it by an ulp, so clamp at zero.
    value = (n.difference - gap).clamp_min(0) * (n.difference + gap) / (2.0 * n.student * n.teacher)
    return value.clamp(0.0, 2.0)


def direction_change(n: RowNorms, cosine_gap: torch.Tensor | None = None) -> torch.Tensor:
    """100 * (1 - cos) per row, in percent; ``cosine_gap``: one_minus_cos(n), if at hand."""
    return 100.0 * (one_minus_cos(n) if cosine_gap is None else cosine_gap)


def angle_degrees(n: RowNorms, cosine_gap: torch.Tensor | None = None) -> torch.Tensor:
    """The angle between teacher and student rows, in degrees: 2 asin(sqrt((1 - cos) / 2))."""
    cosine_gap = one_minus_cos(n) if cosine_gap is None else cosine_gap
    return torch.rad2deg(2.0 * torch.asin(torch.sqrt(cosine_gap / 2.0).clamp(max=1.0)))


def radial_part(n: RowNorms) -> torch.Tensor:
    """100 * (d . v_t) / n_t per row, signed (negative: the row shrank along its own direction)."""
    return 100.0 * n.radial / n.teacher


def tangential_part(n: RowNorms) -> torch.Tensor:
    """100 * ||d - (d . v_t) v_t|| / n_t per row: the rotation, to first order the angle in radians x 100."""
    return 100.0 * n.tangential / n.teacher


def unit_roundoff(dtype: torch.dtype | str) -> float:
    """u = eps / 2 of a floating dtype (``torch.float16`` or its name ``"float16"``); NaN if unknown."""
    try:
        return torch.finfo(getattr(torch, dtype) if isinstance(dtype, str) else dtype).eps / 2
    except (AttributeError, TypeError):
        return math.nan


def norm_rounding_level(width: int, *dtypes: torch.dtype | str) -> float:
    """The relative norm change (percent) rounding alone can make in rows of ``width`` elements stored
    in ``dtypes``: ``100 * ROUNDING_ULPS * max(u / sqrt(width), u_float32)``, u the coarsest unit roundoff."""
    roundoff = max([unit_roundoff(torch.float32)] + [unit_roundoff(d) for d in dtypes])
    return 100.0 * ROUNDING_ULPS * max(roundoff / math.sqrt(max(width, 1)), unit_roundoff(torch.float32))


def angle_to_norm_ratio(angle_deg: float | None, norm_change: float | None) -> float | None:
    """The first-order ratio: an angle (degrees, converted to radians) over a relative norm change (%,
    converted to a fraction); None where either is missing or the norm change is zero."""
    if angle_deg is None or norm_change is None or not norm_change > 0 or not math.isfinite(angle_deg):
        return None
    ratio = math.radians(angle_deg) / (norm_change / 100.0)
    return ratio if math.isfinite(ratio) else None


def layer_statistics(n: RowNorms, rounding_level: float = math.nan) -> dict[str, float | int]:
    """Mean/std (population, ddof=0) over the rows of one layer, plus layer-wide figures.

    Rows where either norm is zero have no direction; they are left out of every per-row statistic
    and counted in ``zero_norm_rows``. Rows with a non-finite norm are left out and counted in
    ``nonfinite_rows``. ``rotation_share`` is the tangential share of ||W_s - W_t||^2 over the valid
    rows (percent); ``angle_to_norm_ratio`` the layer's mean angle (radians) over its mean relative norm
    change, NaN when that change is at most ``rounding_level`` (percent, :func:`norm_rounding_level`).
    """
    finite = torch.isfinite(n.teacher) & torch.isfinite(n.student) & torch.isfinite(n.difference)
    nonzero = (n.teacher > 0) & (n.student > 0)
    valid = finite & nonzero
    counts = torch.stack([valid, finite & ~nonzero, ~finite]).sum(dim=1).tolist()
    stats: dict[str, float | int] = {"rows": int(n.teacher.numel()), "valid_rows": counts[0],
                                     "zero_norm_rows": counts[1], "nonfinite_rows": counts[2]}
    # Each per-row figure is one (5, rows) stack, reduced in three calls: a layer costs few kernel calls.
    gap = norm_gap(n)
    cosine_gap = one_minus_cos(n, gap)
    per_row = torch.stack([relative_norm_change(n, gap), direction_change(n, cosine_gap),
                           angle_degrees(n, cosine_gap), radial_part(n).abs(), tangential_part(n)])[:, valid]
    empty = per_row.shape[1] == 0
    moments = [[math.nan] * len(PER_ROW_STATISTICS)] * 3 if empty else [
        per_row.mean(dim=1).tolist(), per_row.std(dim=1, correction=0).tolist(), per_row.amax(dim=1).tolist()]
    for i, key in enumerate(PER_ROW_STATISTICS):
        for moment, values in zip(("mean", "std", "max"), moments):
            stats[f"{key}_{moment}"] = values[i]
    tangential_energy, radial_energy = torch.stack([n.tangential, n.radial])[:, valid].square().sum(dim=1).tolist()
    change_energy = tangential_energy + radial_energy
    stats["rotation_share"] = 100.0 * tangential_energy / change_energy if change_energy > 0 else math.nan
    at_rounding = stats["norm_change_mean"] <= rounding_level
    ratio = None if at_rounding else angle_to_norm_ratio(stats["angle_deg_mean"], stats["norm_change_mean"])
    stats["angle_to_norm_ratio"] = math.nan if ratio is None else ratio
    teacher_energy, difference_energy = torch.stack([n.teacher, n.difference])[:, finite].square().sum(dim=1).tolist()
    stats["frobenius_change"] = (100.0 * math.sqrt(difference_energy / teacher_energy)
                                 if teacher_energy > 0 else math.nan)
    stats["norm_rounding_level"] = rounding_level
    stats["identical"] = bool(finite.all() and (n.difference == 0).all())
    return stats
