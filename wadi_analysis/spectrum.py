"""Residual spectra and the LoRaD fit of one layer: pure functions over a teacher/student weight pair.

Residual spectrum (WaDi Fig 1b). For R = W_s - W_t viewed as (out, -1), the singular values s_i give
the energy sum(s_i^2) = ||R||_F^2. Reported: the share of energy in the top ``fraction`` of the full
rank (k = ceil(fraction * min(out, in))) and the rank needed for 90/93/95 % of the energy. The
"direction residual" does the same for V_s - V_t, the difference of the row-normalised weights.
Exact and fast: s_i^2 are the eigenvalues of the smaller Gram matrix (R R^T or R^T R), computed in
float64 — a fraction of the cost of an SVD, with the same energies.

LoRaD fit. LoRaD can only rotate adjacent column pairs (2k, 2k+1) of each row (the pairing of
:mod:`.geometry`, the adapter's own). The best rotation of
a teacher pair p_t towards the student pair p_s has angle atan2(p_t x p_s, p_t . p_s) and leaves
p_s - R p_t = (|p_s| - |p_t|) p_s/|p_s|: what no rotation can express is the pair-norm change. The
fit is the share of ||W_s - W_t||^2 a pure pair rotation explains; the angle field theta (out x in/2)
is what LoRaD factorises as A @ B, so its rank for 90 % energy says which LoRaD rank the layer needs.
"""

from __future__ import annotations

import math

import torch

from .decompose import rows
from .geometry import paired_columns

ENERGY_LEVELS = (0.90, 0.93, 0.95)
PAPER_RANK_FRACTION = 0.3  # WaDi Fig 1b: the share of residual energy in the top 30 % of the rank
DEFAULT_SPECTRUM_FRACTIONS = (0.1, 0.2, PAPER_RANK_FRACTION, 0.5, 0.7)  # compare --spectrum's energy curve


def gram_eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """Squared singular values of ``matrix`` (2-D), descending, from the smaller Gram matrix in float64.

    BLAS ``dsyrk`` builds only one triangle of the Gram matrix (half the work of a matmul) and LAPACK's
    divide-and-conquer ``syevd`` returns its eigenvalues: ~20x less work than an SVD, same energies.
    """
    from scipy.linalg import eigh  # here, not at import: compare without --spectrum never needs scipy
    from scipy.linalg.blas import dsyrk

    values = matrix.detach().double().cpu().contiguous().numpy()
    if values.size == 0:
        return torch.zeros(0, dtype=torch.float64)
    # values.T is Fortran-ordered (no copy); trans=1 gives values @ values.T, trans=0 values.T @ values.
    gram = dsyrk(1.0, values.T, trans=1 if values.shape[0] <= values.shape[1] else 0)
    eigenvalues = eigh(gram, eigvals_only=True, lower=False, check_finite=False, overwrite_a=True, driver="evd")
    return torch.from_numpy(eigenvalues[::-1].copy()).clamp_min(0.0)


def numerical_rank(squared_singular_values: torch.Tensor, shape: tuple[int, int], storage_eps: float,
                   weight_frobenius: float) -> int:
    """Singular values above the noise floor: storage rounding of the weights (about
    eps * rms(w) * (sqrt(m) + sqrt(n)) in spectral norm) and float64 round-off of the Gram matrix."""
    if squared_singular_values.numel() == 0 or squared_singular_values[0] == 0:
        return 0
    m, n = shape
    rounding = 10 * storage_eps * weight_frobenius * (math.sqrt(m) + math.sqrt(n)) / math.sqrt(m * n)
    gram_roundoff = 10 * max(shape) * torch.finfo(torch.float64).eps * squared_singular_values[0].item()
    return int((squared_singular_values > max(rounding ** 2, gram_roundoff)).sum().item())


