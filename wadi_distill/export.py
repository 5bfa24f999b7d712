"""From a run to deployable files: the merged one-step denoiser as a plain diffusers folder, the same
as one ``.safetensors`` file, and the adapter-only file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from wadi_analysis.atomic import atomic_write_text

from . import lorad
from .backbones import load_denoiser, load_teacher


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> dict[str, Path]:
    """Merge the run's generator adapter into its teacher's denoiser and write ``out`` (a diffusers model
    folder) + ``out/one_step.safetensors`` (merged single file) + ``out/generator_adapter.safetensors``."""
    run_dir, out = Path(run_dir), Path(out)
    config = json.loads((run_dir / "config.json").read_text())
    full = run_dir / ("generator_model_ema" if ema else "generator_model")
    if config["adapter"] == "full":
        return _export_full(run_dir, full, out, config)
    adapter_file = run_dir / ("generator_adapter_ema.safetensors" if ema else "generator_adapter.safetensors")
    if not adapter_file.is_file():
        raise ValueError(f"{run_dir} has no {adapter_file.name} (unfinished run, a non-LoRaD adapter, or no EMA)")
    teacher = load_teacher(config["teacher"], text=False)
    model = teacher.denoiser
    name = lorad.load_adapter(model, adapter_file)
    merged = lorad.merge_and_unload(model, name)
    return _write(merged, teacher, config, out, adapter_file)


def _export_full(run_dir: Path, folder: Path, out: Path, config: dict) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"{run_dir} has no {folder.name} (unfinished run, or no EMA)")
    return _write(load_denoiser(folder), load_teacher(config["teacher"], text=False), config, out, None)


def _write(merged, teacher, config: dict, out: Path, adapter_file: Path | None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out / "one_step.safetensors")
    if adapter_file is not None:
        shutil.copyfile(adapter_file, out / "generator_adapter.safetensors")
    one_step = {"prediction_type": teacher.prediction_type, "timestep": teacher.num_timesteps - 1,
                "alpha_T": config["vsd"]["alpha_T"] if config["vsd"]["alpha_T"] is not None
                else float(teacher.alphas_cumprod[-1]), "teacher": config["teacher"]}
    atomic_write_text(out / "wadi_one_step.json", json.dumps(one_step, indent=2) + "\n")
    paths = {"model": out, "single_file": out / "one_step.safetensors"}
    if adapter_file is not None:
        paths["adapter"] = out / "generator_adapter.safetensors"
    return paths
