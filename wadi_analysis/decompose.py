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

BLOCK_ELEMENTS = 1 << 20  # rows are processed in blocks of about this many elements (fits in L2/L3)
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

    Half-precision inputs are converted a block of rows at a time into a reused buffer, so the float
    copy stays in cache and no full-size float32 copy of the layer is ever made. The tangential part is
    sqrt(||d||^2 - radial^2) where the rotation carries at least half of ||d||^2 (no cancellation there),
    and ||d - radial v_t|| computed directly, in the block, for the other rows.
    """
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError("statistics are computed in float32 or float64, never in half precision")
    teacher_rows, student_rows = rows(teacher), rows(student)
    out_rows, width = teacher_rows.shape
    norms = torch.empty(3, out_rows, dtype=compute_dtype)
    along = torch.empty(out_rows, dtype=compute_dtype)  # d . t per row
    direct = torch.full((out_rows,), math.nan, dtype=torch.float64)  # ||d - radial v_t||, where computed
    step = max(1, min(out_rows, block_elements // max(width, 1)))
    scratch = _scratch_buffer(2 * step * width, compute_dtype).view(2, step, width)
    norm = torch.linalg.vector_norm
    for start in range(0, out_rows, step):
        stop = min(start + step, out_rows)
        pair = scratch[:, : stop - start]
        pair[0].copy_(teacher_rows[start:stop])
        pair[1].copy_(student_rows[start:stop])
        norm(pair, dim=2, out=norms[0:2, start:stop])
        difference = pair[1].sub_(pair[0])
        norm(difference, dim=1, out=norms[2, start:stop])
        torch.sum(pair[0].mul_(difference), dim=1, out=along[start:stop])  # the teacher block is spent
        # radial^2 > ||d||^2 / 2, i.e. (d.t)^2 > (||d|| ||t||)^2 / 2 (NaN: a zero teacher row, included)
        rescaling = ~(along[start:stop].square() <= 0.5 * (norms[2, start:stop] * norms[0, start:stop]).square())
        if rescaling.any():
            _direct_tangential(teacher_rows[start:stop], difference, pair[0], norms[0, start:stop], along[start:stop],
                               rescaling, direct[start:stop])
    norms, along = norms.double(), along.double()
    radial = along / norms[0]
    tangential = torch.where(direct.isnan(), (norms[2].square() - radial.square()).clamp_min(0).sqrt(), direct)
    return RowNorms(norms[0], norms[1], norms[2], radial, tangential)


def _direct_tangential(teacher_block: torch.Tensor, difference: torch.Tensor, spent: torch.Tensor,
                       teacher_norm: torch.Tensor, along: torch.Tensor, rows_wanted: torch.Tensor,
                       out: torch.Tensor) -> None:
    """``out[rows_wanted] = ||d - (d.t / ||t||^2) t||`` for one block (``spent``: scratch of its shape)."""
    energy = teacher_norm.square()
    coefficient = torch.where(energy > 0, along / energy, 0.0)
    index = rows_wanted.nonzero().squeeze(1)
    if 8 * len(index) < len(rows_wanted):  # a few rows: gather them
        residual = difference[index] - coefficient[index].unsqueeze(1) * teacher_block[index].to(difference.dtype)
        out[index] = torch.linalg.vector_norm(residual, dim=1).double()
    else:  # many rows: the whole block, in place
        spent.copy_(teacher_block).mul_(-coefficient.unsqueeze(1)).add_(difference)
        out[index] = torch.linalg.vector_norm(spent, dim=1).double()[index]


def norm_gap(n: RowNorms) -> torch.Tensor:
    """n_s - n_t per row, as (2 d.t + ||d||^2) / (n_s + n_t) (see the module docstring)."""
    twice_along = torch.where(n.teacher > 0, 2.0 * n.radial * n.teacher, 0.0)  # 2 d.t (zero teacher row: 0)
    return (twice_along + n.difference.square()) / (n.student + n.teacher)


def relative_norm_change(n: RowNorms) -> torch.Tensor:
    """100 * |n_s - n_t| / n_t per row (inf/nan where the teacher row is zero)."""
    return 100.0 * norm_gap(n).abs() / n.teacher


def one_minus_cos(n: RowNorms) -> torch.Tensor:
    """1 - cos(s_j, t_j) per row, by the cancellation-free formula in the module docstring."""
    gap = norm_gap(n).abs()
    # ||d|| >= |n_s - n_t| holds exactly; rounding can break it by an ulp, so clamp at zero.
    value = (n.difference - gap).clamp_min(0) * (n.difference + gap) / (2.0 * n.student * n.teacher)
    return value.clamp(0.0, 2.0)


def direction_change(n: RowNorms) -> torch.Tensor:
    """100 * (1 - cos) per row, in percent."""
    return 100.0 * one_minus_cos(n)


def angle_degrees(n: RowNorms) -> torch.Tensor:
    """The angle between teacher and student rows, in degrees."""
    return torch.rad2deg(2.0 * torch.asin(torch.sqrt(one_minus_cos(n) / 2.0).clamp(max=1.0)))


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
        "radial_change": radial_part(n)[valid].abs(),
        "tangential_change": tangential_part(n)[valid],
    }
    for key, values in per_row.items():
        empty = values.numel() == 0
        stats[f"{key}_mean"] = math.nan if empty else values.mean().item()
        stats[f"{key}_std"] = math.nan if empty else values.std(correction=0).item()
        stats[f"{key}_max"] = math.nan if empty else values.max().item()
    tangential_energy = n.tangential[valid].square().sum().item()
    change_energy = tangential_energy + n.radial[valid].square().sum().item()
    stats["rotation_share"] = 100.0 * tangential_energy / change_energy if change_energy > 0 else math.nan
    at_rounding = stats["norm_change_mean"] <= rounding_level
    ratio = None if at_rounding else angle_to_norm_ratio(stats["angle_deg_mean"], stats["norm_change_mean"])
    stats["angle_to_norm_ratio"] = math.nan if ratio is None else ratio
    teacher_energy = (n.teacher[finite] ** 2).sum().item()
    difference_energy = (n.difference[finite] ** 2).sum().item()
    stats["frobenius_change"] = (100.0 * math.sqrt(difference_energy / teacher_energy)
                                 if teacher_energy > 0 else math.nan)
    stats["norm_rounding_level"] = rounding_level
    stats["identical"] = bool(finite.all() and (n.difference == 0).all())
    return stats
