"""The run-folder format, and the one place that tells a teacher, a run and an export apart.

A run folder (``wadi-distill run --out RUN``)::

    RUN/config.json                                 the resolved RunConfig (what the run did)
    RUN/checkpoints/step-NNNNNNN/                   adapters, optimisers, RNG states, step
                                                    (written and read by training.checkpoint)
    RUN/generator_adapter[_ema].safetensors         the trained generator (LoRaD, LoRA, DoRA), or
    RUN/generator_model[_ema]/                      a diffusers model folder (full fine-tuning)
    RUN/metrics.csv, RUN/samples/step-NNNNNNN.png   losses per step, one-step validation grids
    RUN/tensorboard/                                when tensorboard is installed

An export (``wadi-distill export RUN --out EXPORT``) is a diffusers model folder of the merged
one-step denoiser plus ``one_step.safetensors``, the adapter file, and ``wadi_one_step.json`` (how to
run it in one step, and from which teacher). A teacher is a diffusers pipeline folder.

:func:`load_one_step` returns the one-step model of a run or an export as a :class:`OneStepModel`:
the teacher bundle, the generator network and the VSD settings, side by side.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from wadi_analysis.atomic import atomic_write_text
from wadi_analysis.errors import UserError

from . import adapters
from .distill import GENERATOR
from .teacher import Teacher, load_denoiser, load_teacher
from .vsd import VSDConfig

CONFIG = "config.json"
ONE_STEP_INFO = "wadi_one_step.json"
TEACHER, RUN, EXPORT = "teacher", "run", "export"


class RunFolder:
    """Paths and readers of one run folder; the only code that knows its file names."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoint_root / f"step-{step:07d}"

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary ``.step-*.tmp`` folders are not)."""
        return sorted(self.checkpoint_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))

    def grid(self, step: int) -> Path:
        return self.path / "samples" / f"step-{step:07d}.png"

    def digests(self, rank: int, what: str) -> Path:
        """Per-process hashes a run records with ``record_digests`` (``what``: adapter or base)."""
        return self.path / f"{what}-digests-rank{rank}.txt"

    def generator(self, full: bool, ema: bool = False) -> Path:
        """Where the trained generator is: a diffusers folder (full fine-tuning) or an adapter file."""
        suffix = "_ema" if ema else ""
        return self.path / (f"generator_model{suffix}" if full else f"generator_adapter{suffix}.safetensors")

    def read_config(self) -> dict:
        """The resolved configuration the run recorded."""
        try:
            return json.loads(self.config_file.read_text())
        except OSError:
            raise UserError(f"{self.path} is not a run folder ({CONFIG} missing)") from None
        except ValueError:
            raise UserError(f"{self.config_file} is not readable JSON") from None


def source_kind(source: str | os.PathLike) -> str:
    """``teacher`` (a diffusers pipeline folder), ``run`` (a run folder) or ``export`` (an exported
    one-step model); anything else is a :class:`UserError`."""
    source = Path(source)
    if (source / CONFIG).is_file() and (source / "checkpoints").is_dir():
        return RUN
    if (source / ONE_STEP_INFO).is_file():
        return EXPORT
    if (source / "model_index.json").is_file():
        return TEACHER
    if not source.exists():
        raise UserError(f"{source} does not exist")
    raise UserError(f"{source} is neither a run folder, an exported one-step model ({ONE_STEP_INFO}) "
                    "nor a teacher pipeline (model_index.json)")


def run_teacher(config: dict, text: bool = True) -> Teacher:
    """The teacher a run (or an export, whose ``wadi_one_step.json`` records the same keys) was made from."""
    return load_teacher(config["teacher"], config=config.get("teacher_config"), text=text)


@dataclass
class OneStepModel:
    """A one-step generator beside the teacher it was distilled from.

    ``generator`` is the network to call in one step: for adapter runs the teacher's own denoiser with
    the generator adapter attached and active (one shared base), for full fine-tuning the trained copy,
    for an export the merged denoiser. ``adapter_file`` is the run's adapter file (None otherwise)."""

    teacher: Teacher
    generator: nn.Module
    vsd: VSDConfig
    config: dict
    adapter_file: Path | None = None


def load_run_generator(run_dir: str | os.PathLike, ema: bool = False, text: bool = True) -> OneStepModel:
    """The generator of a finished run, unmerged (LoRaD, LoRA, DoRA) or as trained (full)."""
    run = RunFolder(run_dir)
    config = run.read_config()
    full = config["adapter"] == "full"
    path = run.generator(full, ema)
    if not path.exists():
        raise UserError(f"{run.path} has no {path.name} (unfinished run{', or no EMA' if ema else ''})")
    teacher = run_teacher(config, text=text)
    vsd = VSDConfig(**config["vsd"])
    if full:
        return OneStepModel(teacher, load_denoiser(path), vsd, config)
    adapters.load_adapter(teacher.denoiser, path, GENERATOR)
    adapters.activate(teacher.denoiser, GENERATOR)
    return OneStepModel(teacher, teacher.denoiser, vsd, config, path)


def write_one_step_info(out: Path, teacher: Teacher, config: dict) -> Path:
    """``wadi_one_step.json`` of an export: the parametrisation, the timestep and a_T of the one step,
    and the teacher it came from (its prompt encoder and VAE are the export's)."""
    alpha_T = config["vsd"]["alpha_T"]
    info = {"prediction_type": teacher.prediction_type, "timestep": teacher.num_timesteps - 1,
            "alpha_T": float(teacher.alphas_cumprod[-1]) if alpha_T is None else alpha_T,
            "teacher": config["teacher"], "teacher_config": config.get("teacher_config")}
    return atomic_write_text(out / ONE_STEP_INFO, json.dumps(info, indent=2) + "\n")


def load_export(path: str | os.PathLike) -> OneStepModel:
    """An exported one-step model: the merged denoiser, with its teacher's text encoder and VAE."""
    path = Path(path)
    try:
        info = json.loads((path / ONE_STEP_INFO).read_text())
    except (OSError, ValueError):
        raise UserError(f"{path / ONE_STEP_INFO} is not readable JSON") from None
    return OneStepModel(run_teacher(info), load_denoiser(path), VSDConfig(alpha_T=info["alpha_T"]), info)


def load_one_step(source: str | os.PathLike) -> OneStepModel:
    """The one-step model of a run (the adapter unmerged) or of an export (merged)."""
    kind = source_kind(source) if Path(source).exists() else None
    if kind not in (RUN, EXPORT):
        raise UserError(f"{source} is neither a run folder nor an exported one-step model ({ONE_STEP_INFO})")
    return load_run_generator(source) if kind == RUN else load_export(source)


def load_sampler(source: str | os.PathLike) -> tuple[Teacher, nn.Module, VSDConfig | None]:
    """What to sample from ``source``: (teacher, network, VSD settings) for a run or an export (one
    step), (teacher, its denoiser, None) for a teacher pipeline (multi-step)."""
    if source_kind(source) == TEACHER:
        teacher = load_teacher(source)
        return teacher, teacher.denoiser, None
    model = load_one_step(source)
    return model.teacher, model.generator, model.vsd
