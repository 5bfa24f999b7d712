"""The streaming comparison: two checkpoints -> one row per layer (a DataFrame) + a summary.

Only one teacher tensor and one student tensor are alive at a time, and their pages are released
right after use, so memory stays at about one layer whatever the model size.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from .atomic import atomic_write_text, probe_writable
from .checkpoint import CheckpointError, CheckpointSource, TensorDictSource
from .comparison_files import read_comparison, read_layers, read_summary  # noqa: F401  (their home until now)
from .decompose import layer_statistics, norm_rounding_level, row_norms
from .spectrum import DEFAULT_SPECTRUM_FRACTIONS, PAPER_RANK_FRACTION, lorad_fit, residual_spectra
from .errors import InvalidValue, terminal_safe
from .keymap import align
from .layers import label
from .locate import open_checkpoint
from .lora_student import LoraStudentSource
from .outputs import check_output
from .summary import summarize

PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
LAYER_COLUMNS = [
    "name", "kind", "block", "role", "group", "shape", "numel", "rows", "dtype", "student_dtype",
    "norm_change_mean", "norm_change_std", "norm_change_max",
    "direction_change_mean", "direction_change_std", "direction_change_max",
    "angle_deg_mean", "angle_deg_std", "angle_deg_max",
    "radial_change_mean", "radial_change_std", "radial_change_max",
    "tangential_change_mean", "tangential_change_std", "tangential_change_max", "rotation_share", "angle_to_norm_ratio",
    "frobenius_change", "norm_rounding_level", "valid_rows", "zero_norm_rows", "nonfinite_rows", "status",
]


@dataclass
class Selection:
    """Which weights to analyse: glob patterns on canonical names and weight kinds."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __call__(self, name: str, kind: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return not self.kinds or kind in self.kinds


@dataclass
class Comparison:
    """The per-layer table and the summary of one teacher/student comparison."""

    layers: pd.DataFrame
    summary: dict

    def write(self, out_dir: str | os.PathLike, report: bool = False) -> list[Path]:
        """Write ``layers.csv`` and ``summary.json`` atomically (temp file + rename), and with ``report``
        also ``report.html`` and ``report.pdf`` (see :func:`wadi_analysis.report.write_report`)."""
        out_dir = check_comparison_output(out_dir, report=report)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for file_name, text in (("layers.csv", self.layers.to_csv(index=False)),
                                ("summary.json", json.dumps(self.summary, indent=2) + "\n")):
            written.append(atomic_write_text(out_dir / file_name, text))
        if report:
            from .report import write_report

            written += write_report(out_dir, self.layers, self.summary).values()
        return written


COMPARISON_FILES = ("layers.csv", "summary.json")
REPORT_FILES = ("report.html", "report.pdf")


def check_comparison_output(out_dir: str | os.PathLike, inputs: Iterable = (), *, report: bool = False) -> Path:
    """``out_dir`` if a comparison may be written there (:mod:`wadi_analysis.outputs`), checked before any
    work: a folder and no link, and each file written into it (never replaced whole, so it may hold
    other files, inputs too) no folder, no link, and apart from the ``inputs``."""
    out_dir = Path(out_dir)
    inputs = [i for i in inputs if i is not None and not isinstance(i, (CheckpointSource, Mapping))]
    check_output(out_dir, folder=True)
    for name in COMPARISON_FILES + (REPORT_FILES if report else ()):
        check_output(out_dir / name, inputs, folder=False)
    probe_writable(out_dir / COMPARISON_FILES[0])
    return out_dir


def _open(source, component, variant, ema) -> tuple[CheckpointSource, bool]:
    if isinstance(source, CheckpointSource):
        return source, False
    if isinstance(source, Mapping):
        return TensorDictSource(dict(source)), True
    return open_checkpoint(source, component=component, variant=variant, ema=ema), True


