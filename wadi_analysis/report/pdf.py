"""``report.pdf``: a summary page, one page per figure, then the layer table (matplotlib ``PdfPages``).

Every page is A4 landscape (:data:`PAGE`): a figure is rendered at :data:`FIGURE_DPI` and fitted onto
its page with its caption, whatever its own size. All text is drawn with ``parse_math=False`` (a
tensor name with ``$`` is shown verbatim, never parsed as mathtext), and the PDF metadata holds only
fixed strings (no creation date: the file is deterministic). Layer names are never truncated: a long
name wraps (at its dots) onto further lines of its row. With more than :data:`MAX_TABLE_ROWS` layers
the table keeps the layers with the largest mean direction change and says so on each of its pages.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path

import matplotlib.image
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .figures import CAPTIONS
from .tables import (HEADLINE_NOTE, TOP_ROTATION_HEADER, clean, count_rows, fmt, headline_rows, number, source_line,
                     top_rotation_rows, versions_line, warning_lists)

PAGE = (11.69, 8.27)  # A4 landscape, inches: every page of the PDF
FIGURE_DPI = 150
ROWS_PER_PAGE = 50  # table lines per page (a row with a wrapped name takes several)
MAX_TABLE_ROWS = 3 * ROWS_PER_PAGE
MAX_WARNING_ITEMS = 4
METADATA = {"Title": "WaDi weight-change report", "Subject": "teacher vs student weight changes",
            "Creator": "wadi_analysis.report", "CreationDate": None}
MONO = "DejaVu Sans Mono"
TABLE_FONT = 6.4  # points; with the widths below a row is 201 characters, the width of the page
TEXT_COLUMNS = ("name", "block", "role", "status")
# (column, header, width in characters) of the PDF layer table.
PDF_COLUMNS = [("name", "name", 80), ("block", "block", 16), ("role", "role", 15), ("rows", "rows", 6),
               ("norm_change_mean", "norm mean", 10), ("norm_change_std", "norm std", 10),
               ("direction_change_mean", "dir mean", 10), ("direction_change_std", "dir std", 10),
               ("angle_deg_mean", "angle °", 9), ("frobenius_change", "frob %", 9),
               ("residual_energy_top30", "E30 %", 8), ("lorad_fit", "LoRaD %", 9), ("status", "status", 10)]


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken after dots where possible, never cut short."""
    lines, line = [], ""
    for part in re.findall(r"[^.]*\.|[^.]+$", text) or [""]:
        while len(part) > width:  # a part longer than a line: hard breaks
            room = width - len(line)
            lines.append(line + part[:room])
            line, part = "", part[room:]
        if len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return lines + [line] if line or not lines else lines


