"""Drawing helpers shared by the report's figures: untrusted text made matplotlib-safe, notes inside an
axes, readable log-axis ticks, histogram bins that survive a (nearly) constant column."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .tables import clean

CONSTANT_SPREAD = 1e-9  # values that differ by less than this (relative) are one value: a constant column


def plain(text, limit: int | None = 48) -> str:
    """Untrusted text made safe for matplotlib: control characters removed, ``$`` escaped (no mathtext)."""
    return clean(text, limit).replace("$", r"\$")


def note(ax, text: str, where: str = "bottom") -> None:
    """A grey note inside the axes: bottom-left, centre, or top-centre."""
    x, y, ha, va = {"bottom": (0.01, 0.01, "left", "bottom"), "center": (0.5, 0.5, "center", "center"),
                    "top": (0.5, 0.75, "center", "center")}[where]
    ax.text(x, y, text, transform=ax.transAxes, fontsize=9, ha=ha, va=va, color="0.3")


def power_of_ten(value: float, _position=None) -> str:
    """A log-axis tick label: ``10^k`` or ``m×10^k`` (mathtext; tick values are ours, never untrusted)."""
    if not value > 0:
        return ""
    exponent = int(np.floor(np.log10(value) + 1e-9))
    mantissa = round(value / 10.0 ** exponent, 6)
    return f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa:g}{{\\times}}10^{{{exponent}}}$"


def log_ticks(axis, *arrays: np.ndarray) -> None:
    """Readable log ticks: labels at 1, 2, 5 x 10^k when the data span under 1.5 decades, else at
    powers of ten only; minor ticks never labelled (their labels overlap)."""
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    v = v[np.isfinite(v) & (v > 0)]
    decades = np.log10(v.max() / v.min()) if len(v) >= 2 else 0.0
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 1.5 else (1.0,), numticks=9))
    axis.set_major_formatter(FuncFormatter(power_of_ten))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2.0, 10.0), numticks=9))
    axis.set_minor_formatter(NullFormatter())


def histogram_bins(v: np.ndarray, log: bool, count: int = 40) -> np.ndarray:
    """Histogram edges over the finite (log: positive) values; one centred bin for (nearly) one value."""
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if not len(v):
        return np.linspace(0, 1, 2)
    lo, hi = (np.log10(v.min()), np.log10(v.max())) if log else (v.min(), v.max())
    if hi - lo <= CONSTANT_SPREAD * max(abs(lo), abs(hi), 1e-300):  # (nearly) one value: one centred bin
        middle = (lo + hi) / 2
        return 10 ** np.array([middle - 0.5, middle + 0.5]) if log else np.array([middle - 0.5, middle + 0.5])
    edges = np.linspace(lo, hi, min(count, max(5, len(v))) + 1)
    return 10 ** edges if log else edges