def _progress_bar(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    return Progress(TextColumn("[bold]comparing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeRemainingColumn(), TextColumn("{task.fields[layer]}", markup=False),
                    console=Console(stderr=True), transient=True)


@contextmanager
def _torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compare_sources(teacher: CheckpointSource, student: CheckpointSource, *, selection: Selection | None = None,
                    precision: str = "float32", progress: bool = False, workers: int | None = None,
                    spectrum: bool = False, spectrum_fractions: tuple[float, ...] = DEFAULT_SPECTRUM_FRACTIONS,
                    fit: bool = False) -> Comparison:
    """Compare two opened sources (see :func:`compare`)."""
    selection = selection or Selection()
    compute_dtype = PRECISIONS[precision]
    alignment = align(teacher, student)
    if not alignment.common and not alignment.shape_mismatches:
        raise CheckpointError(
            f"no common weights: the teacher has {len(teacher)} tensors and the student {len(student)}, "
            f"but no name is shared (teacher e.g. {teacher.names()[0]!r}, student e.g. {student.names()[0]!r})")
    skipped_vectors = skipped_non_float = deselected = skipped_empty = 0
    todo = []
    for name in alignment.common:
        info = teacher.info(name)
        layer = label(name, len(info.shape))
        if len(info.shape) < 2:
            skipped_vectors += 1
        elif info.numel == 0:  # no rows (or empty rows): no norm, no direction to compare
            skipped_empty += 1
        elif not (info.dtype.is_floating_point and student.info(name).dtype.is_floating_point):
            skipped_non_float += 1
        elif not selection(name, layer.kind):
            deselected += 1
        else:
            todo.append((name, layer))
    if not todo:
        raise CheckpointError(f"none of the {len(alignment.common)} shared weights is a selected, non-empty "
                              f"weight with ≥ 2 dims")

    def measure(item):
        name, _ = item
        teacher_weight, student_weight = teacher.tensor(name), student.tensor(name)
        level = norm_rounding_level(teacher_weight[0].numel(), teacher_weight.dtype, student_weight.dtype)
        stats = layer_statistics(row_norms(teacher_weight, student_weight, compute_dtype), level)
        finite = not stats["nonfinite_rows"]  # a spectrum of NaN/inf has no meaning (and LAPACK fails on it)
        if spectrum and finite:
            stats.update(residual_spectra(teacher_weight, student_weight, fractions=spectrum_fractions))
        if fit and finite:
            stats.update(lorad_fit(teacher_weight, student_weight))
        del teacher_weight, student_weight
        teacher.release(name)
        student.release(name)
        return stats

    records = []
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), len(todo)))
    with _progress_bar(progress) as bar, _torch_threads(1), threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("compare", total=sum(teacher.info(n).numel for n, _ in todo), layer="") if bar else None
        # Layers run in parallel, one torch (and BLAS) thread each: no OpenMP barriers per small op,
        # which stall badly on a busy machine, and at most `workers` layers are in memory at once.
        for (name, layer), stats in zip(todo, pool.map(measure, todo)):
            info, student_info = teacher.info(name), student.info(name)
            identical = stats.pop("identical")
            status = "nonfinite" if stats["nonfinite_rows"] else "identical" if identical else "ok"
            records.append({
                "name": name, "kind": layer.kind, "block": layer.block, "role": layer.role, "group": layer.group,
                "shape": "x".join(map(str, info.shape)), "numel": info.numel,
                "dtype": str(info.dtype).removeprefix("torch."),
                "student_dtype": str(student_info.dtype).removeprefix("torch."),
                **stats, "status": status,
            })
            if bar:
                bar.update(task, advance=info.numel, layer=terminal_safe(name[-60:]))
    layers = pd.DataFrame.from_records(records)
    layers = layers[LAYER_COLUMNS + [c for c in layers.columns if c not in LAYER_COLUMNS]]
    summary = summarize(layers)
    summary.update({
        "n_skipped_vectors": skipped_vectors,
        "n_skipped_non_float": skipped_non_float,
        "n_skipped_empty": skipped_empty,
        "n_deselected": deselected,
        "missing_in_teacher": alignment.missing_in_teacher,
        "missing_in_student": alignment.missing_in_student,
        "shape_mismatches": [{"name": n, "teacher_shape": list(teacher.info(n).shape),
                              "student_shape": list(student.info(n).shape)} for n in alignment.shape_mismatches],
        "teacher": describe(teacher),
        "student": describe(student),
        "precision": precision,
        "versions": _versions(),
    })
    return Comparison(layers, summary)


