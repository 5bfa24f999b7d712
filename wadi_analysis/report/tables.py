"""Data helpers shared by figures, HTML and PDF: aggregation per block/group,
and the text content (headline table, counts, warnings, columns).

Everything here returns plain Python strings and numbers; escaping is the job of the renderer (HTML
escaping in ``html.py``, mathtext-safe text in ``figures.py``/``pdf.py``), because every string that comes from a checkpoint or
from the summary (tensor names, paths, metadata, the command) is untrusted.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from ..compare import read_layers  # noqa: F401  (the layers.csv reader, re-exported for the report)
from ..summary import norms_at_rounding, top_rotation_layers

AT_ROUNDING = "norms preserved (at rounding)"
# The norm-change columns that hold rounding, not a measurement, where a layer's norms are at rounding.
NORM_COLUMNS = ("norm_change_mean", "norm_change_std", "norm_change_max")
HEADLINE_NOTE = ("First order: each row's change splits into a radial part along the teacher row (the rescaling) "
                 "and a tangential part across it (the rotation, about the angle in radians); 1 − cos is second "
                 "order (θ²/2), so its ratio to the norm change grows with how far the student moved, the angle's does not.")

# Optional spectrum / LoRaD columns: shown wherever present, never required.
OPTIONAL_COLUMNS = {
    "residual_energy_top30": "energy top 30 % (%)",
    "direction_residual_energy_top30": "dir. energy top 30 % (%)",
    "residual_rank_90": "rank 90 %",
    "residual_rank_rel_90": "rel. rank 90 %",
    "lorad_fit": "LoRaD fit (%)",
}
# (column, header, numeric) of the layer table, in display order.
LAYER_TABLE = [
    ("name", "name", False), ("block", "block", False), ("role", "role", False), ("group", "group", False),
    ("kind", "kind", False), ("shape", "shape", False), ("rows", "rows", True),
    ("norm_change_mean", "norm mean (%)", True), ("norm_change_std", "norm std (%)", True),
    ("norm_change_max", "norm max (%)", True),
    ("direction_change_mean", "dir. mean (%)", True), ("direction_change_std", "dir. std (%)", True),
    ("direction_change_max", "dir. max (%)", True), ("angle_deg_mean", "angle mean (°)", True),
    ("radial_change_mean", "radial mean (%)", True), ("tangential_change_mean", "tangential mean (%)", True),
    ("rotation_share", "rotation share (%)", True), ("angle_to_norm_ratio", "angle / norm", True),
    ("frobenius_change", "Frobenius (%)", True),
]
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# Data-flow order of top-level blocks (U-Nets and DiTs): inputs and embeddings, encoder, middle,
# decoder, outputs; anything else sorts between the decoder and the outputs.
BLOCK_ORDER = {"conv_in": 0, "pos_embed": 0, "patch_embed": 0, "time_proj": 1, "time_embedding": 1,
               "add_embedding": 1, "class_embedding": 1, "adaln_single": 1, "caption_projection": 1,
               "down_blocks": 2, "transformer_blocks": 2, "mid_block": 3, "up_blocks": 4,
               "conv_norm_out": 8, "norm_out": 8, "conv_out": 9, "proj_out": 9}


def natural_key(text) -> tuple:
    """Sort key in data-flow order of blocks, then naturally (``down_blocks.10`` after ``down_blocks.2``)."""
    text = str(text)
    head = re.match(r"[A-Za-z_]*", text).group()
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text))
    return (BLOCK_ORDER.get(head, 5),) + parts


def values(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float64 (missing column: all NaN)."""
    if column not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)


def usable(layers: pd.DataFrame) -> pd.DataFrame:
    """Layers that enter averages: non-finite layers are left out, as in the summary."""
    return layers[layers["status"] != "nonfinite"] if "status" in layers.columns else layers


def wants_log(*arrays: np.ndarray, spread: float = 30.0) -> bool:
    """True when the positive finite values span more than ``spread`` (so a log axis reads better)."""
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays]) if arrays else np.array([])
    v = v[np.isfinite(v) & (v > 0)]
    return bool(len(v) >= 2 and v.max() / v.min() > spread)


def all_zero(*arrays: np.ndarray) -> bool:
    """True when there are finite values and every one of them is zero (identical weights)."""
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    v = v[np.isfinite(v)]
    return bool(len(v)) and not v.any()


def aggregate(data: pd.DataFrame, key: str) -> pd.DataFrame:
    """Average per-layer mean/std of norm and direction change per value of ``key``, plus the count ``n``."""
    stats = ["norm_change_mean", "norm_change_std", "direction_change_mean", "direction_change_std"]
    frame = pd.DataFrame({key: data[key].astype(str), **{s: values(data, s) for s in stats}})
    grouped = frame.groupby(key, sort=False).agg(**{s: (s, "mean") for s in stats}, n=(stats[0], "size"))
    return grouped.loc[sorted(grouped.index, key=natural_key)]


