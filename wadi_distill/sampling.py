"""Sampling: plain functions over tensors (k-diffusion style), no scheduler state, then images.

DDIM (η = 0) on the teacher's own ᾱ table with "trailing" timestep spacing, so one step starts at the
last training timestep — the same x_T the one-step generator starts from — and the teacher used as a
one-step generator is simply ``ddim(steps=1)``. One-step samples of a generator are
:func:`wadi_distill.distill.one_step`; :func:`decode` turns either into images, :func:`write_samples`
writes a run's or an export's one-step images as PNG files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .distill import guided_epsilon, one_step
from .teacher import Conditioning, Teacher


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps from the last one down, evenly spaced ("trailing", as in diffusers)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [int(round(num_timesteps - i * num_timesteps / steps)) - 1 for i in range(steps)]


@torch.no_grad()
def ddim(teacher: Teacher, model, noise: torch.Tensor, conditioning: Conditioning, null: Conditioning,
         steps: int, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM from x_T = ``noise`` to x_0 in ``steps`` teacher evaluations (each with CFG)."""
    x = noise
    timesteps = trailing_timesteps(teacher.num_timesteps, steps)
    alphas = teacher.alphas_cumprod.to(device=noise.device)
    for index, timestep in enumerate(timesteps):
        timesteps_now = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
        epsilon = guided_epsilon(teacher, model, None, x, timesteps_now, conditioning, null, guidance_scale)
        alpha = alphas[timestep].to(x.dtype)
        x0 = (x - (1 - alpha).sqrt() * epsilon) / alpha.sqrt()
        if index + 1 == len(timesteps):
            return x0
        alpha_next = alphas[timesteps[index + 1]].to(x.dtype)
        x = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * epsilon
    return x


@torch.no_grad()
def to_pixels(teacher: Teacher, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> float images (N, C, H, W) in [-1, 1]: x = D(z / scaling_factor) with the teacher's VAE;
    a pixel-space teacher (no VAE) has its images as latents."""
    vae = getattr(teacher.pipeline, "vae", None)
    if vae is None:
        return latents.float().clamp(-1, 1)
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    return torch.cat([vae.decode(chunk).sample.float() for chunk in scaled.split(250)]).clamp(-1, 1)


@torch.no_grad()
def decode(teacher: Teacher, latents: torch.Tensor):
    """Latents -> uint8 RGB images (N, H, W, 3) (:func:`to_pixels`; grey ones repeated to RGB)."""
    images = to_pixels(teacher, latents)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
def write_samples(source: str | os.PathLike, prompts: list[str], count: int, out: str | os.PathLike,
                  seed: int = 0, overwrite: bool = False) -> list[Path]:
    """``count`` one-step images per prompt from a run or an export, as PNG files plus ``grid.png`` in ``out``
    (replaced whole: if it exists, an earlier ``sample`` output, or ``overwrite``)."""
    from PIL import Image

    from wadi_analysis.outputs import staged_folder

    from .runs import check_output_for, load_one_step

    out = check_output_for(source, out, ours=_holds_only_samples, overwrite=overwrite)
    model = load_one_step(source)
    teacher, generator = model.teacher, model.generator.eval()
    all_prompts = [p for p in prompts for _ in range(count)]
    conditioning = teacher.encode(all_prompts)
    rng = torch.Generator().manual_seed(seed)
    shape = (len(all_prompts), teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    pixels = decode(teacher, one_step(teacher, generator, torch.randn(shape, generator=rng), conditioning, model.vsd))
    names = [f"{index // count:03d}-{index % count:02d}.png" for index in range(len(pixels))] + [GRID]
    with staged_folder(out) as stage:  # the images appear together, or not at all
        for name, pixel in zip(names, pixels):
            Image.fromarray(pixel).save(stage / name)
        image_grid(pixels, count).save(stage / GRID)
    return [out / name for name in names]


GRID = "grid.png"
_SAMPLE_NAME = re.compile(r"\d{3}-\d{2}\.png|grid\.png")


def _holds_only_samples(folder: Path) -> bool:
    """An earlier ``sample`` output (only its PNG names): the next ``sample`` to it may replace it."""
    return all(_SAMPLE_NAME.fullmatch(entry.name) and entry.is_file() for entry in folder.iterdir())
