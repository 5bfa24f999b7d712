"""Swap hybrids (WaDi Fig 1c): rows built from the norm of one checkpoint and the direction of another.

For every weight with >= 2 dims present in both checkpoints, row j of the hybrid is

    w_j = n_j(norm source) * v_j(direction source),   v = w / ||w||

("norm from teacher": n_t,j * v_s,j; "direction from teacher": n_s,j * v_t,j). Everything else is the
student's tensor, unchanged. The file keeps the student's key layout and dtypes (an original LDM
student stays LDM-keyed), is streamed one tensor at a time and written atomically.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import probe_writable
from .checkpoint import CheckpointError, CheckpointSource, SafetensorsFile, write_safetensors
from .decompose import rows
from .errors import InvalidValue
from .keymap import align
from .locate import WEIGHTS_STEM, model_folder, open_checkpoint
from .outputs import check_output, staged_folder

SIDES = ("teacher", "student")
WEIGHTS_FILE = f"{WEIGHTS_STEM}.safetensors"


def hybrid_rows(norm_source: torch.Tensor, direction_source: torch.Tensor) -> torch.Tensor:
    """Rows with the norms of ``norm_source`` and the directions of ``direction_source`` (float64 math,
    returned in ``direction_source``'s dtype). A zero direction row has no direction: it is kept as is."""
    norms = rows(norm_source).double().norm(dim=1, keepdim=True)
    direction = rows(direction_source).double()
    length = direction.norm(dim=1, keepdim=True)
    hybrid = torch.where(length > 0, direction / length.clamp_min(1e-300) * norms, direction)
    return hybrid.reshape(direction_source.shape).to(direction_source.dtype)


@dataclass
class SwapResult:
    path: Path
    hybrid_tensors: int
    copied_tensors: int


def swap_sources(teacher: CheckpointSource, student: CheckpointSource, out: str | os.PathLike, *,
                 norm_from: str = "teacher", direction_from: str = "student") -> SwapResult:
    """Write the hybrid of two opened sources to the safetensors file ``out``."""
    if norm_from not in SIDES or direction_from not in SIDES:
        raise InvalidValue("norm_from and direction_from must be 'teacher' or 'student'")
    alignment = align(teacher, student)
    swappable = {n for n in alignment.common if len(teacher.info(n).shape) >= 2 and teacher.info(n).numel > 0
                 and teacher.info(n).dtype.is_floating_point and student.info(n).dtype.is_floating_point}
    if not swappable:
        raise CheckpointError("no common weights with >= 2 dims: nothing to swap")
    if getattr(student.key_mapping, "rows", None):  # one stored tensor holds several diffusers weights
        raise CheckpointError(f"the student ({student.format}) fuses q, k, v in one stored weight; swap writes the "
                              f"student's own layout, so convert it to diffusers keys first")
    # Write in the student's own key layout: raw names, including keys outside the denoiser.
    stored = student.raw_source
    canonical = {student.raw_name(name): name for name in student.names()}
    sides = {"teacher": teacher, "student": student}

    def tensor_for(raw_name: str) -> torch.Tensor:
        name = canonical.get(raw_name)
        if name not in swappable:
            return stored.tensor(raw_name)
        norm_source = sides[norm_from].tensor(name).reshape(student.info(name).shape)
        direction_source = sides[direction_from].tensor(name).reshape(student.info(name).shape)
        hybrid = hybrid_rows(norm_source, direction_source).to(student.info(name).dtype)
        teacher.release(name)
        student.release(name)
        return hybrid

    infos = {raw: stored.info(raw) for raw in stored.names()}
    metadata = {"wadi_swap": f"norm from {norm_from}, direction from {direction_from}", "format": "pt"}
    path = write_safetensors(out, infos, tensor_for, metadata)
    hybrids = sum(canonical.get(raw) in swappable for raw in infos)
    return SwapResult(path, hybrids, len(infos) - hybrids)


def is_swap_folder(folder: Path) -> bool:
    """A folder :func:`swap` wrote: its weights say so in their metadata (so it may be replaced)."""
    weights = folder / WEIGHTS_FILE
    try:
        return weights.is_file() and "wadi_swap" in SafetensorsFile(weights).metadata
    except CheckpointError:
        return False


def swap(teacher, student, out: str | os.PathLike, *, norm_from: str = "teacher", direction_from: str = "student",
         component: str | None = None, variant: str | None = None, overwrite: bool = False) -> SwapResult:
    """Build a hybrid checkpoint. ``out`` ending in ``.safetensors`` gets a single file; any other path
    becomes a diffusers model folder (the student's ``config.json`` + weights) that ``from_pretrained`` loads.

    ``out`` follows :mod:`wadi_analysis.outputs`: never an input (nor inside or around one), checked
    before anything is written; a folder is staged and replaces ``out`` only when complete, and an
    existing non-empty folder only when a swap wrote it or ``overwrite`` is given."""
    out = Path(out)
    folder_output = not out.name.endswith(".safetensors")
    if norm_from not in SIDES or direction_from not in SIDES:
        raise InvalidValue("norm_from and direction_from must be 'teacher' or 'student'")
    with open_checkpoint(teacher, component=component, variant=variant) as t, \
            open_checkpoint(student, component=component, variant=variant) as s:
        check_output(out, [teacher, student, *t.files(), *s.files()], folder=folder_output,
                     replace=folder_output, overwrite=overwrite, ours=is_swap_folder)
        config = None
        if folder_output:
            try:
                config = model_folder(student, component) / "config.json"
            except CheckpointError:
                raise CheckpointError(f"{student} is not a diffusers model folder: give --out a .safetensors "
                                      f"file name") from None
        probe_writable(out)
        if not folder_output:
            out.parent.mkdir(parents=True, exist_ok=True)
            return swap_sources(t, s, out, norm_from=norm_from, direction_from=direction_from)
        with staged_folder(out) as stage:
            result = swap_sources(t, s, stage / WEIGHTS_FILE, norm_from=norm_from, direction_from=direction_from)
            shutil.copyfile(config, stage / "config.json")
        result.path = out
        return result
