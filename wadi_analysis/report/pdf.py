"""``report.pdf``: a summary page, one page per figure, then the layer table (matplotlib ``PdfPages``).

All text is drawn with ``parse_math=False`` (a tensor name with ``$`` is shown verbatim, never parsed
as mathtext), and the PDF metadata holds only fixed strings (no creation date: the file is
deterministic). With more than :data:`MAX_TABLE_ROWS` layers the table keeps the layers with the
largest mean direction change and says so on each of its pages.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .tables import clean, count_rows, fmt, headline_rows, number, source_line, versions_line, warning_lists

PAGE = (11.69, 8.27)  # A4 landscape, inches
ROWS_PER_PAGE = 45
MAX_TABLE_ROWS = 3 * ROWS_PER_PAGE
MAX_WARNING_ITEMS = 4
METADATA = {"Title": "WaDi weight-change report", "Subject": "teacher vs student weight changes",
            "Creator": "wadi_analysis.report", "CreationDate": None}
MONO = "DejaVu Sans Mono"
# (column, header, width) of the PDF layer table.
PDF_COLUMNS = [("name", "name", 56), ("block", "block", 16), ("role", "role", 15), ("rows", "rows", 6),
               ("norm_change_mean", "norm mean", 10), ("norm_change_std", "norm std", 10),
               ("direction_change_mean", "dir mean", 10), ("direction_change_std", "dir std", 10),
               ("angle_deg_mean", "angle °", 9), ("frobenius_change", "frob %", 9),
               ("residual_energy_top30", "E30 %", 8), ("lorad_fit", "LoRaD %", 9), ("status", "status", 10)]


def table_pages(n_layers: int) -> int:
    """Pages the layer table takes for ``n_layers`` layers."""
    return max(1, math.ceil(min(n_layers, MAX_TABLE_ROWS) / ROWS_PER_PAGE))


def page_count(n_figures: int, n_layers: int) -> int:
    """Total pages of the PDF: summary page + one per figure + the table pages."""
    return 1 + n_figures + table_pages(n_layers)


def _write_lines(fig: Figure, lines: list[tuple[str, str]], top: float, size: float = 8.5) -> float:
    """Draw (text, weight) lines in monospace from ``top`` (figure fraction) down; returns the next y."""
    step = size * 1.4 / 72 / PAGE[1]
    for i, (text, weight) in enumerate(lines):
        fig.text(0.04, top - i * step, text, family=MONO, size=size, weight=weight, va="top", parse_math=False)
    return top - len(lines) * step


def summary_page(summary: dict, layers: pd.DataFrame) -> Figure:
    """Title, sources, the headline table, counts, warnings, command and versions."""
    fig = Figure(figsize=PAGE)
    fig.text(0.04, 0.95, "WaDi weight-change report: teacher vs student", size=18, weight="bold", va="top")
    lines = [(f"Teacher: {clean(source_line(summary, 'teacher'), 160)}", "normal"),
             (f"Student: {clean(source_line(summary, 'student'), 160)}", "normal"), ("", "normal"),
             ("All-layer averages of per-layer mean and std over rows (%); weighted: by parameter count", "bold")]
    header = ["", "mean", "std", "mean (weighted)", "std (weighted)"]
    for row in [header] + headline_rows(summary):
        lines.append((f"{row[0]:<24}" + "".join(f"{c:>17}" for c in row[1:]), "normal"))
    lines += [("", "normal"), ("Counts", "bold")]
    lines += [(f"{label:<46}{clean(value, 120)}", "normal") for label, value in count_rows(summary)]
    warnings = warning_lists(summary, layers)
    lines += [("", "normal"), ("Warnings" if warnings else "No missing keys, shape mismatches or non-finite layers.", "bold")]
    for title, items in warnings:
        lines.append((f"{title}: {len(items)}", "bold"))
        lines += [(f"  {clean(item, 150)}", "normal") for item in items[:MAX_WARNING_ITEMS]]
        if len(items) > MAX_WARNING_ITEMS:
            lines.append((f"  … and {len(items) - MAX_WARNING_ITEMS} more (see report.html)", "normal"))
    command = clean(summary.get("command") or "n/a (not run from the CLI)", 600)
    lines += [("", "normal"), ("Command", "bold")]
    lines += [(f"  {part}", "normal") for part in textwrap.wrap(command, 150)[:4]]
    lines += [(f"Versions: {clean(versions_line(summary), 150)}; precision {clean(summary.get('precision', 'n/a'), 20)}", "normal")]
    limit = 56
    if len(lines) > limit:
        lines = lines[:limit - 1] + [("… (truncated; see report.html)", "normal")]
    # As large as fits: 10 pt for a short page, down to 7 pt for a full one.
    size = max(7.0, min(10.0, 0.85 * PAGE[1] * 72 / 1.4 / len(lines)))
    _write_lines(fig, lines, 0.89, size)
    return fig


def _row_text(record: dict, columns: list[tuple[str, str, int]]) -> str:
    cells = []
    for column, _, width in columns:
        value = record.get(column)
        if column in ("name", "block", "role", "status"):
            cells.append(f"{clean(value, width - 1):<{width}}")
        else:
            x = number(value)
            text = "n/a" if x is None else f"{x:.0f}" if column == "rows" else fmt(x, 4)
            cells.append(f"{text:>{width - 1}} ")
    return "".join(cells)


def table_page_figures(layers: pd.DataFrame) -> list[Figure]:
    """The layer table over pages; the top layers by mean direction change when there are too many."""
    columns = [c for c in PDF_COLUMNS if c[0] in layers.columns]
    chosen = layers
    note = f"all {len(layers)} layers, in table order"
    if len(layers) > MAX_TABLE_ROWS:
        order = pd.to_numeric(layers["direction_change_mean"], errors="coerce").sort_values(
            ascending=False, na_position="last", kind="stable").index
        chosen = layers.loc[order[:MAX_TABLE_ROWS]]
        note = (f"the {MAX_TABLE_ROWS} of {len(layers)} layers with the largest mean direction change "
                "(the full table is in report.html and layers.csv)")
    records = chosen.to_dict("records")
    pages = table_pages(len(layers))
    header = "".join(f"{h:<{w}}" if c in ("name", "block", "role", "status") else f"{h:>{w - 1}} "
                     for c, h, w in columns)
    size = 7.2
    step = size * 1.38 / 72 / PAGE[1]
    figures = []
    for page in range(pages):
        fig = Figure(figsize=PAGE)
        fig.text(0.04, 0.965, f"Layers ({page + 1}/{pages}): {note}", size=11, weight="bold", va="top")
        top = 0.92
        fig.text(0.04, top, header, family=MONO, size=size, weight="bold", va="top", parse_math=False)
        chunk = records[page * ROWS_PER_PAGE:(page + 1) * ROWS_PER_PAGE]
        for i, record in enumerate(chunk):
            y = top - (i + 1.2) * step
            if i % 2:
                fig.add_artist(Rectangle((0.035, y - step * 0.85), 0.93, step, transform=fig.transFigure,
                                         color="0.94", zorder=0))
            fig.text(0.04, y, _row_text(record, columns), family=MONO, size=size, va="top", parse_math=False,
                     color="#b00000" if record.get("status") == "nonfinite" else "black")
        fig.text(0.04, 0.03, "Percent changes per row, averaged per layer (WaDi §1). Red: non-finite layer.",
                 size=7, color="0.4")
        figures.append(fig)
    return figures


def write_pdf(path: str | Path, layers: pd.DataFrame, summary: dict, figures: dict[str, Figure]) -> Path:
    """Write the multi-page PDF to ``path`` (the caller makes it atomic)."""
    with PdfPages(path, metadata=METADATA) as pdf:
        pdf.savefig(summary_page(summary, layers))
        for fig in figures.values():
            pdf.savefig(fig)
        for fig in table_page_figures(layers):
            pdf.savefig(fig)
    return Path(path)
