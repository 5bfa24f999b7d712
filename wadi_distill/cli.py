"""``wadi-distill``: thin typer commands over the library (distillation itself lands with issue 5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRaD adapters and one-step VSD distillation (WaDi, CVPR 2026).")
console = Console()


def fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(2)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
