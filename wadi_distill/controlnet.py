"""ControlNet with a one-step student (or the teacher): the denoiser with a ControlNet's residuals added.

A ControlNet trained on the teacher steers the one-step student too: the student is the teacher's
U-Net with rotated weights, and the ControlNet's residuals enter its decoder exactly as they enter the
teacher's. :class:`ControlledDenoiser` wraps a denoiser so that every call adds them, as
``StableDiffusionControlNetPipeline`` does (ControlNet on the same x_t, t and prompt embeddings, the
control image repeated over a classifier-free-guidance batch, ``conditioning_scale``), so the sampling
functions (:func:`wadi_distill.sampling.one_step_sample`, :func:`~wadi_distill.sampling.ddim`) run
controlled without a branch of their own. Control images are prepared by diffusers' own
``VaeImageProcessor`` as the pipeline prepares them (RGB, resized to the output size, in [0, 1]).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from wadi_analysis.errors import UserError


class ControlledDenoiser(nn.Module):
    """``denoiser`` with ``controlnet``'s residuals for the control images ``control`` (B, 3, H, W) in [0, 1]."""

    def __init__(self, denoiser: nn.Module, controlnet: nn.Module, control: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.denoiser, self.controlnet, self.scale = denoiser, controlnet, scale
        self.register_buffer("control", control, persistent=False)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs):
        # one control image per prompt, repeated over a guided batch ([unconditional, conditional])
        control = self.control.to(sample.dtype).repeat(sample.shape[0] // self.control.shape[0], 1, 1, 1)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=control, conditioning_scale=self.scale, return_dict=False)
        return self.denoiser(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=return_dict, **kwargs)


def load_controlnet(path: str | os.PathLike, denoiser: nn.Module) -> nn.Module:
    """A diffusers ``ControlNetModel`` folder (safetensors only, never a pickle) that fits ``denoiser``."""
    from diffusers import ControlNetModel

    folder = Path(path)
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"--controlnet {path} is not a ControlNet folder (config.json missing or not JSON)") from None
    if class_name != "ControlNetModel":
        raise UserError(f"--controlnet {path}: its config.json names {class_name!r}, not ControlNetModel")
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise UserError(f"--controlnet {path}: diffusion_pytorch_model.safetensors is missing")
    try:
        controlnet = ControlNetModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception:  # diffusers raises many kinds for a broken folder; all mean the same
        raise UserError(f"--controlnet {path}: not a loadable ControlNetModel") from None
    problem = _misfit(controlnet.config, denoiser.config)
    if problem:
        raise UserError(f"--controlnet {path} does not fit this model's U-Net: {problem}")
    return controlnet.eval().requires_grad_(False)


def _misfit(controlnet, unet) -> str | None:
    for key in ("in_channels", "block_out_channels", "cross_attention_dim", "layers_per_block"):
        mine, theirs = controlnet.get(key), unet.get(key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != \
                (list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            return f"{key} {mine} against the U-Net's {theirs}"
    return None


def control_images(paths: list[str | os.PathLike], height: int, width: int) -> torch.Tensor:
    """Image files -> (N, 3, height, width) float in [0, 1], as ``StableDiffusionControlNetPipeline``
    prepares its ``image`` (diffusers' ``VaeImageProcessor``: RGB, resized, not normalised)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(processor.preprocess(image.convert("RGB"), height=height, width=width))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise UserError(f"--control-image {path} is not a readable image: {first}") from None
    return torch.cat(images).float()


def check_control_scale(scale: float) -> float:
    """A ControlNet conditioning scale is a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise UserError(f"--control-scale must be a finite number >= 0 (got {scale!r})")
    return float(scale)


def output_size(teacher) -> int:
    """Pixels a side of the teacher's images (its latents times the VAE's downsampling)."""
    vae = getattr(teacher.pipeline, "vae", None)
    return teacher.sample_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)


def controlled(teacher, denoiser: nn.Module, controlnet: str | os.PathLike, images: list[str | os.PathLike],
               prompts: int, per_prompt: int = 1, scale: float = 1.0) -> ControlledDenoiser:
    """``denoiser`` steered by the ControlNet folder ``controlnet`` for a batch of ``prompts`` × ``per_prompt``
    samples (prompt-major, as :func:`wadi_distill.sampling.write_samples` orders them): one control image
    for all of them, or one per prompt."""
    scale = check_control_scale(scale)
    if len(images) not in (1, prompts):
        raise UserError(f"give one --control-image for all prompts or one per prompt ({prompts}), not {len(images)}")
    model = load_controlnet(controlnet, denoiser)
    size = output_size(teacher)
    control = control_images(images, size, size)
    control = control.expand(prompts, -1, -1, -1) if len(images) == 1 else control
    return ControlledDenoiser(denoiser, model, control.repeat_interleave(per_prompt, dim=0), scale)
