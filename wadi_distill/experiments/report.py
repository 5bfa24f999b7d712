"""Figures, ``report.html`` and ``report.pdf`` of ``wadi-distill reproduce`` from its CSV files.

Each figure is a standalone ``matplotlib.figure.Figure``, as in :mod:`wadi_analysis.report.figures`:
no pyplot state and no global backend change, so importing this module leaves the caller's matplotlib
as it was, and a figure is freed once nothing refers to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from wadi_analysis.atomic import atomic_write, atomic_write_text
from wadi_analysis.report.html import CSS, esc, png_data_uri

METRICS = [("frechet_distance", "FD ↓"), ("kid", "KID ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"),
           ("prompt_accuracy", "prompt acc. ↑")]
CAPTIONS = {
    "convergence": "One-step Fréchet distance over training iterations (mean over the seeds still training: "
                   "a seed stops once its curve has flattened; convergence points use fewer samples than the "
                   "final scores, so their floor is higher).",
    "fig1a": "Fig 1a at small scale, teacher vs each student, all layers: left, the paper's mean per-row "
             "direction change (1 − cos, second order in the angle) against the mean relative norm change; right, "
             "the same at first order (mean angle in radians against the norm change; dashed: equal). Students "
             "whose norms are preserved at rounding stand in the strip at each panel's left.",
    "fig1b": "Fig 1b at small scale: share of the weight-change energy in the top 30 % of its rank, mean over layers.",
    "ranks": "LoRaD rank ablation: final one-step FD against trainable parameters.",
}


def _mean_by_model(results: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c, _ in METRICS] + (["trainable"] if "trainable" in results else [])
    grouped = results.groupby(["experiment", "model"], sort=False)
    table = grouped[columns].mean()
    table["seeds"] = grouped["seed"].nunique()
    if len(results) > len(table):
        table["fd_std"] = grouped["frechet_distance"].std()
    return table.reset_index()


def interval_sections(out: Path) -> str:
    """HTML for intervals.csv (per-arm mean and bootstrap 95 % interval over seeds), the pairwise orderings
    that the intervals support (:func:`ordering`), and convergence.csv; empty for a reproduction older
    than these files."""
    from itertools import combinations

    from ..evaluation.intervals import ordering

    if not (out / "intervals.csv").is_file():
        return ""
    intervals = pd.read_csv(out / "intervals.csv")
    rows = intervals.set_index("model").to_dict("index")
    kind = intervals.set_index("model")["experiment"].to_dict() if "experiment" in intervals else {}
    students = [m for m in rows if kind.get(m, "students") == "students"]
    # every pair of students, and each swap hybrid against the student it came from ("<student>: <label>")
    compared = list(combinations(students, 2)) + [(m.split(": ")[0], m) for m in rows
                                                  if kind.get(m) == "swap" and m.split(": ")[0] in rows]
    pairs = pd.DataFrame([{"arm A": a, "arm B": b, "FD ordering": ordering(a, rows[a], b, rows[b])}
                          for a, b in compared])
    html = (f"<h2>Final FD over seeds: mean and percentile-bootstrap 95 % interval</h2>{_table(intervals)}"
            f"<h2>Orderings (stated only where the intervals separate)</h2>{_table(pairs)}")
    if (out / "convergence.csv").is_file():
        html += ("<h2>Convergence (validation FD curve flattened; training stopped there, else ran to the step cap)"
                 f"</h2>{_table(pd.read_csv(out / 'convergence.csv'))}")
    return html


def _axes(width: float, height: float):
    """A standalone figure (no pyplot state) with one axes."""
    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def fig_convergence(curves: pd.DataFrame) -> Figure:
    fig, ax = _axes(7, 4)
    for model, part in curves.groupby("student", sort=False):
        mean = part.groupby("step")["frechet_distance"].mean()
        ax.plot(mean.index, mean.values, marker="o", ms=3, label=model)
    ax.set(xlabel="iteration", ylabel="one-step FD (classifier features)", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def fig_1a(analysis: pd.DataFrame) -> Figure:
    """Fig 1a twice: the paper's measure (1 − cos, second order in the angle) and the first-order one (the
    mean angle in radians), each against the mean relative norm change. Students whose norms are preserved
    at rounding (LoRaD, DoRA with frozen magnitude) have no norm change to place on a log axis: they stand in
    a strip of their own at its left, labelled so, rather than at the rounding error as if it were measured."""
    import numpy as np

    # compare's own verdict (wadi_analysis.report.tables); an analysis.csv older than it has none to give
    preserved = (analysis["norms_preserved_at_rounding"].astype(bool) if "norms_preserved_at_rounding" in analysis
                 else pd.Series(False, index=analysis.index))
    panels = [("direction_change_mean", "mean direction change 1 − cos (%)", "the paper's measure (second order)")]
    if "angle_deg_mean" in analysis:  # the angle in radians × 100: the same units as a relative change in %
        analysis = analysis.assign(angle_rad_mean=np.deg2rad(analysis["angle_deg_mean"]) * 100)
        panels.append(("angle_rad_mean", "mean angle (radians, as %)", "first order: angle against norm change"))
    fig = Figure(figsize=(6 * len(panels), 4.2))
    ratios = ([1, 3, 0.45] * len(panels))[:-1]  # strip, panel, a gap before the next strip
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios, wspace=0.04,  # final: labels are placed in points
                            left=0.07, right=0.99, bottom=0.14, top=0.91)
    measured, rounded = analysis[~preserved], analysis[preserved]
    x_log = bool(len(measured)) and bool((measured["norm_change_mean"] > 0).all())
    for k, (column, ylabel, title) in enumerate(panels):
        strip, ax = fig.add_subplot(grid[0, 3 * k]), fig.add_subplot(grid[0, 3 * k + 1])
        values = analysis[column][analysis[column] > 0]
        ylim = (values.min() / 2, values.max() * 2) if len(values) else (1e-3, 1)
        for axes in (strip, ax):
            axes.set(yscale="log", ylim=ylim)
        strip.set(xlim=(-0.3, 1.7), xticks=[0], xticklabels=["norms at\nrounding"], ylabel=ylabel)
        _labelled_points(strip, np.zeros(len(rounded)), rounded[column].to_numpy(), rounded["model"].tolist())
        x = measured["norm_change_mean"].to_numpy()
        if x_log:
            ax.set(xscale="log", xlim=(x.min() / 2, x.max() * 6))
            if column == "angle_rad_mean":  # equal first-order changes
                ax.plot(ax.get_xlim(), ax.get_xlim(), ls="--", lw=0.8, color="0.5", label="angle = norm change")
                ax.legend(fontsize=7, loc="lower right")
        _labelled_points(ax, x, measured[column].to_numpy(), measured["model"].tolist())
        ax.set(xlabel="mean relative norm change (%)", title=title)
        ax.title.set_fontsize(9)
        ax.tick_params(labelleft=False, which="both")
    return fig


def _labelled_points(ax, x, y, labels, gap_points: float = 10.0) -> None:
    """Markers with their labels to the right, pushed apart vertically by at least ``gap_points`` so that
    close points stay readable (the axes' log y limits must be set first); a thin line joins a moved label to
    its marker."""
    import numpy as np

    ax.scatter(x, y, zorder=3)
    if not len(y):
        return
    low, high = np.log10(ax.get_ylim())
    height = ax.get_position().height * ax.figure.get_figheight() * 72  # the axes' height in points
    at = (np.log10(np.asarray(y, dtype=float)) - low) / (high - low) * height
    order = np.argsort(at)
    place = at[order].copy()
    for i in range(1, len(place)):
        place[i] = max(place[i], place[i - 1] + gap_points)
    place -= max(0.0, place[-1] - height + 4)  # the top label stays inside the axes
    for position, i in zip(place, order):
        moved = abs(position - at[i]) > 0.5
        ax.annotate(labels[i], (x[i], y[i]), xytext=(12, position - at[i]), textcoords="offset points",
                    fontsize=7, va="center",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if moved else None)


def fig_1b(analysis: pd.DataFrame) -> Figure:
    fig, ax = _axes(6, 3.5)
    ax.bar(analysis["model"], analysis["residual_energy_top30_mean"])
    ax.set(ylabel="energy in top 30 % rank (%)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    return fig


def fig_ranks(table: pd.DataFrame) -> Figure | None:
    ranks = table[table["model"].str.match(r"lorad-(r\d+|published)$")]
    if len(ranks) < 2:
        return None
    fig, ax = _axes(5, 3.5)
    ranks = ranks.sort_values("trainable")
    ax.plot(ranks["trainable"], ranks["frechet_distance"], marker="o")
    for _, row in ranks.iterrows():
        ax.annotate(row["model"], (row["trainable"], row["frechet_distance"]), fontsize=7,
                    textcoords="offset points", xytext=(5, 4))
    ax.set(xlabel="trainable parameters", ylabel="final one-step FD", xscale="log")
    fig.tight_layout()
    return fig


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


def write_reproduction_report(out: str | Path) -> dict[str, Path]:
    """Read results.csv, curves.csv, analysis.csv and settings.json in ``out``; write figures + reports."""
    out = Path(out)
    results, curves = pd.read_csv(out / "results.csv"), pd.read_csv(out / "curves.csv")
    analysis, settings = pd.read_csv(out / "analysis.csv"), json.loads((out / "settings.json").read_text())
    table = _mean_by_model(results)
    table.to_csv(out / "summary.csv", index=False)
    figures = {"convergence": fig_convergence(curves), "fig1a": fig_1a(analysis), "fig1b": fig_1b(analysis),
               "ranks": fig_ranks(table)}
    figures = {name: fig for name, fig in figures.items() if fig is not None}
    shown = table.rename(columns={c: label for c, label in METRICS})
    html = (f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">'
            f"<title>WaDi reproduction at small scale</title><style>{CSS}</style></head><body>"
            f"<h1>WaDi experiments on the embedded teacher</h1>"
            f"<p>Command: <code>wadi-distill reproduce --out {esc(out.name)}</code>; settings: "
            f"<code>{esc(json.dumps(settings['settings']))}</code>; {settings['seconds']} s.</p>"
            f"<h2>Scores (final, mean over seeds)</h2>{_table(shown)}"
            f"{interval_sections(out)}"
            f"<h2>Weight analysis (teacher vs student)</h2>{_table(analysis)}<h2>Figures</h2>")
    for name, fig in figures.items():
        html += (f'<figure><img src="{png_data_uri(fig)}" alt="{esc(CAPTIONS[name])}">'
                 f"<figcaption>{esc(CAPTIONS[name])}</figcaption></figure>")
    html += "</body></html>\n"
    written = {"html": atomic_write_text(out / "report.html", html)}

    def write_pdf(path):
        with PdfPages(path) as pdf:
            page = Figure(figsize=(11, 8.5))
            page.text(0.03, 0.97, "WaDi experiments on the embedded teacher — final scores", va="top", fontsize=12)
            page.text(0.03, 0.92, shown.round(4).to_string(index=False), va="top", family="monospace", fontsize=6.5)
            pdf.savefig(page)
            for fig in figures.values():
                pdf.savefig(fig)

    written["pdf"] = atomic_write(out / "report.pdf", write_pdf)
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
    return written