def aggregate_rows(data: pd.DataFrame, metrics: list[str], max_rows: int) -> tuple[pd.DataFrame, str]:
    """Means per block · group (per block alone when that gives too many rows), labelled with counts."""
    frame = pd.DataFrame({m: values(data, m) for m in metrics})
    frame["block"] = data["block"].astype(str).to_numpy()
    frame["key"] = frame["block"]
    unit = "block"
    if "group" in data.columns:
        by_group = frame["block"] + " · " + data["group"].astype(str).to_numpy()
        if by_group.nunique() <= max_rows:
            frame["key"], unit = by_group, "block · group"
    grouped = frame.groupby("key", sort=False)
    table, counts = grouped[metrics].mean(), grouped.size()
    order = sorted(table.index, key=natural_key)
    table = table.loc[order]
    table.index = [f"{clean(k, 48)} ({counts[k]})" for k in order]
    return table, unit


def table_columns(layers: pd.DataFrame) -> list[tuple[str, str, bool]]:
    """The layer-table columns present in ``layers`` (optional columns included when present), then status."""
    columns = [c for c in LAYER_TABLE if c[0] in layers.columns]
    columns += [(k, v, True) for k, v in OPTIONAL_COLUMNS.items() if k in layers.columns]
    return columns + [("status", "status", False)] if "status" in layers.columns else columns


def clean(text, limit: int | None = None) -> str:
    """``str(text)`` without control characters, middle-truncated to ``limit`` characters."""
    text = _CONTROL.sub("?", str(text))
    if limit and len(text) > limit:
        half = (limit - 1) // 2
        text = text[:half] + "…" + text[len(text) - (limit - 1 - half):]
    return text


def number(value) -> float | None:
    """A finite float, or None (None, NaN, inf, strings and other junk all give None)."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fmt(value, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; ``n/a`` for missing or non-finite values."""
    x = number(value)
    if x is None:
        return "n/a" if value is None or isinstance(value, (int, float, np.floating)) else clean(value, 80)
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}" if abs(x) >= 1e4 else str(int(x))
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-4):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def rounding_mask(layers: pd.DataFrame) -> np.ndarray:
    """Per layer: True where its norm change is at the rounding level of its dtypes (no measurement)."""
    return norms_at_rounding(layers).to_numpy(dtype=bool)


