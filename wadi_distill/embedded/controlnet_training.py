"""Train a ControlNet for the embedded teacher on edge maps of Fashion-MNIST (``wadi-distill controlnet``).

ControlNet's recipe at toy scale: ``ControlNetModel.from_unet`` copies the teacher U-Net's encoder and
middle block (its zero convolutions start the residuals at exactly zero, so training starts at the
teacher), the teacher's U-Net and text encoder stay frozen, and the ControlNet learns the teacher's
ε-loss with its residuals added, conditioned on the edge map of the training image
(:func:`wadi_distill.evaluation.control.edge_map`, as a white-on-black RGB image in [0, 1], what
``StableDiffusionControlNetPipeline`` feeds it). The conditioning embedding halves twice
(32 px control image -> the 8×8 latents; SD's halves three times for its 8× VAE). Captions are the
teacher's, 10 % of them empty (so the pipeline's guidance works), the control image is never dropped.
The result is a diffusers ControlNet folder (``from_pretrained`` loads it) with ``wadi_controlnet.json``:
the command, seed and device that reproduce it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wadi_analysis.errors import InvalidValue
from wadi_analysis.outputs import check_output, staged_folder

from . import datasets, teacher_path
from .optimisation import adamw_warmup_cosine, clipped_step
from .teacher_training import _check_device, _fraction, _whole, latent_posterior

PROVENANCE = "wadi_controlnet.json"  # marks a folder this command wrote
CONDITIONING_CHANNELS = (16, 32, 64)  # the control image's embedding: two halvings (32 px -> 8×8 latents)


@dataclass
class ControlNetConfig:
    teacher: str = ""               # teacher pipeline folder ("": the embedded teacher)
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 100
    null_caption_rate: float = 0.1
    images: int = 0                 # train on this many images per class (0: the whole training split)
    seed: int = 0
    device: str = "cpu"
    threads: int = 0                # 0: torch's default


def controlnet_config(**options) -> ControlNetConfig:
    """A checked :class:`ControlNetConfig` from command-line values (``None`` keeps the default)."""
    values = {k: (str(v) if k == "teacher" else v) for k, v in options.items() if v is not None}
    config = ControlNetConfig(**values)
    for name in ("steps", "batch_size", "warmup"):
        _whole(name, getattr(config, name), 1)
    _whole("threads", config.threads, 0)
    _whole("images", config.images, 0)
    _whole("seed", config.seed, -2 ** 62)
    _fraction("lr", config.lr, positive=True)
    _fraction("null_caption_rate", config.null_caption_rate, below_one=True)
    _check_device(config.device)
    return config


def is_controlnet_folder(folder: Path) -> bool:
    """A folder this command wrote (it holds the provenance file)."""
    return (Path(folder) / PROVENANCE).is_file()


def train_controlnet(config: ControlNetConfig, out: str | Path, log=print, *, overwrite: bool = False) -> Path:
    """Train the ControlNet and write its folder to ``out`` (checked first: a non-empty folder this command
    did not write is replaced only with ``overwrite``); returns ``out``."""
    from ..teacher import load_teacher

    teacher_folder = Path(config.teacher) if config.teacher else teacher_path()
    out = check_output(out, [teacher_folder], folder=True, replace=True, overwrite=overwrite, ours=is_controlnet_folder)
    teacher = load_teacher(teacher_folder)
    vae = getattr(teacher.pipeline, "vae", None)
    if teacher.family != "unet" or vae is None:
        raise InvalidValue(f"--teacher {teacher_folder}: a latent StableDiffusionPipeline (U-Net and VAE) is expected")
    data = datasets.load("fashion-mnist", "train", teacher.sample_size * 2 ** (len(vae.config.block_out_channels) - 1))
    if config.images:
        data = data.balanced(config.images, seed=config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    controlnet = _train(config, teacher, data, log)
    info = {"config": asdict(config), "teacher": _teacher_name(teacher_folder), "classes": list(data.classes),
            "seconds": round(time.perf_counter() - started), "device": config.device, "command": command_line(config)}
    with staged_folder(out) as stage:
        controlnet.save_pretrained(stage)
        (stage / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _teacher_name(folder: Path) -> str:
    return "embedded" if folder.resolve() == teacher_path().resolve() else str(folder)


def _train(config: ControlNetConfig, teacher, data, log):
    from diffusers import ControlNetModel

    from ..evaluation.control import edge_map

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    unet, vae = teacher.denoiser.to(device), teacher.pipeline.vae.to(device)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS).to(device)
    controlnet.train()
    # every caption embedded once: (class, template) rows and the empty caption
    captions = [datasets.caption(data.classes, label, t) for label in range(len(data.classes))
                for t in range(len(datasets.TEMPLATES))]
    embeds = teacher.encode(captions + [""]).hidden_states.to(device)
    caption_embeds, null_embeds = embeds[:-1].view(len(data.classes), len(datasets.TEMPLATES), *embeds.shape[1:]), embeds[-1]
    controls = edge_map(data.images).expand(-1, 3, -1, -1).to(device)  # white edges on black, in [0, 1]
    latent_mean, latent_std = (t.to(device) for t in latent_posterior(vae, data.images.to(device)))
    labels = data.labels.to(device)
    alphas = teacher.alphas_cumprod.float().to(device)
    parameters = list(controlnet.parameters())
    optimizer, schedule = adamw_warmup_cosine(parameters, config.lr, config.warmup, config.steps)
    rng = torch.Generator().manual_seed(config.seed)  # every random draw from one CPU generator
    started, running = time.perf_counter(), None
    for step in range(1, config.steps + 1):
        # Draw a batch: latents z ~ q(z|x), captions (some empty), timesteps, noise.
        index = torch.randint(0, len(data), (config.batch_size,), generator=rng).to(device)
        templates = torch.randint(0, len(datasets.TEMPLATES), (config.batch_size,), generator=rng).to(device)
        hidden = caption_embeds[labels[index], templates].clone()
        dropped = (torch.rand(config.batch_size, generator=rng) < config.null_caption_rate).to(device)
        hidden[dropped] = null_embeds
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=rng).to(device)
        timesteps = torch.randint(0, len(alphas), (config.batch_size,), generator=rng).to(device)
        noise = torch.randn(latents.shape, generator=rng).to(device)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        # The teacher's ε-loss with the ControlNet's residuals added (the teacher itself frozen).
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=hidden, controlnet_cond=controls[index],
                               return_dict=False)
        epsilon = unet(noisy, timesteps, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]
        loss = F.mse_loss(epsilon, noise)
        value = clipped_step(loss, optimizer, schedule, parameters)
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 100 == 0 or step == config.steps:
            log(f"step {step}/{config.steps}  loss {running:.4f}  {time.perf_counter() - started:.0f} s")
    return controlnet.eval().cpu()


def command_line(config: ControlNetConfig) -> str:
    """The ``wadi-distill controlnet`` command that reproduces ``config``."""
    defaults = ControlNetConfig()
    options = [(k, v) for k, v in asdict(config).items() if v != getattr(defaults, k) and k != "threads"]
    return "wadi-distill controlnet " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options)
