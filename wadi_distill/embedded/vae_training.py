"""Train the embedded teacher's autoencoder (``wadi-distill vae``): SD's ``AutoencoderKL`` at toy scale.

A KL-regularised autoencoder of grey S×S images to 4×(S/4)×(S/4) latents (two halvings), trained
with SD's first-stage objective less its perceptual and adversarial terms (no LPIPS network or
discriminator can be had here):

    L = ‖x − D(z)‖₁ summed over pixels + β · KL(q(z|x) ‖ N(0, I)),   z ~ q(z|x),  β = 1e-6 (SD's)

both averaged over the batch. After training, SD's ``scaling_factor`` is measured as it was for SD:
one over the standard deviation of latent samples of training images, so the diffusion model sees
latents of unit variance. The folder is a diffusers ``AutoencoderKL`` with ``wadi_vae.json`` beside
its config (the command, the seed, the measured scale).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wadi_analysis.errors import InvalidValue
from wadi_analysis.outputs import check_output, staged_folder

from . import datasets
from .optimisation import adamw_warmup_cosine, clipped_step
from .teacher_training import _check_device, _fraction, _whole, command_line_values

PROVENANCE = "wadi_vae.json"   # the file that marks a folder this command wrote
HALVINGS = 2                    # S×S images → (S/4)×(S/4) latents, as the 32 → 8


@dataclass
class VAEConfig:
    dataset: str = "fashion-mnist"
    image_size: int = 32
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64)   # one block per level; HALVINGS + 1 levels
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    seed: int = 0
    device: str = "cpu"
    threads: int = 0


def vae_config(channels: str | None = None, **options) -> VAEConfig:
    """A checked :class:`VAEConfig` from command-line values (``None`` keeps the default)."""
    return check_vae_config(VAEConfig(**command_line_values(channels, options)))


def check_vae_config(config: VAEConfig) -> VAEConfig:
    for name in ("steps", "batch_size", "image_size", "warmup", "latent_channels"):
        _whole(name, getattr(config, name), 1)
    _whole("threads", config.threads, 0)
    _whole("seed", config.seed, -2 ** 62)
    _fraction("lr", config.lr, positive=True)
    _fraction("kl_weight", config.kl_weight)
    if len(config.channels) != HALVINGS + 1 or any(c < 8 or c % 8 for c in config.channels):
        raise InvalidValue(f"--channels must be {HALVINGS + 1} multiples of 8, not "
                           f"{','.join(map(str, config.channels))!r}")
    if config.image_size % 2 ** HALVINGS:
        raise InvalidValue(f"--image-size must be a multiple of {2 ** HALVINGS}, not {config.image_size}")
    _check_device(config.device)
    return config


def autoencoder(config: VAEConfig):
    from diffusers import AutoencoderKL

    levels = len(config.channels)
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=config.latent_channels,
                         block_out_channels=tuple(config.channels), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, sample_size=config.image_size)


def is_vae_folder(folder: Path) -> bool:
    return (Path(folder) / PROVENANCE).is_file()


def first_stage_loss(vae, images: torch.Tensor, kl_weight: float, rng: torch.Generator) -> torch.Tensor:
    """L = ‖x − D(z)‖₁ (summed over pixels) + β·KL(q(z|x) ‖ N(0, I)), z ~ q(z|x); batch means."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=rng).to(images.device)
    reconstruction = vae.decode(latents).sample
    return (reconstruction - images).abs().flatten(1).sum(1).mean() + kl_weight * posterior.kl().mean()


@torch.no_grad()
def measure_scaling_factor(vae, images: torch.Tensor, rng: torch.Generator, batch: int = 500) -> float:
    """SD's ``scaling_factor``: 1 / std of latent samples z ~ q(z|x) over ``images``."""
    samples = []
    for chunk in images.split(batch):
        posterior = vae.encode(chunk).latent_dist
        samples.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=rng))
    return 1.0 / torch.cat(samples).std().item()


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """D(mean of q(z|x)): what the autoencoder gives back of ``images``, clamped to [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample.clamp(-1, 1)
                      for chunk in images.split(batch)])


def train_vae(config: VAEConfig, out: str | Path, log=print, *, overwrite: bool = False) -> Path:
    """Train the autoencoder, measure its scaling factor and write its folder to ``out``; returns ``out``."""
    check_vae_config(config)
    out = check_output(out, folder=True, replace=True, overwrite=overwrite, ours=is_vae_folder)
    data = datasets.load(config.dataset, "train", config.image_size)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    vae = autoencoder(config).to(device)
    optimizer, schedule = adamw_warmup_cosine(vae.parameters(), config.lr, config.warmup, config.steps)
    rng = torch.Generator().manual_seed(config.seed)
    started, running = time.perf_counter(), None
    for step in range(1, config.steps + 1):
        index = torch.randint(0, len(data), (config.batch_size,), generator=rng)
        loss = first_stage_loss(vae, data.images[index].to(device), config.kl_weight, rng)
        value = clipped_step(loss, optimizer, schedule, vae.parameters())
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 200 == 0 or step == config.steps:
            log(f"vae step {step}/{config.steps}  loss {running:.2f}  {time.perf_counter() - started:.0f} s")
    vae = vae.cpu().eval()
    scale = measure_scaling_factor(vae, data.balanced(500, seed=config.seed).images, rng)
    vae.register_to_config(scaling_factor=scale)
    info = {"config": asdict(config), "scaling_factor": scale, "seconds": round(time.perf_counter() - started),
            "device": config.device, "command": command_line(config)}
    with staged_folder(out) as tmp:
        vae.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def command_line(config: VAEConfig) -> str:
    defaults = VAEConfig()
    options = [(k, v) for k, v in asdict(config).items() if v != getattr(defaults, k) and k != "threads"]
    return " ".join(["wadi-distill vae"] + [
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in options])
