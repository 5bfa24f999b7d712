"""Sampling: plain functions over tensors (k-diffusion style), no scheduler state, then images.

DDIM (η = 0) on the teacher's own ᾱ table with "trailing" timestep spacing, so one step starts at the
last training timestep — the same x_T the one-step generator starts from — and the teacher used as a
one-step generator is simply ``ddim(steps=1)``. One-step samples of a generator are
:func:`wadi_distill.distill.one_step` (:func:`one_step_sample` adds optional guidance); :func:`decode`
turns either into images, :func:`write_samples` writes a run's or an export's one-step images as PNG files.

Guidance of a one-step student follows diffusers' ``guidance_scale``, so that ``sample --guidance G`` and an
exported pipeline's ``guidance_scale=G`` agree: G <= 1 is one conditional pass, which is how the generator is
trained and used (the published code too); G > 1 is classifier-free guidance against the empty prompt.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from wadi_analysis.errors import UserError

from .adapters import activate
from .distill import guided_epsilon, one_step
from .teacher import Conditioning, Teacher
from .vsd import VSDConfig, guided, predicted_epsilon, predicted_x0


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps from the last one down, evenly spaced ("trailing", as in diffusers)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [int(round(num_timesteps - i * num_timesteps / steps)) - 1 for i in range(steps)]


@torch.no_grad()
def ddim(teacher: Teacher, model, noise: torch.Tensor, conditioning: Conditioning, null: Conditioning,
         steps: int, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM from x_T = ``noise`` to x_0 in ``steps`` teacher evaluations (each with CFG).

    A flow teacher's first level is a = 0 (sigma_max = 1), where x0 cannot come from eps: there x0 and eps come
    from the guided velocity (vsd.predicted_x0 / predicted_epsilon, "flow"); DDIM on a(sigma) is then exactly the
    flow's Euler step x_sigma' = x_sigma + (sigma' - sigma) v."""
    x = noise
    timesteps = trailing_timesteps(teacher.num_timesteps, steps)
    alphas = teacher.alphas_cumprod.to(device=noise.device)
    for index, timestep in enumerate(timesteps):
        timesteps_now = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
        alpha = alphas[timestep].to(x.dtype)
        if teacher.prediction_type == "flow":
            velocity = _guided_output(teacher, model, x, timesteps_now, conditioning, null, guidance_scale)
            x0 = predicted_x0(velocity, x, alpha, "flow")
            epsilon = predicted_epsilon(velocity, x, alpha, "flow")
        else:
            epsilon = guided_epsilon(teacher, model, None, x, timesteps_now, conditioning, null, guidance_scale)
            x0 = (x - (1 - alpha).sqrt() * epsilon) / alpha.sqrt()
        if index + 1 == len(timesteps):
            return x0
        alpha_next = alphas[timesteps[index + 1]].to(x.dtype)
        x = alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * epsilon
    return x


def _guided_output(teacher: Teacher, model, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                   null: Conditioning, scale: float) -> torch.Tensor:
    """The raw network output with CFG (as guided_epsilon guides eps; the same for a flow teacher, whose eps is
    affine in v with a coefficient 1 on x)."""
    activate(model, None)
    both = Conditioning.cat([null.repeat_to(len(conditioning)), conditioning])
    output = teacher.network_output(model, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), both)
    unconditional, conditional = output.chunk(2)
    return guided(unconditional, conditional, scale)


@torch.no_grad()
def to_pixels(teacher: Teacher, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> float images (N, C, H, W) in [-1, 1]: x = D(z / scaling_factor + shift_factor) with the
    teacher's VAE (shift_factor: SD3's VAE; none for SD's), as the pipelines decode; a pixel-space teacher (no
    VAE) has its images as latents."""
    vae = getattr(teacher.pipeline, "vae", None)
    if vae is None:
        return latents.float().clamp(-1, 1)
    scaled = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None) is not None:
        scaled = scaled + vae.config.shift_factor
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


def initial_noise(teacher: Teacher, count: int, seed: int) -> torch.Tensor:
    """The x_T of :func:`write_samples`: ``count`` latents from one generator seeded ``seed`` (pass them as
    ``latents=`` to an exported pipeline for the same images)."""
    shape = (count, teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def one_step_sample(teacher: Teacher, generator, noise: torch.Tensor, conditioning: Conditioning, vsd: VSDConfig,
                    guidance: float = 1.0) -> torch.Tensor:
    """The one-step student's x0, guided as diffusers' ``guidance_scale``: <= 1 one conditional pass, > 1
    x0_u + G (x0_c - x0_u) against what the pipeline guides against (:meth:`Teacher.unconditional`: the empty
    prompt; zeros for SDXL) — x0 is affine in the network output, so this is guiding epsilon or v, as a
    pipeline does."""
    if guidance <= 1:
        return one_step(teacher, generator, noise, conditioning, vsd)
    both = Conditioning.cat([teacher.unconditional(len(conditioning)), conditioning])
    unconditional, conditional = one_step(teacher, generator, torch.cat([noise, noise]), both, vsd).chunk(2)
    return guided(unconditional, conditional, guidance)


def check_guidance(guidance: float) -> float:
    """A guidance scale is a finite number >= 0."""
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"--guidance must be a finite number >= 0 (got {guidance!r})")
    return float(guidance)


@torch.no_grad()
def write_samples(source: str | os.PathLike, prompts: list[str], count: int, out: str | os.PathLike,
                  seed: int = 0, overwrite: bool = False, guidance: float = 1.0,
                  controlnet: str | os.PathLike | None = None, control_images: list | None = None,
                  control_scale: float = 1.0) -> list[Path]:
    """``count`` one-step images per prompt from a run or an export, as PNG files plus ``grid.png`` in ``out``
    (replaced whole: if it exists, an earlier ``sample`` output, or ``overwrite``); ``guidance`` as in
    :func:`one_step_sample` (default: one conditional pass, the student's own convention). With ``controlnet``
    (a ControlNet folder) the student is steered by ``control_images`` (one for all prompts, or one per
    prompt) at ``control_scale``, as ``StableDiffusionControlNetPipeline`` steers its U-Net."""
    from PIL import Image

    from wadi_analysis.outputs import staged_folder

    from .runs import check_output_for, load_one_step

    guidance = check_guidance(guidance)
    if (controlnet is None) != (not control_images):
        raise UserError("--controlnet and --control-image go together")
    inputs = tuple(p for p in [controlnet, *(control_images or [])] if p is not None)
    out = check_output_for(source, out, ours=_holds_only_samples, overwrite=overwrite, inputs=inputs)
    model = load_one_step(source)
    teacher, generator = model.teacher, model.generator.eval()
    if controlnet is not None:
        from .controlnet import controlled

        generator = controlled(teacher, generator, controlnet, control_images, len(prompts), count, control_scale)
    all_prompts = [p for p in prompts for _ in range(count)]
    conditioning = teacher.encode(all_prompts)
    noise = initial_noise(teacher, len(all_prompts), seed)
    pixels = decode(teacher, one_step_sample(teacher, generator, noise, conditioning, model.vsd, guidance))
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