def _table_rows(layers: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The layers the table shows (all, or the top :data:`MAX_TABLE_ROWS` by direction change) and why."""
    if len(layers) <= MAX_TABLE_ROWS:
        return layers, f"all {len(layers)} layers, in table order"
    order = pd.to_numeric(layers["direction_change_mean"], errors="coerce").sort_values(
        ascending=False, na_position="last", kind="stable").index
    return layers.loc[order[:MAX_TABLE_ROWS]], (f"the {MAX_TABLE_ROWS} of {len(layers)} layers with the largest "
                                                "mean direction change (the full table is in report.html and layers.csv)")


def _row_lines(record: dict, columns: list[tuple[str, str, int]]) -> list[str]:
    """One table row as its lines: the name wrapped in its column, the other cells on the first line."""
    cells = []
    for column, _, width in columns:
        value = record.get(column)
        if column == "name":  # the name whole, wrapped; block and role are parts of it, shortened to fit
            cells.append([f"{line:<{width}}" for line in wrap(clean(value), width - 1)])
        elif column in TEXT_COLUMNS:
            cells.append([f"{clean(value, width - 1):<{width}}"])
        else:
            x = number(value)
            text = "n/a" if x is None else f"{x:.0f}" if column == "rows" else fmt(x, 4)
            cells.append([f"{text:>{width - 1}} "])
    height = max(len(c) for c in cells)
    return ["".join(c[i] if i < len(c) else " " * w for c, (_, _, w) in zip(cells, columns)) for i in range(height)]


def table_pages(layers: pd.DataFrame | int) -> int:
    """Pages the layer table takes (an int: that many layers of one line each)."""
    if isinstance(layers, int):
        return max(1, math.ceil(min(layers, MAX_TABLE_ROWS) / ROWS_PER_PAGE))
    return len(_paginate(layers))


def page_count(n_figures: int, layers: pd.DataFrame | int) -> int:
    """Total pages of the PDF: summary page + one per figure + the table pages."""
    return 1 + n_figures + table_pages(layers)


def _paginate(layers: pd.DataFrame) -> list[list[tuple[str, list[str]]]]:
    """Pages of rows, each (status, its lines); no row is split across pages."""
    columns = [c for c in PDF_COLUMNS if c[0] in layers.columns]
    chosen, _ = _table_rows(layers)
    pages, page, used = [], [], 0
    for record in chosen.to_dict("records"):
        lines = _row_lines(record, columns)
        if page and used + len(lines) > ROWS_PER_PAGE:
            pages.append(page)
            page, used = [], 0
        page.append((str(record.get("status", "")), lines))
        used += len(lines)
    return pages + [page] if page or not pages else pages


def _write_lines(fig: Figure, lines: list[tuple[str, str]], top: float, size: float = 8.5) -> float:
    """Draw (text, weight) lines in monospace from ``top`` (figure fraction) down; returns the next y."""
    step = size * 1.4 / 72 / PAGE[1]
    for i, (text, weight) in enumerate(lines):
        fig.text(0.04, top - i * step, text, family=MONO, size=size, weight=weight, va="top", parse_math=False)
    return top - len(lines) * step


def _columns_text(rows: list[list[str]], left: int = 1) -> list[str]:
    """Rows of cells as monospace lines: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["".join(f"{c:<{w + 2}}" if i < left else f"{c:>{w + 3}}" for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def summary_page(summary: dict, layers: pd.DataFrame) -> Figure:
    """Title, sources, the headline table, the layers that rotate most, counts, warnings, command, versions."""
    fig = Figure(figsize=PAGE)
    fig.text(0.04, 0.95, "WaDi weight-change report: teacher vs student", size=18, weight="bold", va="top")
    lines = [(f"Teacher: {clean(source_line(summary, 'teacher'), 160)}", "normal"),
             (f"Student: {clean(source_line(summary, 'student'), 160)}", "normal"), ("", "normal"),
             ("All-layer averages of per-layer mean and std over rows (%); weighted: by parameter count", "bold")]
    header = ["", "mean", "std", "mean (weighted)", "std (weighted)"]
    lines += [(line, "normal") for line in _columns_text([header] + headline_rows(summary, layers))]
    lines += [(line, "normal") for line in textwrap.wrap(HEADLINE_NOTE, 150)]
    top = top_rotation_rows(summary, layers)
    if top:
        lines += [("", "normal"), (f"Top {len(top)} layers by rotation (mean direction change)", "bold")]
        lines += [(line, "normal") for line in _columns_text([TOP_ROTATION_HEADER] + top, left=2)]
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
    limit = 64
    if len(lines) > limit:
        lines = lines[:limit - 1] + [("… (truncated; see report.html)", "normal")]
    # As large as fits: 10 pt for a short page, down to 6.5 pt for a full one, and no line wider than the page.
    widest = max(len(text) for text, _ in lines)
    size = max(6.0, min(10.0, 0.85 * PAGE[1] * 72 / 1.4 / len(lines), 0.92 * PAGE[0] * 72 / (0.61 * widest)))
    _write_lines(fig, lines, 0.89, size)
    return fig


def figure_page(fig: Figure, caption: str) -> Figure:
    """``fig`` rendered at :data:`FIGURE_DPI` and fitted (aspect kept) onto a :data:`PAGE` page, caption below."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    buffer.seek(0)
    page = Figure(figsize=PAGE)
    ax = page.add_axes((0.03, 0.11, 0.94, 0.86))
    ax.imshow(matplotlib.image.imread(buffer, format="png"), interpolation="antialiased")
    ax.set_axis_off()
    page.text(0.04, 0.085, "\n".join(textwrap.wrap(caption, 190)), size=8.5, va="top", color="0.2", parse_math=False)
    return page


def table_page_figures(layers: pd.DataFrame) -> list[Figure]:
    """The layer table over pages (full names, wrapped); the top layers by mean direction change when
    there are too many."""
    columns = [c for c in PDF_COLUMNS if c[0] in layers.columns]
    _, note = _table_rows(layers)
    pages = _paginate(layers)
    header = "".join(f"{h:<{w}}" if c in TEXT_COLUMNS else f"{h:>{w - 1}} " for c, h, w in columns)
    step = TABLE_FONT * 1.38 / 72 / PAGE[1]
    figures = []
    for index, page in enumerate(pages, 1):
        fig = Figure(figsize=PAGE)
        fig.text(0.04, 0.965, f"Layers ({index}/{len(pages)}): {note}", size=11, weight="bold", va="top")
        top = 0.92
        fig.text(0.04, top, header, family=MONO, size=TABLE_FONT, weight="bold", va="top", parse_math=False)
        line = 1.2
        for i, (status, row_lines) in enumerate(page):
            y = top - line * step
            if i % 2:
                fig.add_artist(Rectangle((0.035, y - step * (len(row_lines) - 0.15)), 0.93, step * len(row_lines),
                                         transform=fig.transFigure, color="0.94", zorder=0))
            for k, text in enumerate(row_lines):
                fig.text(0.04, y - k * step, text, family=MONO, size=TABLE_FONT, va="top", parse_math=False,
                         color="#b00000" if status == "nonfinite" else "black")
            line += len(row_lines)
        fig.text(0.04, 0.03, "Percent changes per row, averaged per layer (WaDi §1). Red: non-finite layer.",
                 size=7, color="0.4")
        figures.append(fig)
    return figures


def write_pdf(path: str | Path, layers: pd.DataFrame, summary: dict, figures: dict[str, Figure]) -> Path:
    """Write the multi-page PDF to ``path`` (the caller makes it atomic); every page is :data:`PAGE`."""
    with PdfPages(path, metadata=METADATA) as pdf:
        pdf.savefig(summary_page(summary, layers))
        for name, fig in figures.items():
            pdf.savefig(figure_page(fig, CAPTIONS.get(name, name)))
        for fig in table_page_figures(layers):
            pdf.savefig(fig)
    return Path(path)
