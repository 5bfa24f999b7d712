"""The all-layer summary of a comparison (``summary.json``), from the per-layer table alone.

Averages over layers of the per-layer means and stds (plain, and ``*_weighted`` by parameter count),
and their ratios:

* ``direction_to_norm_{mean,std}_ratio``: the paper's 100 (1 - cos) over the relative norm change —
  second order in the angle over first order, so it grows with how far the student moved;
* ``angle_to_norm_{mean,std}_ratio``: the first-order ratio, the angle in radians over the relative
  norm change (as fractions), beside it; ``radial_change_*`` / ``tangential_change_*`` and
  ``rotation_share_mean`` are the first-order split of each row's change
  (:mod:`wadi_analysis.decompose`).

When every changed layer's norm change is at the rounding level of its stored dtypes
(:func:`wadi_analysis.decompose.norm_rounding_level`) — a LoRaD student — ``norms_preserved_at_rounding``
is true and both ratios are None: a ratio to rounding is no measurement.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .decompose import angle_to_norm_ratio, norm_rounding_level

STAT_NAMES = ("norm_change", "direction_change", "angle_deg", "radial_change", "tangential_change")
RATIO_KEYS = tuple(f"{kind}_to_norm_{moment}_ratio{suffix}" for kind in ("direction", "angle")
                   for moment in ("mean", "std") for suffix in ("", "_weighted"))
TOP_ROTATION_LAYERS = 10  # summary.json's top_rotation_layers: the layers with the largest mean direction change
TOP_ROTATION_COLUMNS = ("direction_change_mean", "angle_deg_mean", "tangential_change_mean", "norm_change_mean")


def _column(frame: pd.DataFrame, column: str) -> pd.Series:
    """A column as floats (missing: all NaN), so tables from older comparisons still summarise."""
    if column not in frame.columns:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[column], errors="coerce").astype(float)


def _mean_or_none(values: pd.Series, weights: pd.Series | None = None) -> float | None:
    mask = values.notna()
    if not mask.any():
        return None
    if weights is None:
        return float(values[mask].mean())
    return float((values[mask] * weights[mask]).sum() / weights[mask].sum())


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or not math.isfinite(numerator / denominator):
        return None
    return numerator / denominator


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def rounding_levels(layers: pd.DataFrame) -> pd.Series:
    """Each layer's norm rounding level (%): the ``norm_rounding_level`` column, or where it is absent
    computed from ``dtype``, ``student_dtype`` and the row width ``numel / rows``."""
    levels = _column(layers, "norm_rounding_level")
    if levels.notna().all() or not {"dtype", "numel", "rows"} <= set(layers.columns):
        return levels
    widths = (_column(layers, "numel") / _column(layers, "rows")).fillna(1.0)
    student = layers["student_dtype"] if "student_dtype" in layers.columns else layers["dtype"]
    computed = [norm_rounding_level(int(w), str(t), str(s)) for w, t, s in zip(widths, layers["dtype"], student)]
    return levels.fillna(pd.Series(computed, index=layers.index, dtype=float))


def norms_at_rounding(layers: pd.DataFrame) -> pd.Series:
    """Per layer: True where the mean relative norm change is at most the layer's rounding level."""
    return _column(layers, "norm_change_mean") <= rounding_levels(layers)


def top_rotation_layers(layers: pd.DataFrame, count: int = TOP_ROTATION_LAYERS) -> list[dict]:
    """The ``count`` layers with the largest mean direction change, descending (ties in table order), each
    with its name, :data:`TOP_ROTATION_COLUMNS` and whether its norm change is at rounding."""
    ranked = layers.assign(_key=_column(layers, "direction_change_mean")).dropna(subset=["_key"])
    ranked = ranked.sort_values("_key", ascending=False, kind="stable").head(count)
    at_rounding = norms_at_rounding(ranked)
    return [{"name": str(row["name"]), **{c: _finite(_column(ranked, c)[i]) for c in TOP_ROTATION_COLUMNS},
             "norm_change_at_rounding": bool(at_rounding[i])} for i, row in ranked.iterrows()]


def summarize(layers: pd.DataFrame) -> dict:
    """The paper's all-layer figures: averages over layers of per-layer means and stds, and ratios.

    Layers with non-finite values are left out of the averages (and listed); identical layers count
    as real zero changes. ``*_weighted`` variants weight each layer by its parameter count.
    """
    usable = layers[layers["status"] != "nonfinite"]
    summary: dict = {"n_layers": int(len(layers)), "n_layers_in_means": int(len(usable))}
    for suffix, weights in (("", None), ("_weighted", usable["numel"].astype(float))):
        for stat in STAT_NAMES:
            for moment in ("mean", "std"):
                summary[f"{stat}_{moment}{suffix}"] = _mean_or_none(_column(usable, f"{stat}_{moment}"), weights)
        summary[f"rotation_share_mean{suffix}"] = _mean_or_none(_column(usable, "rotation_share"), weights)
        for moment in ("mean", "std"):
            norm = summary[f"norm_change_{moment}{suffix}"]
            summary[f"direction_to_norm_{moment}_ratio{suffix}"] = _ratio(summary[f"direction_change_{moment}{suffix}"], norm)
            summary[f"angle_to_norm_{moment}_ratio{suffix}"] = angle_to_norm_ratio(summary[f"angle_deg_{moment}{suffix}"], norm)
    changed = usable[usable["status"] == "ok"]
    at_rounding = norms_at_rounding(changed)
    summary["norms_preserved_at_rounding"] = bool(len(changed)) and bool(at_rounding.all())
    summary["n_layers_norms_at_rounding"] = int(at_rounding.sum())
    if summary["norms_preserved_at_rounding"]:
        summary.update(dict.fromkeys(RATIO_KEYS))
    if len(usable):
        worst = usable.loc[usable["direction_change_mean"].idxmax()] if usable["direction_change_mean"].notna().any() else None
        summary["max_layer_direction_change_mean"] = None if worst is None else float(worst["direction_change_mean"])
        summary["max_layer_direction_change_name"] = None if worst is None else str(worst["name"])
    summary["top_rotation_layers"] = top_rotation_layers(usable)
    weights = usable["numel"].astype(float)
    for column in [c for c in usable.columns if c.endswith(("_energy_top30", "_rank_rel_90")) or c == "lorad_fit"
                   or (c.startswith(("residual_energy_top", "direction_residual_energy_top")))]:
        summary[f"{column}_mean"] = _mean_or_none(usable[column])  # e.g. residual_energy_top30_mean
        summary[f"{column}_mean_weighted"] = _mean_or_none(usable[column], weights)
    summary["n_identical"] = int((layers["status"] == "identical").sum())
    summary["nonfinite_layers"] = layers.loc[layers["status"] == "nonfinite", "name"].tolist()
    summary["zero_norm_rows"] = int(layers["zero_norm_rows"].sum())
    summary["n_params_analysed"] = int(layers["numel"].sum())
    return summary
