"""Helpers shared by the distillation-run tests: a tiny SD teacher with prompts, short run configs, and
the generator exactly as training left it (read back from the last checkpoint, not from the files that
``export`` and ``sample`` read), to check those against."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.support.pipelines import tiny_sd_pipeline
from wadi_distill import adapters
from wadi_distill.teacher import Teacher, load_teacher
from wadi_distill.config import RunConfig, load_config
from wadi_distill.distill import GENERATOR, one_step
from wadi_distill.distill import attach_roles


def sd_teacher_with_prompts(root: Path) -> tuple[Path, Path]:
    """(tiny SD pipeline folder, prompt file) under ``root``."""
    (root / "prompts.txt").write_text("a photo of a sneaker\na photo of a bag\n\na photo of a shirt\n")
    return tiny_sd_pipeline(root / "pipe"), root / "prompts.txt"


def config_for(pipeline: tuple[Path, Path], out: Path, **overrides) -> RunConfig:
    """A short run (4 steps, tiny ranks) on ``pipeline``; the embedding cache is shared by the module's runs."""
    folder, prompts = pipeline
    values = dict(teacher=str(folder), prompts=str(prompts), out=str(out), steps=4, batch_size=2,
                  cache_dir=str(prompts.parent / "embedding-cache"),
                  generator_rank=4, fake_rank=2, checkpoint_every=2, validate_every=4, keep_checkpoints=5)
    values.update(overrides)
    return load_config(**values)


def trained_generator(config: RunConfig) -> tuple[Teacher, torch.nn.Module]:
    """(teacher, generator) with the generator's weights from the run's last checkpoint, attached the way
    training attaches them; independent of the adapter files and the export."""
    teacher = load_teacher(config.teacher, config=config.teacher_config)
    roles, _ = attach_roles(teacher, config)
    last = max((Path(config.out) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    named = roles.named_parameters(GENERATOR)
    with torch.no_grad():
        for name, tensor in load_file(last / "generator.safetensors").items():
            named[name].copy_(tensor)
    adapters.activate(roles.base, GENERATOR)
    return teacher, roles.generator.eval()


def one_step_inputs(teacher: Teacher) -> tuple[torch.Tensor, object]:
    """Fixed noise and conditioning for comparing one-step outputs."""
    noise = torch.randn(2, teacher.latent_channels, teacher.sample_size, teacher.sample_size,
                        generator=torch.Generator().manual_seed(0))
    return noise, teacher.encode(["a photo of a bag", "x"])


@torch.no_grad()
def x0_from_epsilon(teacher: Teacher, noise: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """The one-step sample from a plain U-Net's ε at the last timestep (what a user of the export computes)."""
    a = teacher.alpha_bar(torch.full((noise.shape[0],), teacher.num_timesteps - 1), noise)
    return (noise - (1 - a).sqrt() * epsilon) / a.sqrt()


@torch.no_grad()
def reference_one_step(config: RunConfig) -> tuple[Teacher, torch.Tensor, object, torch.Tensor]:
    """(teacher, noise, conditioning, one-step sample of the trained generator, unmerged)."""
    teacher, generator = trained_generator(config)
    noise, conditioning = one_step_inputs(teacher)
    return teacher, noise, conditioning, one_step(teacher, generator, noise, conditioning, config.vsd)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Equal to ``tolerance`` relative to the largest value of ``expected``."""
    scale = expected.abs().max().item()
    assert torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale), \
        (actual - expected).abs().max().item() / scale


def lora_export_files(run_dir, out, **settings) -> tuple[Path, dict, list[dict]]:
    """``export RUN --lora-*`` of ``run_dir`` into ``out``: (the lora folder, lora_report.json, lora_layers.csv rows)."""
    import csv

    from wadi_distill import lora_export
    from wadi_distill.export import export_run
    from wadi_distill.lora_export import LoRASettings

    folder = export_run(run_dir, out, lora=LoRASettings(**settings))["lora"]
    with open(folder / lora_export.LAYERS_CSV) as handle:
        rows = list(csv.DictReader(handle))
    return folder, lora_export.read_report(folder), rows
