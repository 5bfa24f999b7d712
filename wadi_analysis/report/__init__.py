"""The report layer: per-layer table (+ summary, + optional swap results) -> figures, HTML, PDF.

Data flows one way: this package only reads the DataFrame/summary that :func:`wadi_analysis.compare`
produces (or its ``layers.csv``/``summary.json``), never a checkpoint.

    from wadi_analysis.report import write_report, make_figures
    write_report("out/")                        # reads out/layers.csv, out/summary.json, out/swaps.csv
    write_report("out/", result.layers, result.summary, swaps=swaps_frame, pdf=False)
    report_comparison("out/", swaps="swaps.csv")  # the command's view: bad input is one UserError
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..atomic import atomic_write, probe_writable
from ..compare import COMPARISON_FILES, REPORT_FILES, read_comparison, read_summary
from ..errors import UserError
from ..outputs import check_output
from .figures import CAPTIONS, make_figures
from .html import render_html
from .pdf import page_count, write_pdf
from .tables import read_layers

__all__ = ["CAPTIONS", "make_figures", "page_count", "read_layers", "report_comparison", "write_report"]


def write_report(out_dir: str | os.PathLike, layers: pd.DataFrame | None = None, summary: dict | None = None,
                 swaps: pd.DataFrame | None = None, html: bool = True, pdf: bool = True) -> dict[str, Path]:
    """Write ``out_dir/report.html`` and/or ``out_dir/report.pdf`` (each atomically).

    Args:
        out_dir: output folder (created if needed); also where missing inputs are read from.
        layers: the per-layer table; default ``out_dir/layers.csv``.
        summary: the summary dict; default ``out_dir/summary.json``.
        swaps: swap-experiment results (``hybrid`` + numeric metric columns such as ``fid``); default
            ``out_dir/swaps.csv`` when it exists, else no swap figure.
        html, pdf: which reports to write.

    Returns:
        ``{"html": path, "pdf": path}`` for the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if layers is None:
        layers = read_layers(out_dir / "layers.csv")
    if summary is None:
        summary = read_summary(out_dir / "summary.json")
    if swaps is None and (out_dir / "swaps.csv").exists():
        swaps = read_swaps(out_dir / "swaps.csv")
    layers = layers.reset_index(drop=True)
    figures = make_figures(layers, summary, swaps)
    written = {}
    if html:
        text = render_html(layers, summary, figures)

        def write_html(tmp):
            Path(tmp).write_text(text, encoding="utf-8")
        written["html"] = atomic_write(out_dir / "report.html", write_html)
    if pdf:
        written["pdf"] = atomic_write(out_dir / "report.pdf", lambda tmp: write_pdf(tmp, layers, summary, figures))
    return written


def read_swaps(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV of swap results (``hybrid`` + metric columns), or a :class:`UserError` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"swap results {path} {'is not a file' if path.exists() else 'do not exist'}")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise UserError(f"swap results {path} are empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError):
        raise UserError(f"swap results {path} are not a CSV table") from None


def report_comparison(comparison_dir: str | os.PathLike, swaps: str | os.PathLike | None = None, html: bool = True,
                      pdf: bool = True) -> dict[str, Path]:
    """:func:`write_report` on a folder ``compare --out`` wrote, with ``swaps`` a CSV file of swap results
    (default ``comparison_dir/swaps.csv`` if present); inputs that do not make a report are a ``UserError``,
    found before anything is written."""
    comparison_dir = Path(comparison_dir)
    layers, summary = read_comparison(comparison_dir, "the report")
    default_swaps = comparison_dir / "swaps.csv"
    swaps = swaps or (default_swaps if default_swaps.exists() else None)
    table = read_swaps(swaps) if swaps else None
    inputs = [comparison_dir / name for name in COMPARISON_FILES] + ([swaps] if swaps else [])
    for name, wanted in zip(REPORT_FILES, (html, pdf)):
        if wanted:
            check_output(comparison_dir / name, inputs, folder=False)
    probe_writable(comparison_dir / REPORT_FILES[0])
    return write_report(comparison_dir, layers, summary, swaps=table, html=html, pdf=pdf)