def without_rounding(layers: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``layers`` with the norm-change columns blanked (NaN) where they are rounding, and how many layers that is."""
    mask = rounding_mask(layers)
    if not mask.any():
        return layers, 0
    layers = layers.copy()
    for column in NORM_COLUMNS:
        if column in layers.columns:
            layers[column] = values(layers, column)
            layers.loc[mask, column] = np.nan
    return layers, int(mask.sum())


def norms_preserved(summary: dict, layers: pd.DataFrame | None = None) -> bool:
    """The summary's ``norms_preserved_at_rounding``; for an older summary, decided from the table."""
    if "norms_preserved_at_rounding" in summary or layers is None:
        return bool(summary.get("norms_preserved_at_rounding"))
    changed = usable(layers)
    changed = changed[changed["status"] == "ok"] if "status" in changed.columns else changed
    return bool(len(changed)) and bool(rounding_mask(changed).all())


def _ratio_cell(value, preserved: bool) -> str:
    x = number(value)
    return AT_ROUNDING if preserved else "n/a" if x is None else f"{fmt(x, 3)}×"


def headline_rows(summary: dict, layers: pd.DataFrame | None = None) -> list[list[str]]:
    """The headline table: [quantity, mean, std, weighted mean, weighted std] — the paper's view (norm,
    1 − cos, angle, their ratio), then the first-order view (radial, tangential, rotation share, angle /
    norm). Where norms are preserved at rounding, no ratio is printed and the norm figures say so."""
    preserved = norms_preserved(summary, layers)
    moments = [(m, s) for s in ("", "_weighted") for m in ("mean", "std")]
    rows = []
    for label, key in (("norm change (%)", "norm_change"), ("direction change, 1 − cos (%)", "direction_change"),
                       ("angle (°)", "angle_deg")):
        cells = [fmt(summary.get(f"{key}_{m}{s}")) for m, s in moments]
        if preserved and key == "norm_change":
            cells = [f"{c} (rounding)" for c in cells]
        rows.append([label] + cells)
    rows.append(["direction / norm ratio"] + [_ratio_cell(summary.get(f"direction_to_norm_{m}_ratio{s}"), preserved)
                                              for m, s in moments])
    for label, key in (("first order: radial, rescaling (%)", "radial_change"),
                       ("first order: tangential, rotation (%)", "tangential_change")):
        rows.append([label] + [fmt(summary.get(f"{key}_{m}{s}")) for m, s in moments])
    rows.append(["first order: rotation share of ‖ΔW‖² (%)"]
                + [fmt(summary.get(f"rotation_share_mean{s}")) if m == "mean" else "" for m, s in moments])
    rows.append(["first order: angle (rad) / norm ratio"]
                + [_ratio_cell(summary.get(f"angle_to_norm_{m}_ratio{s}"), preserved) for m, s in moments])
    return rows


def top_rotation_rows(summary: dict, layers: pd.DataFrame | None = None) -> list[list[str]]:
    """[rank, layer, 1 − cos (%), angle (°), tangential (%), norm (%)] of the layers that rotate most: the
    summary's ``top_rotation_layers``, or (older summaries) ranked from the table."""
    top = summary.get("top_rotation_layers")
    if not isinstance(top, list):
        top = top_rotation_layers(usable(layers)) if layers is not None and "name" in layers.columns else []
    keys = ("direction_change_mean", "angle_deg_mean", "tangential_change_mean")
    return [[str(rank), clean(item.get("name"))] + [fmt(item.get(k)) for k in keys]
            + ["at rounding" if item.get("norm_change_at_rounding") is True else fmt(item.get("norm_change_mean"))]
            for rank, item in enumerate((i for i in top if isinstance(i, dict)), 1)]


TOP_ROTATION_HEADER = ["#", "layer", "1 − cos (%)", "angle (°)", "tangential (%)", "norm (%)"]


def _count(value) -> str:
    return str(len(value)) if isinstance(value, (list, tuple, dict)) else fmt(value)


def count_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary's counts; absent keys are left out."""
    labels = [
        ("n_layers", "layers analysed"), ("n_layers_in_means", "layers in the all-layer means"),
        ("n_identical", "identical layers"), ("nonfinite_layers", "layers with non-finite values"),
        ("zero_norm_rows", "rows with zero norm (no direction)"), ("n_params_analysed", "parameters analysed"),
        ("n_skipped_vectors", "1-D tensors skipped"), ("n_skipped_non_float", "non-float tensors skipped"),
        ("n_deselected", "weights deselected"), ("missing_in_teacher", "missing in teacher"),
        ("missing_in_student", "missing in student"), ("shape_mismatches", "shape mismatches"),
        ("residual_energy_top30_mean", "mean residual energy in top 30 % rank (%)"),
    ]
    rows = [(label, _count(summary[key])) for key, label in labels if key in summary]
    if summary.get("max_layer_direction_change_name") is not None:
        rows.append(("largest per-layer mean direction change",
                     f"{fmt(summary.get('max_layer_direction_change_mean'))} % in "
                     f"{clean(summary['max_layer_direction_change_name'])}"))
    return rows


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def warning_lists(summary: dict, layers: pd.DataFrame | None = None) -> list[tuple[str, list[str]]]:
    """(title, items) for every non-empty warning: missing keys, shape mismatches, non-finite layers."""
    mismatches = []
    for item in _as_list(summary.get("shape_mismatches")):
        if isinstance(item, dict):
            mismatches.append(f"{clean(item.get('name'))}: teacher {clean(item.get('teacher_shape'))}, "
                              f"student {clean(item.get('student_shape'))}")
        else:
            mismatches.append(clean(item))
    nonfinite = _as_list(summary.get("nonfinite_layers"))
    if not nonfinite and layers is not None and "status" in layers.columns:
        nonfinite = layers.loc[layers["status"] == "nonfinite", "name"].tolist()
    found = [
        ("Missing in the teacher", [clean(x) for x in _as_list(summary.get("missing_in_teacher"))]),
        ("Missing in the student", [clean(x) for x in _as_list(summary.get("missing_in_student"))]),
        ("Shape mismatches (not analysed)", mismatches),
        ("Layers with non-finite values (left out of the all-layer means)", [clean(x) for x in nonfinite]),
    ]
    return [(title, items) for title, items in found if items]


def source_line(summary: dict, side: str) -> str:
    """``path (format)`` of the teacher or student, from the summary."""
    info = summary.get(side)
    if not isinstance(info, dict):
        return "n/a"
    return f"{clean(info.get('path', 'n/a'))} ({clean(info.get('format', 'unknown format'))})"


def versions_line(summary: dict) -> str:
    """``package version, ...`` from the summary's ``versions`` dict."""
    versions = summary.get("versions")
    if not isinstance(versions, dict):
        return "n/a"
    return ", ".join(f"{clean(k)} {clean(v)}" for k, v in versions.items())
