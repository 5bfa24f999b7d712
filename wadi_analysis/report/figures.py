"""The report's figures, drawn from the per-layer table (and the summary's all-layer points) only.

Each figure is a standalone ``matplotlib.figure.Figure`` (no pyplot state, so any backend and any
thread works) drawn under a fixed seaborn style, which makes the output deterministic. Strings from
the checkpoint (names, blocks, roles, hybrids) go through :func:`plain` so matplotlib never parses
them as mathtext. Zeros never meet a log axis, NaN rows are dropped, and a single layer is fine.
"""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ..spectrum import PAPER_RANK_FRACTION
from .axes import CONSTANT_SPREAD, histogram_bins, log_ticks, note, plain
from .tables import (AT_ROUNDING, NORM_COLUMNS, OPTIONAL_COLUMNS, aggregate, aggregate_rows, all_zero, clean, fmt,
                     natural_key, norms_preserved, number, rounding_mask, usable, values, wants_log, without_rounding)

NORM = {"color": "#0173b2", "marker": "o", "label": "norm change"}
DIRECTION = {"color": "#de8f05", "marker": "s", "label": "direction change"}
STYLE = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85),
         "figure.dpi": 100, "savefig.dpi": 100, "font.family": "DejaVu Sans", "svg.hashsalt": "wadi",
         "axes.prop_cycle": matplotlib.cycler(color=sns.color_palette("colorblind"))}
CAPTIONS = {
    "fig1a_mean_std": "Per-layer mean vs standard deviation (over rows) of the relative norm change and of the "
                      "direction change (WaDi Fig. 1a). Large markers: the all-layer averages of the summary.",
    "fig1b_low_rank": "Low rank of the weight change (WaDi Fig. 1b): share of the energy of W_s − W_t held by "
                      "its top 30 % singular values, per layer.",
    "by_block_group": "Average over layers of the per-layer mean change, by block and by role group "
                      "(whiskers: average per-layer standard deviation; non-finite layers left out).",
    "distributions": "Distributions over layers of the per-layer mean norm and direction change.",
    "heatmap": "Layer × metric heatmap, each column min–max scaled (tick labels give the range; grey: not available; "
               "light: a constant column, or a norm change at rounding, neither colour-scaled).",
    "swaps": "Swap experiment (WaDi Fig. 1c): hybrids sampled as one-step generators.",
}
HEATMAP_METRICS = ["norm_change_mean", "norm_change_std", "direction_change_mean", "direction_change_std",
                   "angle_deg_mean", "tangential_change_mean", "rotation_share", "frobenius_change",
                   *[c for c in OPTIONAL_COLUMNS if c != "residual_rank_90"]]  # absolute rank: size, not change
MAX_HEATMAP_LAYERS = 60
NEUTRAL = "0.97"  # heatmap cells that are not colour-scaled (constant columns, norm changes at rounding)


