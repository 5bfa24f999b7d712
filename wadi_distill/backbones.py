"""The teacher a distillation works on: its denoiser, noise schedule, parametrisation and text conditioning.

Everything is local: diffusers model and pipeline folders are read with ``local_files_only``. The
pipeline's own ``encode_prompt`` produces the conditioning, so SD, SDXL (pooled text embeddings and
time ids) and PixArt (T5 with attention masks) are encoded exactly as their pipelines do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from wadi_analysis.checkpoint import CheckpointError
from wadi_analysis.locate import model_folder

from .vsd import predicted_epsilon


def load_denoiser(path: str | os.PathLike, component: str | None = None) -> nn.Module:
    """The U-Net or transformer of a diffusers model/pipeline folder, from local files only."""
    import diffusers

    folder = model_folder(path, component)
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        raise CheckpointError(f"{folder}/config.json is not readable JSON") from None
    model_class = getattr(diffusers, str(class_name), None)
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        raise CheckpointError(f"{folder}/config.json names {class_name!r}, which is not a diffusers model class")
    try:
        return model_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {folder}: {str(exc).splitlines()[0][:200]}") from None


@dataclass
class Conditioning:
    """What the denoiser needs besides x_t and t, for a batch of prompts."""

    hidden_states: torch.Tensor
    extra: dict = field(default_factory=dict)  # SDXL: added_cond_kwargs; PixArt: mask and added_cond_kwargs

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def select(self, index: torch.Tensor) -> Conditioning:
        return Conditioning(self.hidden_states[index], _map(self.extra, lambda t: t[index]))

    def to(self, device=None, dtype=None) -> Conditioning:
        floating = (lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        return Conditioning(floating(self.hidden_states), _map(self.extra, floating))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        extra = {}
        for key, value in parts[0].extra.items():
            if isinstance(value, dict):
                extra[key] = {k: None if v is None else torch.cat([p.extra[key][k] for p in parts])
                              for k, v in value.items()}
            else:
                extra[key] = torch.cat([p.extra[key] for p in parts])
        return Conditioning(torch.cat([p.hidden_states for p in parts]), extra)

    def repeat_to(self, batch: int) -> Conditioning:
        return self.select(torch.zeros(batch, dtype=torch.long)) if len(self) == 1 else self


def _map(extra: dict, fn) -> dict:
    return {k: (_map(v, fn) if isinstance(v, dict) else None if v is None else fn(v)) for k, v in extra.items()}


@dataclass
class Teacher:
    """A frozen teacher: denoiser + schedule facts + prompt encoder (the pipeline, text side only)."""

    denoiser: nn.Module
    family: str  # "unet" (SD1/SD2), "sdxl" or "pixart"
    alphas_cumprod: torch.Tensor  # float64, one per training timestep
    prediction_type: str  # epsilon | v_prediction | sample
    pipeline: object | None = None
    latent_channels: int = 4
    sample_size: int = 64

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_bar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """a_t for a batch of timesteps, shaped to broadcast against ``like``."""
        values = self.alphas_cumprod.to(like.device)[timesteps.long().to(like.device)]
        return values.to(torch.float32).view(-1, *([1] * (like.ndim - 1)))

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> Conditioning:
        """Prompt embeddings exactly as the teacher's pipeline computes them."""
        pipe = self.pipeline
        if pipe is None:
            raise ValueError("this teacher was loaded without its text encoder")
        if self.family == "pixart":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                    clean_caption=False)
            return Conditioning(embeds, {"encoder_attention_mask": mask,
                                         "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})
        if self.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            size = self.sample_size * pipe.vae_scale_factor
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(len(prompts), 1)
            return Conditioning(embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}})
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return Conditioning(embeds)

    def forward(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning) -> torch.Tensor:
        """The raw network output at x_t (U-Nets and transformers name their inputs differently);
        learned-sigma outputs (PixArt) keep their prediction half."""
        sample = "hidden_states" if self.family == "pixart" else "sample"
        output = model(**{sample: noisy}, timestep=timesteps, encoder_hidden_states=conditioning.hidden_states,
                       **conditioning.extra, return_dict=False)[0]
        if output.shape[1] == 2 * noisy.shape[1]:
            output = output[:, : noisy.shape[1]]
        return output

    def epsilon(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning) -> torch.Tensor:
        """The network's noise prediction at x_t, whatever its parametrisation."""
        output = self.forward(model, noisy, timesteps, conditioning)
        return predicted_epsilon(output, noisy, self.alpha_bar(timesteps, noisy).to(output.dtype),
                                 self.prediction_type)


def _family(denoiser: nn.Module) -> str:
    name = type(denoiser).__name__
    if name.startswith("PixArt"):
        return "pixart"
    if getattr(denoiser.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if name == "UNet2DConditionModel":
        return "unet"
    raise CheckpointError(f"unsupported denoiser {name}: WaDi distils UNet2DConditionModel and PixArt transformers")


def load_teacher(path: str | os.PathLike, *, text: bool = True) -> Teacher:
    """A teacher from a diffusers pipeline folder (denoiser, scheduler, VAE, text encoders, tokenizers)."""
    import warnings

    from transformers.utils import logging as transformers_logging

    # Library chatter (progress bars, "requires torchvision" notices, config deprecations) would bury
    # our own one-line errors on stderr; loading stays quiet unless it fails.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    folder = os.fspath(path)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder (model_index.json missing)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot load the pipeline {folder}: {str(exc).splitlines()[0][:200]}") from None
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise CheckpointError(f"pipeline {folder} has no unet or transformer")
    denoiser.requires_grad_(False)
    for part in ("text_encoder", "text_encoder_2", "vae"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).requires_grad_(False)
    config = denoiser.config
    return Teacher(denoiser=denoiser, family=_family(denoiser),
                   alphas_cumprod=scheduler.alphas_cumprod.double().clone(),
                   prediction_type=scheduler.config.prediction_type, pipeline=pipe if text else None,
                   latent_channels=config.in_channels, sample_size=config.sample_size)
