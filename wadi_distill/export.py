"""From a run to deployable files: the merged one-step denoiser as a plain diffusers folder, the same
as one ``.safetensors`` file, and the adapter-only file (LoRaD, LoRA and DoRA runs).

What a run folder and an export hold is :mod:`wadi_distill.runs`'s to say; this module only writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from . import adapters
from .distill import GENERATOR
from .runs import OneStepModel, load_run_generator, write_one_step_info


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> dict[str, Path]:
    """Merge the run's generator into its teacher's denoiser and write ``out`` (a diffusers model folder) +
    ``out/one_step.safetensors`` (merged single file) + ``out/generator_adapter.safetensors`` (adapter runs)."""
    generator = load_run_generator(run_dir, ema=ema, text=False)
    model = generator.generator
    if generator.adapter_file is not None:
        model = adapters.merge_and_unload(model, GENERATOR)
    return _write(model, generator, Path(out))


def _write(merged: nn.Module, generator: OneStepModel, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / "one_step.safetensors")
    paths = {"model": out, "single_file": out / "one_step.safetensors"}
    if generator.adapter_file is not None:
        paths["adapter"] = out / "generator_adapter.safetensors"
        shutil.copyfile(generator.adapter_file, paths["adapter"])
    write_one_step_info(out, generator.teacher, generator.config)
    return paths
