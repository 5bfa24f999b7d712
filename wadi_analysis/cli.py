"""``wadi-analyze``: thin typer commands over the library functions."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import cli_boundary
from .cli_boundary import App, fail
from .errors import terminal_safe

app = App(help="Compare diffusion checkpoints weight by weight: norm vs direction (WaDi, CVPR 2026).")
console = Console(emoji=False)
error_console = Console(stderr=True, emoji=False)


def shown(text: object) -> str:
    """An untrusted string (tensor name, path, metadata) for a rich line with markup: visible escapes
    for control characters, and brackets that rich reads as text, not as style tags."""
    return escape(terminal_safe(text))


class Precision(str, Enum):
    float32 = "float32"
    float64 = "float64"


class EmaSide(str, Enum):
    teacher = "teacher"
    student = "student"
    both = "both"


def command_line(ctx: typer.Context) -> str:
    """The invocation, rebuilt from the parsed parameters (recorded in outputs for reproducibility)."""
    import shlex

    words = ["wadi-analyze", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        value = value.value if isinstance(value, Enum) else value
        if param.param_type_name == "argument":
            words += [] if value is None else [str(value)]  # an optional argument left out stays out
        elif value not in (None, param.default, (), []) and not (param.default is None and value is False):
            flag = max(param.opts, key=len)
            if getattr(param, "is_flag", False):
                words.append(flag)
            else:
                words += [w for v in (value if isinstance(value, (list, tuple)) else [value]) for w in (flag, str(v))]
    return " ".join(shlex.quote(w) for w in words)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(summary: dict, key: str) -> str:
    """A ratio cell; none where the norms are preserved at rounding (a ratio to rounding is no measurement)."""
    return "at rounding" if summary.get("norms_preserved_at_rounding") else _fmt(summary.get(key), 1) + "×"


def print_summary(summary: dict, layers) -> None:
    table = Table(title="teacher → student: norm vs direction", show_header=True, header_style="bold")
    table.add_column("all-layer average")
    table.add_column("norm change %", justify="right")
    table.add_column("direction change %", justify="right")
    table.add_column("direction / norm", justify="right")
    table.add_column("angle (rad) / norm", justify="right")
    for moment in ("mean", "std"):
        for suffix, label in (("", ""), ("_weighted", " (param-weighted)")):
            table.add_row(f"{moment}{label}", _fmt(summary[f"norm_change_{moment}{suffix}"]),
                          _fmt(summary[f"direction_change_{moment}{suffix}"]),
                          _ratio(summary, f"direction_to_norm_{moment}_ratio{suffix}"),
                          _ratio(summary, f"angle_to_norm_{moment}_ratio{suffix}"))
    console.print(table)
    console.print(
        f"layers analysed [bold]{summary['n_layers']}[/] ({summary['n_identical']} identical, "
        f"{len(summary['nonfinite_layers'])} non-finite), skipped 1-D {summary['n_skipped_vectors']}, "
        f"missing in teacher {len(summary['missing_in_teacher'])}, missing in student "
        f"{len(summary['missing_in_student'])}, shape mismatches {len(summary['shape_mismatches'])}, "
        f"zero-norm rows {summary['zero_norm_rows']}"
        + (f", empty weights skipped {summary['n_skipped_empty']}" if summary.get("n_skipped_empty") else ""))
    if summary.get("residual_energy_top30_mean") is not None:
        console.print(f"residual energy in the top 30 % of the rank: {summary['residual_energy_top30_mean']:.1f} % "
                      f"(direction residual {_fmt(summary.get('direction_residual_energy_top30_mean'), 1)} %)")
    if summary.get("lorad_fit_mean") is not None:
        console.print(f"share of the change a pure pair rotation (LoRaD) expresses: {summary['lorad_fit_mean']:.1f} %")
    if summary.get("max_layer_direction_change_name"):
        console.print(f"largest mean direction change: {summary['max_layer_direction_change_mean']:.3f} % in "
                      f"{shown(summary['max_layer_direction_change_name'])}")
    for item in summary["shape_mismatches"][:5]:
        console.print(f"[yellow]shape mismatch[/] {shown(item['name'])}: {item['teacher_shape']} vs {item['student_shape']}")


@app.command()
def compare(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Argument(help="Teacher checkpoint: file, sharded index, diffusers model or pipeline folder.")],
    student: Annotated[Optional[Path], typer.Argument(help="Student checkpoint, any supported format (or use --student-lora).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write layers.csv and summary.json here.")] = None,
    student_lora: Annotated[Optional[Path], typer.Option(help="Student = teacher + this LoRA (diffusers/peft or kohya), merged on the fly.")] = None,
    lora_scale: Annotated[float, typer.Option(help="Scale of --student-lora.")] = 1.0,
    include: Annotated[Optional[list[str]], typer.Option("--include", "-i", help="Glob on weight names to keep (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", "-x", help="Glob on weight names to drop (repeatable).")] = None,
    kind: Annotated[Optional[list[str]], typer.Option("--kind", "-k", help="Keep only linear / conv / embedding / param (repeatable).")] = None,
    component: Annotated[Optional[str], typer.Option(help="Pipeline component folder (default: unet or transformer).")] = None,
    variant: Annotated[Optional[str], typer.Option(help="diffusers weight variant to prefer, e.g. fp16.")] = None,
    ema: Annotated[Optional[EmaSide], typer.Option(help="Use the EMA copy (model_ema.*) of an LDM checkpoint.")] = None,
    precision: Annotated[Precision, typer.Option(help="Arithmetic for the statistics.")] = Precision.float32,
    spectrum: Annotated[bool, typer.Option("--spectrum", help="Add residual spectra (energy in the top 30 % of the rank, rank for 90/93/95 %).")] = False,
    spectrum_fraction: Annotated[Optional[list[float]], typer.Option(min=0.0, max=1.0, help="Rank fractions for --spectrum (repeatable; default 0.1 0.2 0.3 0.5 0.7).")] = None,
    lorad_fit: Annotated[bool, typer.Option("--lorad-fit", help="Add the LoRaD fit: share of the change a pure pair rotation expresses.")] = False,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Layers measured in parallel (default: CPUs, at most 8).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Also write report.html and report.pdf to --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout, nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Compare TEACHER and STUDENT weight by weight: per-row norm and direction change."""
    from .compare import check_comparison_output, compare as run_compare
    from .spectrum import DEFAULT_SPECTRUM_FRACTIONS  # imported here: --help starts without torch

    if (student is None) == (student_lora is None):
        fail("give either STUDENT or --student-lora FILE")
    if report and out is None:
        fail("--report needs --out DIR")
    if out is not None:
        check_comparison_output(out, [teacher, student, student_lora], report=report)
    result = run_compare(teacher, student, student_lora=student_lora, lora_scale=lora_scale, include=include or (),
                         exclude=exclude or (), kinds=kind or (), component=component, variant=variant,
                         ema=ema.value if ema else None, precision=precision.value, progress=not (quiet or as_json),
                         workers=workers, spectrum=spectrum,
                         spectrum_fractions=spectrum_fraction or DEFAULT_SPECTRUM_FRACTIONS, fit=lorad_fit)
    result.summary["command"] = command_line(ctx)
    written = result.write(out, report=report) if out is not None else []
    if as_json:
        print(json.dumps(result.summary, indent=2))
        return
    print_summary(result.summary, result.layers)
    if written:
        console.print(terminal_safe(f"wrote {', '.join(path.name for path in written)} to {out}"), markup=False)