def energy_profile(squared_singular_values: torch.Tensor, fractions=(PAPER_RANK_FRACTION,), levels=ENERGY_LEVELS,
                   prefix: str = "residual") -> dict[str, float]:
    """Energy share at the top ``fractions`` of the rank and the rank needed for each energy ``level``."""
    full_rank = squared_singular_values.numel()
    total = squared_singular_values.sum().item()
    out: dict[str, float] = {f"{prefix}_full_rank": full_rank}
    if total <= 0 or not math.isfinite(total):
        for fraction in fractions:
            out[f"{prefix}_energy_top{round(100 * fraction)}"] = math.nan
        for level in levels:
            out[f"{prefix}_rank_{round(100 * level)}"] = math.nan
            out[f"{prefix}_rank_rel_{round(100 * level)}"] = math.nan
        return out
    cumulative = torch.cumsum(squared_singular_values, 0) / total
    for fraction in fractions:
        k = max(1, math.ceil(fraction * full_rank))
        out[f"{prefix}_energy_top{round(100 * fraction)}"] = 100.0 * cumulative[k - 1].item()
    for level in levels:
        # Smallest k whose cumulative share reaches the level (a hair of slack for rounding).
        k = int(torch.searchsorted(cumulative, torch.tensor([level - 1e-12], dtype=cumulative.dtype)).item()) + 1
        out[f"{prefix}_rank_{round(100 * level)}"] = min(k, full_rank)
        out[f"{prefix}_rank_rel_{round(100 * level)}"] = min(k, full_rank) / full_rank
    return out


def unit_rows(weight_rows: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norms; zero rows stay zero."""
    norms = weight_rows.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, weight_rows / norms.clamp_min(torch.finfo(weight_rows.dtype).tiny), 0.0)


def residual_spectra(teacher: torch.Tensor, student: torch.Tensor, fractions=(PAPER_RANK_FRACTION,),
                     levels=ENERGY_LEVELS) -> dict[str, float]:
    """Spectrum figures of the weight residual and of the direction residual of one layer."""
    t, s = rows(teacher).double(), rows(student).double()
    eigenvalues = gram_eigenvalues(s - t)
    out = energy_profile(eigenvalues, fractions, levels, prefix="residual")
    # The rank the residual really has, at the precision the weights were stored in.
    eps = max(torch.finfo(teacher.dtype).eps, torch.finfo(student.dtype).eps)
    out["residual_rank"] = numerical_rank(eigenvalues, tuple(t.shape), eps, t.norm().item())
    out.update(energy_profile(gram_eigenvalues(unit_rows(s) - unit_rows(t)), fractions, levels,
                              prefix="direction_residual"))
    return out


def pair_rotation_angles(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The angle field (out x width // 2): per row and column pair, atan2(p_t x p_s, p_t . p_s), the
    rotation taking the teacher pair p_t to the student pair p_s."""
    t_even, t_odd, _ = paired_columns(rows(teacher).double())
    s_even, s_odd, _ = paired_columns(rows(student).double())
    return torch.atan2(t_even * s_odd - t_odd * s_even, t_even * s_even + t_odd * s_odd)


def lorad_fit(teacher: torch.Tensor, student: torch.Tensor, levels=(0.90,)) -> dict[str, float]:
    """How much of the layer's change a pure pairwise rotation can express, and the angle field's rank:
    fit = 100 * (1 - (sum (|p_s| - |p_t|)^2 + ||unpaired_s - unpaired_t||^2) / ||W_s - W_t||^2)."""
    t, s = rows(teacher).double(), rows(student).double()
    t_even, t_odd, t_unpaired = paired_columns(t)
    s_even, s_odd, s_unpaired = paired_columns(s)
    change = (s - t).square().sum().item()
    pair_norm_change = (torch.hypot(s_even, s_odd) - torch.hypot(t_even, t_odd)).square().sum().item()
    unpaired_change = (s_unpaired - t_unpaired).square().sum().item()
    out = {"lorad_fit": 100.0 * (1.0 - (pair_norm_change + unpaired_change) / change) if change > 0 else math.nan}
    if t_even.shape[1]:
        profile = energy_profile(gram_eigenvalues(pair_rotation_angles(teacher, student)), (), levels,
                                 prefix="angle_field")
        out.update({k: v for k, v in profile.items() if "rank" in k})
    return out