def fig_mean_std(layers: pd.DataFrame, summary: dict) -> Figure:
    """Fig. 1a: per-layer (mean, std) of norm change and of direction change, all-layer points large."""
    fig = Figure(figsize=(7.5, 5.8), layout="constrained")
    ax = fig.add_subplot()
    data, rounded = without_rounding(usable(layers))
    preserved = norms_preserved(summary, layers)
    pairs = {stat: (values(data, f"{stat}_mean"), values(data, f"{stat}_std")) for stat in ("norm_change", "direction_change")}
    log = wants_log(*[a for pair in pairs.values() for a in pair])
    hidden = drawn = 0
    for stat, style in (("norm_change", NORM), ("direction_change", DIRECTION)):
        x, y = pairs[stat]
        keep = np.isfinite(x) & np.isfinite(y)
        if log:
            hidden += int((keep & ((x <= 0) | (y <= 0))).sum())
            keep &= (x > 0) & (y > 0)
        drawn += int(keep.sum())
        if stat == "norm_change" and rounded and not keep.any():
            continue  # every norm change is rounding: nothing to draw (the note says so)
        ax.scatter(x[keep], y[keep], s=16, alpha=0.55, color=style["color"], marker=style["marker"],
                   linewidths=0, label=f"{style['label']}, per layer (n = {int(keep.sum())})")
        mx, my = (number(summary.get(f"{stat}_{m}")) for m in ("mean", "std"))
        if mx is None or my is None:  # summary without the figure: recompute it from the table
            mx, my = (number(np.nanmean(v)) if np.isfinite(v).any() else None for v in (x, y))
        if preserved and stat == "norm_change":
            continue  # the all-layer norm change is rounding: no marker
        if mx is not None and my is not None and (not log or (mx > 0 and my > 0)):
            ax.scatter([mx], [my], s=320, color=style["color"], marker=style["marker"], edgecolors="black",
                       linewidths=1.6, zorder=5, label=f"{style['label']}, all layers: {fmt(mx, 3)} ± {fmt(my, 3)} %")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        log_ticks(ax.xaxis, *[pair[0] for pair in pairs.values()])
        log_ticks(ax.yaxis, *[pair[1] for pair in pairs.values()])
    notes = ([f"{hidden} zero-change points not shown on the log axes"] if hidden else []) + \
        ([f"{AT_ROUNDING} in {rounded} layers: their norm change is rounding, not drawn"] if rounded else [])
    if notes:
        note(ax, "\n".join(notes))
    if not drawn:
        note(ax, "no finite per-layer statistics", "center")
    elif all_zero(*[a for pair in pairs.values() for a in pair]):
        note(ax, "every change is zero: teacher and student weights are identical", "top")
    ax.set_xlabel("per-layer mean change (%)")
    ax.set_ylabel("per-layer std of the change (%)")
    ax.set_title("Norm vs direction change per layer")
    ax.legend(fontsize=8, loc="best", frameon=True)
    return fig