class Side(str, Enum):
    teacher = "teacher"
    student = "student"


@app.command()
def swap(
    teacher: Annotated[Path, typer.Argument(help="Teacher checkpoint, any supported format.")],
    student: Annotated[Path, typer.Argument(help="Student checkpoint; the hybrid keeps its key layout and dtypes.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="A .safetensors file, or a folder (diffusers model folder).")],
    norm_from: Annotated[Side, typer.Option(help="Which checkpoint gives the row norms.")] = Side.teacher,
    direction_from: Annotated[Side, typer.Option(help="Which checkpoint gives the row directions.")] = Side.student,
    component: Annotated[Optional[str], typer.Option(help="Pipeline component folder.")] = None,
    variant: Annotated[Optional[str], typer.Option(help="diffusers weight variant.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder a swap did not write.")] = False,
) -> None:
    """Write a hybrid checkpoint: row norms from one side, row directions from the other (WaDi Fig 1c)."""
    from .swap import swap as run_swap

    result = run_swap(teacher, student, out, norm_from=norm_from.value, direction_from=direction_from.value,
                      component=component, variant=variant, overwrite=overwrite)
    console.print(terminal_safe(f"wrote {result.path}: {result.hybrid_tensors} hybrid weights (norm from "
                                f"{norm_from.value}, direction from {direction_from.value}), "
                                f"{result.copied_tensors} tensors copied"), markup=False)


@app.command()
def plan(
    comparison: Annotated[Path, typer.Argument(help="Output folder of `compare` (layers.csv, summary.json); "
                                                    "run compare with --spectrum --lorad-fit for the best plan.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan JSON to write.")],
    budget: Annotated[float, typer.Option(min=0.0, help="Trainable parameters: a fraction of the model (0.1) or a count.")] = 0.1,
    preset: Annotated[Optional[str], typer.Option(help="Write a published placement instead (sd-unet-generator, ...).")] = None,
    max_rank: Annotated[int, typer.Option(min=1)] = 256,
    rank_multiple: Annotated[int, typer.Option(min=1)] = 8,
    kind: Annotated[Optional[list[str]], typer.Option("--kind", "-k", help="Module kinds to adapt (default linear and conv).")] = None,
) -> None:
    """Turn a comparison into LoRaD targets and per-layer ranks under a parameter budget."""
    from .plan import make_plan

    result = make_plan(comparison, out, budget=budget, preset=preset, max_rank=max_rank,
                       rank_multiple=rank_multiple, kinds=tuple(kind or ("linear", "conv")))
    console.print(f"{result['method']}: {len(result['targets'])} modules, {result['trainable_params']:,} trainable "
                  f"parameters (budget {result['budget_params']:,}; the findings plan uses "
                  f"{result['findings_plan_params']:,}); wrote {terminal_safe(out)}", markup=False)


@app.command("report")
def report_command(
    comparison: Annotated[Path, typer.Argument(help="Folder written by `compare --out` (layers.csv, summary.json).")],
    swaps: Annotated[Optional[Path], typer.Option(help="CSV of swap results: a `hybrid` column and metric columns "
                                                       "(default: COMPARISON/swaps.csv if present).")] = None,
    html: Annotated[bool, typer.Option("--html/--no-html")] = True,
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf")] = True,
) -> None:
    """Write report.html (self-contained, sortable/filterable table) and report.pdf from a comparison."""
    from .report import report_comparison

    paths = report_comparison(comparison, swaps, html=html, pdf=pdf)
    for path in paths.values():
        console.print(terminal_safe(f"wrote {path}"), markup=False)


@app.command()
def info(
    checkpoint: Annotated[Path, typer.Argument(help="Any supported checkpoint.")],
    component: Annotated[Optional[str], typer.Option(help="Pipeline component folder.")] = None,
    variant: Annotated[Optional[str], typer.Option(help="diffusers weight variant.")] = None,
) -> None:
    """Describe a checkpoint from its headers: format, layout, tensors, parameters, dtypes."""
    from .compare import describe_checkpoint

    for key, value in describe_checkpoint(checkpoint, component=component, variant=variant).items():
        console.print(terminal_safe(f"{key}: {value}"), markup=False)


@app.command("example-pair")
def example_pair(
    out: Annotated[Path, typer.Argument(help="Folder for teacher/, student/ and planted.csv.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT folder that is not an example pair.")] = False,
) -> None:
    """Write a tiny SD1.5-layout teacher/student pair with known, planted row rotations and rescalings."""
    from .examples import make_example_pair

    paths = make_example_pair(out, seed=seed, overwrite=overwrite)
    console.print(terminal_safe(f"wrote {paths['teacher']}, {paths['student']} and {paths['planted']}"), markup=False)


def main() -> None:
    cli_boundary.main(app)


if __name__ == "__main__":
    main()