CheckpointLike = str | os.PathLike | CheckpointSource | Mapping[str, torch.Tensor]


def compare(teacher: CheckpointLike, student: CheckpointLike | None = None, *,
            student_lora: str | os.PathLike | None = None, lora_scale: float = 1.0, include: Iterable[str] = (), exclude: Iterable[str] = (), kinds: Iterable[str] = (),
            component: str | None = None, variant: str | None = None, ema: str | None = None,
            precision: str = "float32", progress: bool = False, workers: int | None = None,
            spectrum: bool = False, spectrum_fractions: Iterable[float] = DEFAULT_SPECTRUM_FRACTIONS,
            fit: bool = False) -> Comparison:
    """Compare a teacher and a student checkpoint weight by weight.

    Args:
        teacher, student: paths (any format :func:`wadi_analysis.open_checkpoint` reads), opened sources,
            or in-memory ``{name: tensor}`` state dicts.
        student_lora, lora_scale: instead of ``student``, the teacher plus ``lora_scale`` times this LoRA
            file, merged weight by weight as it is read (:class:`~wadi_analysis.LoraStudentSource`).
        include, exclude: glob patterns on diffusers-style names (``*attn2*``); include keeps only matches.
        kinds: keep only these weight kinds (``linear``, ``conv``, ``embedding``, ``param``).
        component: pipeline component to read on both sides (default ``unet`` or ``transformer``).
        variant: diffusers weight variant (``fp16``) to prefer in model folders.
        ema: ``teacher``, ``student`` or ``both``: read the EMA copy of an original LDM checkpoint.
        precision: ``float32`` (fast) or ``float64`` (exact to ~1e-12); inputs are never reduced in half precision.
        progress: show a rich progress bar on stderr.
        spectrum: add residual-spectrum columns (energy in the top ``spectrum_fractions`` of the rank,
            rank for 90/93/95 % energy) for the weight and the direction residual.
        fit: add the LoRaD fit (share of the change a pure pair rotation expresses, angle-field rank).
        workers: layers measured in parallel (default: CPU count, at most 8); each uses one torch
            thread and holds one teacher and one student tensor.

    Returns:
        A :class:`Comparison` with ``layers`` (one row per analysed weight) and ``summary``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    if ema not in (None, "teacher", "student", "both"):
        raise ValueError("ema must be teacher, student or both")
    if (student is None) == (student_lora is None):
        raise InvalidValue("give either a student or student_lora (a LoRA file applied to the teacher)")
    selection = Selection(list(include), list(exclude), list(kinds))
    with ExitStack() as stack:
        opened = {}
        for side, source in (("teacher", teacher), ("student", student)):
            if source is not None:
                opened[side], owned = _open(source, component, variant, ema in (side, "both"))
                if owned:
                    stack.callback(opened[side].close)
        if student_lora is not None:
            # Read through the teacher's handle (closed with it): the LoRA student is its weights + the LoRA.
            opened["student"] = LoraStudentSource(opened["teacher"], student_lora, lora_scale)
        return compare_sources(opened["teacher"], opened["student"], selection=selection, precision=precision,
                               progress=progress, workers=workers, spectrum=spectrum,
                               spectrum_fractions=tuple(sorted({*spectrum_fractions, PAPER_RANK_FRACTION})),
                               fit=fit)


def describe_checkpoint(path: str | os.PathLike, *, component: str | None = None,
                        variant: str | None = None) -> dict:
    """:func:`describe` of the checkpoint at ``path`` (opened and closed here, headers only)."""
    with open_checkpoint(path, component=component, variant=variant) as source:
        return describe(source)


def describe(source: CheckpointSource) -> dict:
    """What a checkpoint holds, from its headers: format, tensors, parameters, dtypes, keys left out."""
    mapping = source.key_mapping
    return {
        "path": str(source.path), "format": source.format, "n_tensors": len(source),
        "n_params": int(sum(source.info(n).numel for n in source.names())),
        "dtypes": sorted({str(source.info(n).dtype).removeprefix("torch.") for n in source.names()}),
        "ignored_keys": len(mapping.ignored),
        "unmapped_keys": mapping.unmapped[:20],
        "raw_tensors": len(source.raw_source),
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for package in ("wadi", "torch", "diffusers", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
