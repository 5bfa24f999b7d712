"""The published WaDi weights as a complete one-step pipeline (``wadi-distill import-published``).

The released files (``rotated_unet-sdv1-5.safetensors``, ``rotated_unet-sdv2-1.safetensors``,
``rotated_transformer.safetensors``) each hold the merged denoiser, the whole U-Net or PixArt transformer, under
plain diffusers state-dict keys; the published inference loads them into the teacher's denoiser with
``strict=True`` and runs one conditional pass at t = 999 with a_T = 0.0047. :func:`import_published` holds a file
to the same contract (every key of the teacher's denoiser, each of its shape, nothing else; read with the
project's validating safetensors reader, never a pickle) and writes what ``wadi-distill export`` writes
(:func:`wadi_distill.export.write_folder`): the teacher's pipeline with that denoiser and the one-step scheduler
ending at a_T (:mod:`wadi_distill.one_step_pipeline`; on PixArt's schedule, whose own a falls below 0.0047 at
t = 727, the schedule is held at a_T from there, as for any export), ``one_step.safetensors`` and ``wadi_one_step.json``
with a_T, the teacher by name and the file's name and SHA-256. ``sample`` and ``evaluate`` read the result as
any export.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from wadi_analysis.checkpoint import PICKLE_SUFFIXES, CheckpointError, SafetensorsFile
from wadi_analysis.errors import UserError
from wadi_analysis.outputs import staged_folder

from .adapters import check_finite
from .export import write_folder
from .one_step_pipeline import one_step_scheduler
from .runs import TEACHER, OneStepModel, check_output_for, is_export, source_kind
from .teacher import load_teacher
from .vsd import VSDConfig

PUBLISHED_ALPHA_T = 0.0047  # the published inference's a_T, for SD and PixArt alike
PUBLISHED_INFERENCE = f"one conditional pass (no guidance) at t = 999 with a_T = {PUBLISHED_ALPHA_T}"
COMPONENTS = ("unet", "transformer")
SHOWN_KEYS = 3  # offending keys an error names
_PICKLE_MAGIC = (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def import_published(file: str | os.PathLike, teacher: str | os.PathLike, out: str | os.PathLike, *,
                     alpha_T: float = PUBLISHED_ALPHA_T, component: str | None = None,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write ``out``, the one-step pipeline of the released merged denoiser ``file`` on the teacher pipeline
    folder ``teacher``, one step from pure noise at t = T - 1 with ``alpha_T``. Returns {pipeline, model,
    single_file: path}. Everything is checked before anything is written (``out`` follows the output policy:
    an existing non-empty folder only if it is an export, or ``overwrite``)."""
    file, alpha_T = Path(file), check_alpha_T(alpha_T)
    if component is not None and component not in COMPONENTS:
        raise UserError(f"--component must be one of {', '.join(COMPONENTS)} (got {component!r})")
    if source_kind(teacher) != TEACHER:
        raise UserError(f"{teacher} is not a teacher pipeline folder (a run or an export holds no teacher schedule)")
    out = check_output_for(teacher, out, ours=is_export, inputs=(file,), overwrite=overwrite)
    open_released(file).close()  # a pickle or a broken header is refused before the teacher is read
    bundle = load_teacher(teacher)
    if component is not None and component != bundle.component:
        raise UserError(f"{teacher}'s denoiser is its {bundle.component}, not a {component}")
    source = load_released(file, bundle.denoiser, bundle.component)
    check_finite(bundle.denoiser, file)
    scheduler = one_step_scheduler(bundle.pipeline.scheduler.config, alpha_T)
    config = {"teacher": os.fspath(teacher), "teacher_config": None, "vsd": {"alpha_T": alpha_T}}
    model = OneStepModel(bundle, bundle.denoiser, VSDConfig(alpha_T=alpha_T), config)
    with staged_folder(out) as stage:
        names = write_folder(bundle.denoiser, model, scheduler, stage, source)
    return {label: out / name if name else out for label, name in names.items()}


