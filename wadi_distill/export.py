"""From a run to deployable files: the merged one-step denoiser as a plain diffusers folder, the same
as one ``.safetensors`` file, and the adapter-only file (LoRaD, LoRA and DoRA runs).

A finished run holds its generator as ``generator_adapter.safetensors`` (adapter runs) or as the
``generator_model`` diffusers folder (full fine-tuning), with ``*_ema`` copies when it kept an EMA.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from wadi_analysis.atomic import atomic_write_text

from . import adapters
from .teacher import Teacher, load_denoiser, load_teacher
from .distill import GENERATOR

ONE_STEP_INFO = "wadi_one_step.json"


def generator_path(run_dir: Path, full: bool, ema: bool = False) -> Path:
    """Where a run keeps its trained generator: a diffusers folder (full fine-tuning) or an adapter file."""
    suffix = "_ema" if ema else ""
    return run_dir / (f"generator_model{suffix}" if full else f"generator_adapter{suffix}.safetensors")


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """The resolved configuration a run recorded (``RUN_DIR/config.json``)."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise ValueError(f"{run_dir} is not a run folder (config.json missing)") from None
    except ValueError:
        raise ValueError(f"{path} is not readable JSON") from None


def run_teacher(config: dict, text: bool = True) -> Teacher:
    """The teacher a run (or an export, whose ``wadi_one_step.json`` records the same keys) was made from."""
    return load_teacher(config["teacher"], config=config.get("teacher_config"), text=text)


@dataclass
class RunGenerator:
    """A run's generator before merging: ``model`` is the teacher's denoiser with the generator adapter
    attached and active, or (full fine-tuning) the trained copy; ``adapter_file`` is None for the latter."""

    teacher: Teacher
    model: nn.Module
    config: dict
    adapter_file: Path | None


def load_run_generator(run_dir: str | os.PathLike, ema: bool = False, text: bool = True) -> RunGenerator:
    """The generator of a finished run, unmerged (LoRaD, LoRA, DoRA) or as trained (full)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    full = config["adapter"] == "full"
    path = generator_path(run_dir, full, ema)
    if not path.exists():
        raise ValueError(f"{run_dir} has no {path.name} (unfinished run{', or no EMA' if ema else ''})")
    teacher = run_teacher(config, text=text)
    if full:
        return RunGenerator(teacher, load_denoiser(path), config, None)
    adapters.load_adapter(teacher.denoiser, path, GENERATOR)
    adapters.activate(teacher.denoiser, GENERATOR)
    return RunGenerator(teacher, teacher.denoiser, config, path)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> dict[str, Path]:
    """Merge the run's generator into its teacher's denoiser and write ``out`` (a diffusers model folder) +
    ``out/one_step.safetensors`` (merged single file) + ``out/generator_adapter.safetensors`` (adapter runs)."""
    generator = load_run_generator(run_dir, ema=ema, text=False)
    model = generator.model
    if generator.adapter_file is not None:
        model = adapters.merge_and_unload(model, GENERATOR)
    return _write(model, generator, Path(out))


def _write(merged: nn.Module, generator: RunGenerator, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / "one_step.safetensors")
    paths = {"model": out, "single_file": out / "one_step.safetensors"}
    if generator.adapter_file is not None:
        paths["adapter"] = out / "generator_adapter.safetensors"
        shutil.copyfile(generator.adapter_file, paths["adapter"])
    teacher, config = generator.teacher, generator.config
    alpha_T = config["vsd"]["alpha_T"]
    one_step = {"prediction_type": teacher.prediction_type, "timestep": teacher.num_timesteps - 1,
                "alpha_T": float(teacher.alphas_cumprod[-1]) if alpha_T is None else alpha_T,
                "teacher": config["teacher"], "teacher_config": config.get("teacher_config")}
    atomic_write_text(out / ONE_STEP_INFO, json.dumps(one_step, indent=2) + "\n")
    return paths
