"""One-step images from a run folder or an exported one-step model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .teacher import load_denoiser
from .distill import VSDConfig, one_step
from .export import ONE_STEP_INFO, load_run_generator, run_teacher


def load_one_step(source: str | os.PathLike):
    """(teacher bundle whose denoiser is the one-step generator, VSD settings) from a run (LoRaD, LoRA,
    DoRA: the adapter unmerged; full fine-tuning: the trained copy) or from an export (merged)."""
    source = Path(source)
    if (source / "config.json").is_file() and (source / "checkpoints").is_dir():
        generator = load_run_generator(source)
        generator.teacher.denoiser = generator.model
        return generator.teacher, VSDConfig(**generator.config["vsd"])
    info_file = source / ONE_STEP_INFO
    if not info_file.is_file():
        raise ValueError(f"{source} is neither a run folder nor an exported one-step model ({ONE_STEP_INFO})")
    info = json.loads(info_file.read_text())
    teacher = run_teacher(info)
    teacher.denoiser = load_denoiser(source)
    return teacher, VSDConfig(alpha_T=info["alpha_T"])


@torch.no_grad()
def decode(teacher, latents: torch.Tensor):
    """Latents -> uint8 images (N, H, W, 3) with the teacher's VAE; a pixel-space teacher (no VAE, e.g.
    the embedded one) has its images as latents (grey ones are repeated to RGB)."""
    vae = teacher.pipeline.vae
    if vae is None:
        images = latents.float().expand(-1, 3, -1, -1) if latents.shape[1] == 1 else latents.float()
    else:
        images = vae.decode(latents / vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(pixels, columns: int):
    """A PIL image with the images of ``pixels`` in rows of ``columns``."""
    from PIL import Image

    height, width = pixels.shape[1:3]
    rows = -(-len(pixels) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, pixel in enumerate(pixels):
        grid.paste(Image.fromarray(pixel), ((index % columns) * width, (index // columns) * height))
    return grid


@torch.no_grad()
def sample(source: str | os.PathLike, prompts: list[str], count: int, out: str | os.PathLike, seed: int = 0) -> list[Path]:
    """``count`` one-step images per prompt, as PNG files plus ``grid.png`` in ``out``."""
    from PIL import Image

    teacher, vsd = load_one_step(source)
    model = teacher.denoiser.eval()
    all_prompts = [p for p in prompts for _ in range(count)]
    conditioning = teacher.encode(all_prompts)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(all_prompts), teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    pixels = decode(teacher, one_step(teacher, model, torch.randn(shape, generator=generator), conditioning, vsd))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, pixel in enumerate(pixels):
        path = out / f"{index // count:03d}-{index % count:02d}.png"
        Image.fromarray(pixel).save(path)
        paths.append(path)
    image_grid(pixels, count).save(out / "grid.png")
    return paths + [out / "grid.png"]