def fig_low_rank(layers: pd.DataFrame, summary: dict) -> Figure | None:
    """Fig. 1b: residual energy in the top 30 % singular values vs layer size (and vs rank for 90 %)."""
    energy = values(layers, "residual_energy_top30")
    direction_energy = values(layers, "direction_residual_energy_top30")
    if not (np.isfinite(energy).any() or np.isfinite(direction_energy).any()):
        return None
    curve = _energy_curve_columns(layers)
    extra = (["energy_curve"] if len(curve) >= 3 else []) + \
        [c for c in ("residual_rank_rel_90", "lorad_fit") if np.isfinite(values(layers, c)).any()]
    panels = 1 + len(extra)
    columns, grid_rows = min(2, panels), -(-panels // 2)  # two panels a row: fits a page, not a strip
    fig = Figure(figsize=(5.8 * columns, 4.6 * grid_rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(grid_rows, columns)).ravel()
    for spare in axes[panels:]:
        fig.delaxes(spare)
    size = values(layers, "numel")
    ax = axes[0]
    for series, label, style in ((energy, "W_s − W_t", NORM), (direction_energy, "direction residual", DIRECTION)):
        keep = np.isfinite(series) & np.isfinite(size) & (size > 0)
        if keep.any():
            ax.scatter(size[keep], series[keep], s=16, alpha=0.6, color=style["color"], marker=style["marker"],
                       linewidths=0, label=f"{label} (mean {fmt(np.nanmean(series[keep]), 3)} %)")
    mean = number(summary.get("residual_energy_top30_mean"))
    if mean is not None:
        ax.axhline(mean, color="0.3", ls="--", lw=1, label=f"summary mean {fmt(mean, 3)} %")
    if wants_log(size, spread=10):
        ax.set_xscale("log")
        log_ticks(ax.xaxis, size)
    ax.set_xlabel("layer size (parameters)")
    ax.set_ylabel("energy in top 30 % singular values (%)")
    ax.set_title("Residual energy at 30 % rank")
    ax.legend(fontsize=8, loc="lower left")
    for ax, column in zip(axes[1:], extra):
        if column == "energy_curve":
            _draw_energy_curves(ax, layers, curve)
            continue
        other = values(layers, column)
        if column == "residual_rank_rel_90":
            keep = np.isfinite(other) & np.isfinite(energy)
            ax.scatter(other[keep], energy[keep], s=16, alpha=0.6, color=NORM["color"], linewidths=0)
            ax.set_xlabel("rank for 90 % energy / full rank")
            ax.set_ylabel("energy in top 30 % singular values (%)")
            ax.set_title("Energy at 30 % rank vs relative rank")
        else:
            keep = np.isfinite(other)
            ax.hist(other[keep], bins=histogram_bins(other[keep], False), color=DIRECTION["color"], alpha=0.8)
            ax.ticklabel_format(axis="x", style="plain", useOffset=False)  # no "1e-10+1e1" offset text
            ax.set_xlabel("share of the change a pair rotation expresses (%)")
            ax.set_ylabel("layers")
            ax.set_title("LoRaD fit per layer")
    return fig


def _energy_curve_columns(layers: pd.DataFrame) -> dict[float, str]:
    """{rank fraction: column} for every ``residual_energy_topNN`` column (``compare --spectrum-fraction``)."""
    found = {}
    for column in layers.columns:
        digits = column.removeprefix("residual_energy_top")
        if column.startswith("residual_energy_top") and digits.isdigit():
            found[int(digits) / 100] = column
    return dict(sorted(found.items()))


def _draw_energy_curves(ax, layers: pd.DataFrame, curve: dict[float, str]) -> None:
    """WaDi Fig 1b proper: energy captured vs rank fraction, one faint line per layer and the mean."""
    fractions = np.array([0.0, *curve])
    table = np.column_stack([np.zeros(len(layers))] + [values(layers, c) for c in curve.values()])
    table = table[np.isfinite(table).all(axis=1)]
    for row in table[:: max(1, len(table) // 300)]:
        ax.plot(100 * fractions, row, color=NORM["color"], alpha=0.08, lw=0.8)
    if len(table):
        mean = table.mean(axis=0)
        ax.plot(100 * fractions, mean, color=DIRECTION["color"], lw=2.5, marker="o", label="mean over layers")
        if PAPER_RANK_FRACTION in curve:
            energy, percent = mean[list(curve).index(PAPER_RANK_FRACTION) + 1], round(100 * PAPER_RANK_FRACTION)
            ax.annotate(f"{fmt(energy, 3)} % at {percent} % rank", (percent, energy), textcoords="offset points",
                        xytext=(14, -28), fontsize=8, arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.8},
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7", "alpha": 0.9})
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, 100 * fractions.max())
    ax.set_ylim(0, 101)
    ax.set_xlabel("top singular values kept (% of full rank)")
    ax.set_ylabel("energy of W_s − W_t captured (%)")
    ax.set_title("Residual energy vs rank")


def fig_by_block_group(layers: pd.DataFrame) -> Figure:
    """Horizontal grouped bars of direction vs norm change per block and per role group."""
    data, rounded = without_rounding(usable(layers))
    keys = [k for k in ("block", "group") if k in data.columns] or ["kind"]
    tables = {k: aggregate(data, k) for k in keys}
    tallest = max([len(t) for t in tables.values()] + [1])
    fig = Figure(figsize=(11, min(22, max(3.5, 0.3 * tallest + 1.6))), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys):
        table = tables[key]
        y = np.arange(len(table))
        for offset, stat, style in ((-0.2, "direction_change", DIRECTION), (0.2, "norm_change", NORM)):
            mean, std = np.nan_to_num(table[f"{stat}_mean"].to_numpy()), np.nan_to_num(table[f"{stat}_std"].to_numpy())
            whiskers = np.vstack([np.minimum(std, mean), std])  # a change is >= 0: no whisker below zero
            label = style["label"] + (f" ({rounded} layers at rounding: not drawn)" if rounded and stat == "norm_change" else "")
            ax.barh(y + offset, mean, height=0.38, xerr=whiskers, color=style["color"],
                    error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.3"}, label=label)
        ax.set_yticks(y, [f"{plain(name, 32)} ({n})" for name, n in zip(table.index, table["n"])],
                      fontsize=max(5, min(9, 300 / max(len(table), 1))))
        ax.set_ylim(len(table) - 0.5, -0.5)
        ax.set_xlabel("average per-layer mean change (%)")
        ax.set_title(f"by {key} (layers in brackets)")
        if not len(table):
            note(ax, "no usable layers", "center")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    return fig


def fig_distributions(layers: pd.DataFrame) -> Figure:
    """Histograms of per-layer mean changes, and their spread per role group (box + points)."""
    data, rounded = without_rounding(usable(layers))
    norm, direction = values(data, "norm_change_mean"), values(data, "direction_change_mean")
    log = wants_log(norm, direction)
    fig = Figure(figsize=(12, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    bins = histogram_bins(np.concatenate([norm, direction]), log)
    for v, style in ((norm, NORM), (direction, DIRECTION)):
        keep = np.isfinite(v) & ((v > 0) if log else True)
        left.hist(v[keep], bins=bins, alpha=0.6, color=style["color"], label=f"{style['label']} (n = {int(keep.sum())})")
    zeros = int(((norm == 0) | (direction == 0)).sum()) if log else 0
    if log:
        left.set_xscale("log")
        log_ticks(left.xaxis, norm, direction)
    notes = ([f"{zeros} layers with a zero mean not shown on the log axis"] if zeros else []) + \
        ([f"{AT_ROUNDING} in {rounded} layers: not drawn"] if rounded else [])
    if notes:
        note(left, "\n".join(notes))
    if all_zero(norm, direction):
        note(left, "every change is zero: teacher and student weights are identical", "top")
    left.set_xlabel("per-layer mean change (%)")
    left.set_ylabel("layers")
    left.set_title("Per-layer mean change")
    left.legend(fontsize=8)
    groups = data["group"].astype(str).to_numpy() if "group" in data.columns else np.full(len(data), "all")
    long = pd.DataFrame({"group": np.concatenate([groups, groups]), "value": np.concatenate([direction, norm]),
                         "metric": ["direction change"] * len(data) + ["norm change"] * len(data)})
    long = long[np.isfinite(long["value"]) & ((long["value"] > 0) if log else True)]
    long["group"] = [plain(g, 24) for g in long["group"]]
    if len(long):
        order = sorted(long["group"].unique(), key=natural_key)
        palette = {"direction change": DIRECTION["color"], "norm change": NORM["color"]}
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert`
            warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
            sns.boxplot(data=long, x="value", y="group", hue="metric", order=order, palette=palette, ax=right,
                        fliersize=0, linewidth=0.8, log_scale=log, hue_order=list(palette))
        sns.stripplot(data=long, x="value", y="group", hue="metric", order=order, palette=palette, ax=right,
                      size=2.5, dodge=True, alpha=0.5, legend=False, hue_order=list(palette), jitter=0.15)
        right.legend(fontsize=8, loc="lower right")
        if log:
            log_ticks(right.xaxis, long["value"].to_numpy())
    else:
        note(right, "no finite per-layer statistics", "center")
    right.set_xlabel("per-layer mean change (%)")
    right.set_ylabel("role group")
    right.set_title("By role group")
    return fig


def _heatmap_table(layers: pd.DataFrame, metrics: list[str]) -> tuple[pd.DataFrame, str]:
    """The heatmap's rows (layers, or block · group means) with norm changes at rounding blanked and
    ``_at_rounding`` (1.0 where every layer of the row is at rounding)."""
    aggregated = len(layers) > MAX_HEATMAP_LAYERS and "block" in layers.columns
    data = usable(layers) if aggregated else layers
    measured, _ = without_rounding(data)
    measured = measured.assign(_at_rounding=rounding_mask(data).astype(float))
    if aggregated:
        table, unit = aggregate_rows(measured, metrics + ["_at_rounding"], 2 * MAX_HEATMAP_LAYERS)
        return table, f"Mean per {unit} ({len(layers)} layers in {len(table)} rows; non-finite layers left out)"
    columns = {m: values(measured, m) for m in metrics + ["_at_rounding"]}
    return pd.DataFrame(columns, index=[clean(n, 56) for n in layers["name"]]), "Per layer"


def fig_heatmap(layers: pd.DataFrame) -> Figure:
    """Rows = layers (or block · group means when there are many layers), columns = metrics, each
    column min-max scaled so every metric uses the whole colour range — except a constant column and
    norm changes at rounding, which are drawn neutral and labelled, never colour-scaled."""
    metrics = [m for m in HEATMAP_METRICS if m in layers.columns]
    table, title = _heatmap_table(layers, metrics)
    matrix = table[metrics].to_numpy(dtype=float) if len(table) else np.zeros((0, len(metrics)))
    finite = np.isfinite(matrix)
    low = np.array([c[np.isfinite(c)].min() if np.isfinite(c).any() else np.nan for c in matrix.T])
    high = np.array([c[np.isfinite(c)].max() if np.isfinite(c).any() else np.nan for c in matrix.T])
    span = high - low
    constant = finite.any(axis=0) & (span <= CONSTANT_SPREAD * np.fmax(np.abs(low), np.abs(high)))
    at_rounding = (table["_at_rounding"].to_numpy(dtype=float)[:, None] == 1.0) if len(table) else np.zeros((0, 1), bool)
    neutral = (finite & constant) | (at_rounding & np.isin(metrics, NORM_COLUMNS))
    scaled = np.divide(matrix - low, span, out=np.full_like(matrix, 0.5), where=finite & (span > 0))
    scaled[~finite | neutral] = np.nan
    rows = max(len(table), 1)
    fig = Figure(figsize=(max(8, 1.05 * len(metrics) + 4.5), min(24, max(3.8, 0.19 * rows + 2.6))), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(scaled), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.imshow(np.ma.masked_where(~neutral, np.zeros_like(matrix)), aspect="auto", cmap=ListedColormap([NEUTRAL]),
              vmin=0, vmax=1, interpolation="nearest")
    labels = []
    for j, (m, a, b) in enumerate(zip(metrics, low, high)):
        if constant[j]:
            labels.append(f"{m}\n(constant {fmt(a, 4)})")
        elif neutral[:, j].any() and not (finite[:, j] & ~neutral[:, j]).any():
            labels.append(f"{m}\n(at rounding)")
        else:
            labels.append(f"{m}\n({fmt(a, 3)} – {fmt(b, 3)})")
        if len(table) and neutral[:, j].all():
            ax.text(j, (len(table) - 1) / 2, "constant" if constant[j] else "at rounding", rotation=90, ha="center",
                    va="center", fontsize=8, color="0.35")
    ax.set_xticks(range(len(metrics)), labels, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(table)), [plain(label, None) for label in table.index], fontsize=max(4, min(8, 320 / rows)))
    ax.grid(False)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="position in the column's range (min – max)", shrink=0.6)
    return fig


def fig_swaps(swaps: pd.DataFrame) -> Figure | None:
    """One bar chart per numeric metric of the swap table (``hybrid`` gives the bar labels)."""
    label_column = "hybrid" if "hybrid" in swaps.columns else next(
        (c for c in swaps.columns if not pd.api.types.is_numeric_dtype(swaps[c])), None)
    labels = [plain(x, 28) for x in (swaps[label_column] if label_column else swaps.index)]
    metrics = [c for c in swaps.columns if c != label_column and pd.api.types.is_numeric_dtype(swaps[c])][:6]
    if not metrics or not len(swaps):
        return None
    fig = Figure(figsize=(max(5.5, 4 * len(metrics)), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    colors = sns.color_palette("colorblind", len(labels))
    for ax, metric in zip(axes, metrics):
        v = values(swaps, metric)
        x = np.arange(len(v))
        bars = ax.bar(x, np.nan_to_num(v), color=colors)
        ax.bar_label(bars, labels=[fmt(a, 3) for a in v], fontsize=8, padding=3,  # above the bar, on white
                     bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.9})
        if np.isfinite(v).all() and (v > 0).all() and wants_log(v, spread=20):
            ax.set_yscale("log")
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(plain(metric, 40))
        ax.margins(y=0.15)
    return fig


def make_figures(layers: pd.DataFrame, summary: dict, swaps: pd.DataFrame | None = None) -> dict[str, Figure]:
    """All report figures, name -> figure (``fig1b_low_rank`` only with spectrum columns, ``swaps`` only
    with a swap table). Figure captions are in :data:`CAPTIONS`."""
    summary = summary or {}
    with matplotlib.rc_context(STYLE):
        figures = {"fig1a_mean_std": fig_mean_std(layers, summary)}
        low_rank = fig_low_rank(layers, summary)
        if low_rank is not None:
            figures["fig1b_low_rank"] = low_rank
        figures["by_block_group"] = fig_by_block_group(layers)
        figures["distributions"] = fig_distributions(layers)
        figures["heatmap"] = fig_heatmap(layers)
        if swaps is not None and len(swaps):
            swap_figure = fig_swaps(swaps)
            if swap_figure is not None:
                figures["swaps"] = swap_figure
    return figures
