"""From a run to deployable files: a complete one-step diffusers pipeline (the teacher's parts, the merged
denoiser, the one-step scheduler of :mod:`wadi_distill.one_step_pipeline`), which is also the merged
denoiser's model folder, the same weights as one ``.safetensors`` file, the adapter-only file (LoRaD,
LoRA and DoRA runs) and, when asked, the merged change as LoRA files (:mod:`wadi_distill.lora_export`).

What a run folder and an export hold is :mod:`wadi_distill.runs`'s to say; this module only writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from wadi_analysis.outputs import staged_folder

from . import adapters, lora_export, lora_keys
from .distill import GENERATOR
from .one_step_pipeline import one_step_scheduler_for, write_pipeline
from .runs import (OneStepModel, check_output_for, is_export, load_run_generator, one_step_alpha,
                   write_one_step_info)

SINGLE_FILE = "one_step.safetensors"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, ema: bool = False,
               overwrite: bool = False, lora: lora_export.LoRASettings | None = None) -> dict[str, Path]:
    """Merge the run's generator into its teacher's denoiser and write ``out``: a diffusers pipeline folder
    that runs it in one step and, as before, a model folder of the merged denoiser; ``out/one_step.safetensors``
    (merged single file); ``out/generator_adapter.safetensors`` (adapter runs); with ``lora``, ``out/lora/``: the
    change W' - W of every changed Linear/Conv2d as a truncated-SVD LoRA (diffusers/peft and, for U-Nets, kohya
    files) with its per-layer and total error and the one-step output difference to the merged model. Returns
    {pipeline, model (the denoiser's folder inside the pipeline), single_file[, adapter][, lora]: path}.

    ``out`` follows the output policy (:func:`wadi_distill.runs.check_output_for`): apart from the
    teacher and the run's own files, and an existing non-empty folder only if it is an earlier export
    (or ``overwrite``); it is written beside its place and renamed there when complete. A run whose one step no
    scheduler of its teacher runs (an a_T outside the teacher's range; on a flow teacher, a [vsd] alpha_T of its
    own or dynamic shifting: :func:`wadi_distill.one_step_pipeline.one_step_scheduler_for`) is refused before
    anything is written."""
    out = check_output_for(run_dir, out, ours=is_export, overwrite=overwrite)
    generator = load_run_generator(run_dir, ema=ema)  # with the text encoders: they are the pipeline's
    model = generator.generator
    teacher = generator.teacher
    # before merging: a run whose one step no scheduler runs is refused, nothing written
    scheduler = one_step_scheduler_for(teacher, one_step_alpha(teacher, generator.config))
    adapter_run = generator.adapter_file is not None
    # before merging, which rewrites the adapted weights in place
    base = lora_export.teacher_weights(model if adapter_run else teacher.denoiser) if lora else None
    if adapter_run:
        model = adapters.merge_and_unload(model, GENERATOR)
    adapters.check_finite(model, generator.adapter_file or run_dir)
    made = _lora(model, generator, base, lora) if lora else None  # the SVDs and the output check, before writing
    with staged_folder(out) as stage:
        names = write_folder(model, generator, scheduler, stage)
        if made is not None:
            lora_export.write(stage / lora_export.LORA_FOLDER, *made)
            names["lora"] = lora_export.LORA_FOLDER
    return {label: out / name if name else out for label, name in names.items()}


def write_folder(merged: nn.Module, generator: OneStepModel, scheduler, out: Path,
                 source: dict | None = None) -> dict[str, str]:
    """The export's files in ``out`` (a staging folder): the pipeline, which is also the model folder, the single
    file, the adapter (adapter runs) and ``wadi_one_step.json`` (with ``source``, where the weights came from:
    :mod:`wadi_distill.published`). Returns {label: name inside ``out``}."""
    pipeline = write_pipeline(generator.teacher, merged, scheduler, out)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / SINGLE_FILE)
    names = {"pipeline": "", "model": generator.teacher.component, "single_file": SINGLE_FILE}
    if generator.adapter_file is not None:
        names["adapter"] = "generator_adapter.safetensors"
        shutil.copyfile(generator.adapter_file, out / names["adapter"])
    write_one_step_info(out, generator.teacher, generator.config, pipeline, source)
    return names


def _lora(merged: nn.Module, generator: OneStepModel, base: dict, settings: lora_export.LoRASettings) -> tuple:
    """(layers, family, component, denoiser, report) of the LoRA of ``merged``'s change from ``base``."""
    from wadi_analysis.errors import UserError

    layers = lora_export.build(base, merged, settings)
    if not layers:
        raise UserError("the run's generator changes no Linear or Conv2d weight of its teacher: no LoRA to write")
    teacher = generator.teacher
    outputs = lora_export.output_difference(teacher, merged, base, layers, generator.vsd,
                                            lora_export.check_prompts(generator.config))
    report = lora_export.report(layers, settings, lora_keys.file_names(teacher.family), outputs,
                                lora_export.other_changes(teacher.denoiser, merged, base))
    return layers, teacher.family, teacher.component, merged, report
