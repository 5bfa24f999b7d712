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

from wadi_analysis.outputs import staged_folder

from . import adapters
from .distill import GENERATOR
from .runs import OneStepModel, check_output_for, is_export, load_run_generator, write_one_step_info


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, ema: bool = False,
               overwrite: bool = False) -> dict[str, Path]:
    """Merge the run's generator into its teacher's denoiser and write ``out`` (a diffusers model folder) +
    ``out/one_step.safetensors`` (merged single file) + ``out/generator_adapter.safetensors`` (adapter runs).

    ``out`` follows the output policy (:func:`wadi_distill.runs.check_output_for`): apart from the
    teacher and the run's own files, and an existing non-empty folder only if it is an earlier export
    (or ``overwrite``); it is written beside its place and renamed there when complete."""
    out = check_output_for(run_dir, out, ours=is_export, overwrite=overwrite)
    generator = load_run_generator(run_dir, ema=ema, text=False)
    model = generator.generator
    if generator.adapter_file is not None:
        model = adapters.merge_and_unload(model, GENERATOR)
    adapters.check_finite(model, generator.adapter_file or run_dir)
    with staged_folder(out) as stage:
        names = _write(model, generator, stage)
    return {label: out / name if name else out for label, name in names.items()}


def _write(merged: nn.Module, generator: OneStepModel, out: Path) -> dict[str, str]:
    merged.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / "one_step.safetensors")
    names = {"model": "", "single_file": "one_step.safetensors"}
    if generator.adapter_file is not None:
        names["adapter"] = "generator_adapter.safetensors"
        shutil.copyfile(generator.adapter_file, out / names["adapter"])
    write_one_step_info(out, generator.teacher, generator.config)
    return names
