"""``wadi-distill``: thin typer commands over the library (distillation itself lands with issue 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from wadi_analysis.cli import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRaD adapters and one-step VSD distillation (WaDi, CVPR 2026).")
console = Console()


@app.command("adapter-info")
def adapter_info(adapter: Annotated[Path, typer.Argument(help="A LoRaD adapter .safetensors file.")]) -> None:
    """Show an adapter file's metadata: name, ranks, targets, pairing, base dtype and fingerprint."""
    from .lorad import AdapterFileError, read_adapter

    try:
        tensors, metadata = read_adapter(adapter)
    except AdapterFileError as exc:
        fail(str(exc))
    ranks = json.loads(metadata["ranks"])
    console.print(f"adapter {metadata['adapter_name']!r}: {len(ranks)} modules, ranks {sorted(set(ranks.values()))}, "
                  f"{sum(t.numel() for t in tensors.values()):,} parameters", markup=False)
    for key in ("pairing", "base_dtype", "base_fingerprint"):
        console.print(f"{key}: {metadata[key]}", markup=False)


@app.command()
def merge(
    base: Annotated[Path, typer.Argument(help="diffusers model or pipeline folder the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="LoRaD adapter .safetensors file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged diffusers model.")],
    component: Annotated[Optional[str], typer.Option(help="Pipeline component (default unet or transformer).")] = None,
    ignore_fingerprint: Annotated[bool, typer.Option(help="Merge even if the base weights differ from training.")] = False,
) -> None:
    """Bake a LoRaD adapter into its base model and save a plain diffusers model folder."""
    from wadi_analysis.checkpoint import CheckpointError

    from .backbones import load_denoiser
    from .lorad import AdapterFileError, load_adapter, merge_and_unload

    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty")
    try:
        model = load_denoiser(base, component)
        name = load_adapter(model, adapter, strict_base=not ignore_fingerprint)
    except (CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    merge_and_unload(model, name).save_pretrained(out)
    console.print(f"merged adapter {name!r} into {out}", markup=False)


@app.command()
def run(
    teacher: Annotated[Optional[str], typer.Option(help="diffusers pipeline folder of the teacher.")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file: .txt (one a line), .jsonl or .csv.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    adapter: Annotated[Optional[str], typer.Option(help="lorad | lora | dora")] = None,
    plan: Annotated[Optional[str], typer.Option(help="Generator placement plan JSON (wadi-analyze plan).")] = None,
    generator_rank: Annotated[Optional[int], typer.Option(min=1)] = None,
    fake_rank: Annotated[Optional[int], typer.Option(min=1)] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file with any of these options (and a [vsd] table).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint folder.")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(help="no | fp16 | bf16")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Distil a teacher into a one-step generator with WaDi (VSD + LoRaD on one shared frozen base)."""
    from wadi_analysis.checkpoint import CheckpointError

    from .config import load_config
    from .lorad import AdapterFileError
    from .train import TrainingError, train

    try:
        resolved = load_config(config, teacher=teacher, prompts=prompts, out=out, steps=steps, batch_size=batch_size,
                               adapter=adapter, plan=plan, generator_rank=generator_rank, fake_rank=fake_rank,
                               seed=seed, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing)
        if not resolved.teacher or not resolved.prompts:
            fail("give --teacher PIPELINE_FOLDER and --prompts FILE (or set them in --config)")
        summary = train(resolved, resume=resume, progress=not quiet)
    except (ValueError, TrainingError, CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or resolved.out}: {exc.strerror or exc}")
    console.print(f"{summary['steps']} steps, trainable {summary['trainable']}, skipped {summary['skipped']}; "
                  f"run in {summary['run_dir']}", markup=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged one-step model.")],
    ema: Annotated[bool, typer.Option("--ema", help="Export the EMA of the generator adapter (runs with ema_decay).")] = False,
) -> None:
    """Write the merged one-step denoiser (diffusers folder + single .safetensors) and the adapter file."""
    from wadi_analysis.checkpoint import CheckpointError

    from .export import export_run
    from .lorad import AdapterFileError

    if not (run_dir / "config.json").is_file():
        fail(f"{run_dir} is not a run folder (config.json missing)")
    try:
        paths = export_run(run_dir, out, ema=ema)
    except (ValueError, CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    for label, path in paths.items():
        console.print(f"{label}: {path}", markup=False)


@app.command("sample")
def sample_command(
    source: Annotated[Path, typer.Argument(help="A run folder or an exported one-step model folder.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files and grid.png.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """One-step images (PNG files + grid) from a run or an exported model."""
    from wadi_analysis.checkpoint import CheckpointError

    from .lorad import AdapterFileError
    from .sample import sample

    try:
        paths = sample(source, prompt, n, out, seed=seed)
    except (ValueError, CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    console.print(f"wrote {len(paths) - 1} images and {paths[-1]}", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
