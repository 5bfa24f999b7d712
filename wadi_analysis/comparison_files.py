"""Reading a comparison folder back: ``layers.csv`` and ``summary.json`` as :meth:`Comparison.write` wrote
them, checked, with bad input as one :class:`~wadi_analysis.errors.UserError` naming file, column and row.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .errors import UserError

TEXT_COLUMNS = ("name", "kind", "block", "role", "group", "shape", "dtype", "student_dtype", "status")
REQUIRED_COLUMNS = ("name", "kind", "block", "group", "shape", "numel", "rows", "direction_change_mean", "status")


def read_layers(path: str | os.PathLike) -> pd.DataFrame:
    """``layers.csv`` as :meth:`Comparison.write` writes it: text columns kept verbatim (a block named
    ``NA`` stays ``NA``), every other column numeric (empty cells become NaN); a cell that is not a
    number, or a file that is no CSV table, is a :class:`UserError` naming the file, column and row."""
    path = Path(path)
    try:
        layers = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty: not a table of layers") from None
    except (pd.errors.ParserError, UnicodeDecodeError):
        raise UserError(f"{path} is not a CSV table of layers") from None
    for column in layers.columns:
        if column in TEXT_COLUMNS:
            continue
        text = layers[column]
        numbers = pd.to_numeric(text.replace("", float("nan")), errors="coerce")
        bad = numbers.isna() & (text != "") & (text.str.lower() != "nan")
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise UserError(f"{path}: column {str(column)[:40]!r} holds {text.iloc[row][:40]!r} in row {row + 1}, "
                            f"not a number")
        layers[column] = numbers
    return layers


def read_summary(path: str | os.PathLike) -> dict:
    """``summary.json``: a JSON object whose ``teacher``/``student`` entries, when present, are objects."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path} is not JSON") from None
    if not isinstance(summary, dict):
        kind = {list: "a list", type(None): "null", str: "a string", bool: "true or false"}.get(type(summary), "a number")
        raise UserError(f"{path} is not a comparison summary (a JSON object is needed, not {kind})")
    for side in ("teacher", "student"):
        if summary.get(side) is not None and not isinstance(summary[side], dict):
            raise UserError(f"{path}: {side} is not an object")
    return summary


def _check_statistics(layers: pd.DataFrame, path: Path) -> None:
    """What :func:`compare_sources` writes, and nothing else: statistics finite (or empty) and >= 0,
    counts and ranks whole numbers, energy shares, the rotation share and the LoRaD fit percentages of at most 100."""
    for column in layers.columns:
        if column in TEXT_COLUMNS:
            continue
        values = layers[column]
        count = (column in ("numel", "rows", "valid_rows", "zero_norm_rows", "nonfinite_rows")
                 or ("_rank" in column and "_rank_rel" not in column))
        share = "energy" in column or column in ("lorad_fit", "rotation_share")
        known = values.dropna()
        bad = (known < 0) | ~known.map(math.isfinite).astype(bool) | (share & (known > 100.001))
        bad |= count & ((known % 1 != 0) | (known > 2.0 ** 53))
        if bad.any():
            row = int(values.index.get_loc(bad[bad].index[0]))
            raise UserError(f"{path}: column {str(column)[:40]!r} holds {float(known[bad].iloc[0])!r} in row {row + 1}, "
                            f"which no comparison writes ({'a whole number' if count else 'a percentage' if share else 'a finite value'} "
                            f">= 0{', at most 100' if share else ''} is expected)")


def read_comparison(folder: str | os.PathLike, product: str) -> tuple[pd.DataFrame, dict]:
    """``layers.csv`` (with the columns every product needs) and ``summary.json`` of a comparison folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a comparison folder (not a folder)")
    with reading_comparison(folder, product):
        try:
            layers, summary = read_layers(folder / "layers.csv"), read_summary(folder / "summary.json")
        except UserError as exc:
            raise UserError(f"cannot build {product} from {folder}: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in layers.columns]
    if missing:
        raise UserError(f"cannot build {product} from {folder}: layers.csv has no column {', '.join(missing)}")
    _check_statistics(layers, folder / "layers.csv")
    twice = layers["name"][layers["name"].duplicated()]
    if len(twice):
        raise UserError(f"cannot build {product} from {folder}: layers.csv lists {twice.iloc[0][:80]!r} twice")
    return layers, summary


@contextmanager
def reading_comparison(folder: str | os.PathLike, product: str):
    """Around building ``product`` (e.g. "the report") from a folder :meth:`Comparison.write` filled:
    a missing file, or one that does not parse or lacks a column, becomes one :class:`UserError`."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise UserError(f"{folder} is not a comparison folder ({Path(exc.filename or '?').name} missing)") from None
    except (ValueError, KeyError) as exc:  # pandas' ParserError and json's JSONDecodeError are ValueErrors
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot build {product} from {folder}: {detail}") from None