def check_alpha_T(alpha_T: float) -> float:
    """a_T is a number strictly between 0 and 1."""
    if isinstance(alpha_T, bool) or not isinstance(alpha_T, (int, float)) or not math.isfinite(alpha_T) \
            or not 0 < alpha_T < 1:
        raise UserError(f"--alpha-t must be a number between 0 and 1 (exclusive), got {alpha_T!r}")
    return float(alpha_T)


def open_released(file: Path) -> SafetensorsFile:
    """``file`` as a safetensors file (header validated, data memory-mapped). A pickle (``.bin``, ``.pt``,
    ``.ckpt``, zip) is refused without being read: the weights were released as safetensors."""
    if not file.is_file():
        raise UserError(f"{file} is not a file" if file.exists() else f"{file} does not exist")
    try:
        with open(file, "rb") as handle:
            magic = handle.read(2)
    except OSError as exc:
        raise UserError(f"cannot read {file}: {exc.strerror or exc}") from None
    if file.name.endswith(PICKLE_SUFFIXES) or magic in _PICKLE_MAGIC:
        raise UserError(f"{file} is a torch pickle, not a safetensors file; the WaDi weights are released as "
                        "safetensors, and pickles are not read here")
    return SafetensorsFile(file)


def load_released(file: str | os.PathLike, denoiser: nn.Module, component: str) -> dict:
    """Read ``file`` into ``denoiser`` as the published code does (``load_state_dict(strict=True)``), after checking
    key for key that it fits: a :class:`CheckpointError` naming the first offending keys otherwise (the
    denoiser is then untouched). The weights take the denoiser's dtype. Returns the file's provenance."""
    file = Path(file)
    source = open_released(file)
    try:
        expected = {name: (tuple(t.shape), t.is_floating_point()) for name, t in denoiser.state_dict().items()}
        problems = fit_problems(source, expected)
        if problems:
            raise CheckpointError(f"{file} does not fit the teacher's {component} ({type(denoiser).__name__}) "
                                  f"key for key, as the published code loads it (strict): {'; '.join(problems)}")
        dtypes = sorted({str(source.info(name).dtype).removeprefix("torch.") for name in expected})
        with torch.no_grad():
            denoiser.load_state_dict({name: source.tensor(name) for name in expected}, strict=True)
    finally:
        source.close()
    return {"kind": "published WaDi weights", "file": file.name, "sha256": sha256(file), "dtype": ",".join(dtypes),
            "published_inference": PUBLISHED_INFERENCE}


def fit_problems(source: SafetensorsFile, expected: dict[str, tuple[tuple[int, ...], bool]]) -> list[str]:
    """What keeps ``source`` from loading strictly into a state dict of ``expected`` {name: (shape, floating)}:
    missing keys, extra keys, other shapes, integer tensors where weights are floating; each with its first keys."""
    names = set(source.names())
    missing = [name for name in expected if name not in names]
    extra = sorted(names - expected.keys())
    shapes, kinds = [], []
    for name, (shape, floating) in expected.items():
        if name in names:
            info = source.info(name)
            if info.shape != shape:
                shapes.append(f"{name} ({_shape(info.shape)} in the file, {_shape(shape)} in the teacher)")
            elif floating and not info.dtype.is_floating_point:
                kinds.append(f"{name} ({str(info.dtype).removeprefix('torch.')})")
    found = [(f"{len(missing)} missing", missing), (f"{len(extra)} extra", extra),
             (f"{len(shapes)} of another shape", shapes), (f"{len(kinds)} not floating-point", kinds)]
    return [f"{label}: {_first(keys)}" for label, keys in found if keys]


def _first(keys: list[str]) -> str:
    shown = ", ".join(key[:120] for key in keys[:SHOWN_KEYS])
    return shown + (f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def sha256(path: Path) -> str:
    """The file's SHA-256, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
