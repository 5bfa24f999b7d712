"""From a run to deployable files: a complete one-step diffusers pipeline (the teacher's parts, the merged
denoiser, the one-step scheduler of :mod:`wadi_distill.one_step_pipeline`), which is also the merged
denoiser's model folder, the same weights as one ``.safetensors`` file, and the adapter-only file (LoRaD,
LoRA and DoRA runs).

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
from .one_step_pipeline import one_step_scheduler, write_pipeline
from .runs import (OneStepModel, check_output_for, is_export, load_run_generator, one_step_alpha,
                   write_one_step_info)

SINGLE_FILE = "one_step.safetensors"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, ema: bool = False,
               overwrite: bool = False) -> dict[str, Path]:
    """Merge the run's generator into its teacher's denoiser and write ``out``: a diffusers pipeline folder
    that runs it in one step and, as before, a model folder of the merged denoiser; ``out/one_step.safetensors``
    (merged single file); ``out/generator_adapter.safetensors`` (adapter runs). Returns {pipeline, model (the
    denoiser's folder inside the pipeline), single_file[, adapter]: path}.

    ``out`` follows the output policy (:func:`wadi_distill.runs.check_output_for`): apart from the
    teacher and the run's own files, and an existing non-empty folder only if it is an earlier export
    (or ``overwrite``); it is written beside its place and renamed there when complete. A run whose a_T no
    scheduler of its teacher can end at is refused before anything is written."""
    out = check_output_for(run_dir, out, ours=is_export, overwrite=overwrite)
    generator = load_run_generator(run_dir, ema=ema)  # with the text encoders: they are the pipeline's
    model = generator.generator
    if generator.adapter_file is not None:
        model = adapters.merge_and_unload(model, GENERATOR)
    adapters.check_finite(model, generator.adapter_file or run_dir)
    teacher = generator.teacher
    scheduler = one_step_scheduler(teacher.pipeline.scheduler.config, one_step_alpha(teacher, generator.config))
    with staged_folder(out) as stage:
        names = _write(model, generator, scheduler, stage)
    return {label: out / name if name else out for label, name in names.items()}


def _write(merged: nn.Module, generator: OneStepModel, scheduler, out: Path) -> dict[str, str]:
    pipeline = write_pipeline(generator.teacher, merged, scheduler, out)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / SINGLE_FILE)
    names = {"pipeline": "", "model": generator.teacher.component, "single_file": SINGLE_FILE}
    if generator.adapter_file is not None:
        names["adapter"] = "generator_adapter.safetensors"
        shutil.copyfile(generator.adapter_file, out / names["adapter"])
    write_one_step_info(out, generator.teacher, generator.config, pipeline)
    return names
