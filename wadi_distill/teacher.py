"""The teacher a distillation works on: its denoiser, noise schedule, parametrisation and text conditioning.

Everything is local: diffusers model and pipeline folders are read with ``local_files_only``; an original
single-file SD checkpoint is read with diffusers' ``from_single_file`` against a local pipeline folder that
provides the configs, tokenizers and scheduler (``--teacher-config``). The
pipeline's own ``encode_prompt`` produces the conditioning, so SD, SDXL (pooled text embeddings and
time ids), PixArt (T5 with attention masks) and SD3 (two CLIP encoders and T5, pooled embeddings) are encoded
exactly as their pipelines do.

Rectified-flow teachers (SD3, ``FlowMatchEulerDiscreteScheduler``) are seen in the eps teachers' units:
timestep i stands for the scheduler's training sigma_i (shift included), ``alphas_cumprod`` holds
a(sigma_i) = flow_alpha_bar, and the network's velocity is the "flow" prediction type; so x_t = x_sigma / s,
the generator starts at sigma_max = 1 (a = 0, pure noise) and loss timesteps are drawn in sigma with the shift.

FLUX.1 (``FluxPipeline``, family "flux") is such a teacher with three differences, each through the pipeline's own
code: latents (B, C, H, W) are packed 2 x 2 into tokens with the image ids of ``_pack_latents`` /
``_prepare_latent_image_ids`` (and unpacked after); prompts go through its ``encode_prompt`` (T5 sequence, CLIP
pooled, text ids); and a guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev) takes a guidance input
instead of a conditional/unconditional pair. That input is a teacher fact, ``Teacher.guidance`` (the pipeline's
default ``guidance_scale``, 3.5 for FLUX.1-dev), given in every call: the real score is the teacher at that
guidance, and the fake score and the generator (LoRaD adapters on the same transformer) get the same input, so
the fake score starts equal to the real one and the generator is the student of the guided teacher that
``FluxPipeline(guidance_scale=guidance)`` samples. Run such a teacher with ``[vsd] guidance_real = guidance_fake =
1`` (CFG of the two scores against the empty prompt on top of the embedded guidance is not what FLUX.1-dev was
distilled for). The latent size is the VAE's ``sample_size`` over its scale factor (1024 / 8 = 128 for FLUX.1, the
pipeline's default); with dynamic shifting (FLUX.1-dev's scheduler) the training sigmas are those the pipeline
uses at that size (:func:`.flow_schedule.flux_sigmas`). A run's ``flux_guidance`` (RunConfig) replaces the pipeline's default; the run
folder's ``config.json`` and an export's ``wadi_one_step.json`` record it, so that sample and export use it too.

SANA (``SanaPipeline``, family "sana") is a flow teacher like SD3 on its own pipeline's conditioning: Gemma2 hidden
states with their attention mask from ``encode_prompt`` with the pipeline's default ``complex_human_instruction``
(the empty prompt, what the pipeline guides against, without it: :meth:`Teacher._sana_encode`), timesteps
1000 sigma times the transformer's ``timestep_scale``. SANA ships ``DPMSolverMultistepScheduler`` with flow sigmas
(``use_flow_sigmas``, ``flow_prediction``, ``flow_shift``): its training sigmas are those of a
``FlowMatchEulerDiscreteScheduler`` with ``shift = flow_shift`` (:func:`.flow_schedule.flow_match_config`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from wadi_analysis.checkpoint import CheckpointError
from wadi_analysis.locate import model_folder

from .flow_schedule import flow_sigmas, flux_sigmas
from .vsd import flow_alpha_bar, flow_scale, predicted_epsilon

LDM_UNET_PREFIX = "model.diffusion_model."  # the U-Net of an original single-file SD checkpoint


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
    family: str  # "unet" (SD1/SD2), "sdxl", "pixart", "sd3", "flux" or "sana"
    alphas_cumprod: torch.Tensor  # float64, one per training timestep
    prediction_type: str  # epsilon | v_prediction | sample | flow (velocity; see vsd.flow_alpha_bar)
    pipeline: object | None = None
    latent_channels: int = 4
    sample_size: int = 64
    sigmas: torch.Tensor | None = None  # flow teachers: float64 sigma per training timestep, ascending (else None)
    guidance: float | None = None  # guidance-distilled teachers (FLUX.1-dev): the guidance input; else None

    @property
    def component(self) -> str:
        """The denoiser's name in its pipeline (and the prefix of LoRA files for it)."""
        return "transformer" if self.family in TRANSFORMER_FAMILIES else "unet"

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
                                         "added_cond_kwargs": self._pixart_size_conditions(embeds)})
        if self.family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
            # text ids (zeros, one row per token) kept per prompt, so that batches select and concatenate them
            return Conditioning(embeds, {"pooled_projections": pooled,
                                         "txt_ids": text_ids.unsqueeze(0).repeat(len(prompts), 1, 1)})
        if self.family == "sana":
            return self._sana_encode(prompts, device)
        if self.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False)
            return Conditioning(embeds, {"pooled_projections": pooled})
        if self.family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            size = self.sample_size * pipe.vae_scale_factor
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(len(prompts), 1)
            return Conditioning(embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}})
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return Conditioning(embeds)

    def _sana_encode(self, prompts: list[str], device) -> Conditioning:
        """SANA's Gemma2 hidden states and attention mask as ``SanaPipeline`` computes them: a prompt with the
        pipeline's default ``complex_human_instruction`` (its first token and last 299 kept), the empty prompt as the
        pipeline encodes its negative prompt, without it (the unconditional side everywhere here)."""
        import inspect

        instruction = inspect.signature(type(self.pipeline).__call__).parameters["complex_human_instruction"].default
        empty = torch.tensor([p == "" for p in prompts])
        parts = {}
        for is_empty in (False, True):
            chosen = [p for p, e in zip(prompts, empty.tolist()) if e == is_empty]
            if chosen:
                parts[is_empty] = self.pipeline.encode_prompt(
                    chosen, do_classifier_free_guidance=False, device=device,
                    complex_human_instruction=None if is_empty else instruction)[:2]
        if len(parts) == 1:
            embeds, mask = next(iter(parts.values()))
        else:  # both have max_sequence_length tokens: put each row back in its place
            order = torch.cat([(~empty).nonzero().flatten(), empty.nonzero().flatten()]).argsort()
            embeds, mask = (torch.cat([parts[False][i], parts[True][i]])[order] for i in range(2))
        return Conditioning(embeds, {"encoder_attention_mask": mask})

    def _pixart_size_conditions(self, embeds: torch.Tensor) -> dict:
        """PixArt's micro-conditions as ``PixArtAlphaPipeline`` passes them at its default size: for a transformer
        with ``use_additional_conditions`` (diffusers' default for sample_size 128, the 1024 px PixArt-α) the
        image's (height, width) in pixels and height / width, one row per prompt, in the embeddings' dtype and
        device; else None for both (the 256/512 px models take none)."""
        if not getattr(self.denoiser, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        size = self.sample_size * self.pipeline.vae_scale_factor  # square, as every sample here is
        rows = embeds.shape[0]
        resolution = torch.tensor([size, size]).repeat(rows, 1).to(dtype=embeds.dtype, device=embeds.device)
        aspect_ratio = torch.tensor([1.0]).repeat(rows, 1).to(dtype=embeds.dtype, device=embeds.device)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    @torch.no_grad()
    def unconditional(self, batch: int) -> Conditioning:
        """What the teacher's pipeline guides against with no negative prompt, for ``batch`` samples: the
        empty prompt's embeddings, or zeros for SDXL pipelines with ``force_zeros_for_empty_prompt`` (their
        default), text and pooled embeddings alike (the time ids stay)."""
        null = self.encode([""]).repeat_to(batch)
        if self.family == "sdxl" and getattr(self.pipeline.config, "force_zeros_for_empty_prompt", False):
            added = null.extra["added_cond_kwargs"]
            null = Conditioning(torch.zeros_like(null.hidden_states), {"added_cond_kwargs": {
                "text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]}})
        return null

    def network_output(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning) -> torch.Tensor:
        """The raw network output at x_t (U-Nets and transformers name their inputs differently);
        learned-sigma outputs (PixArt) keep their prediction half. Flow teachers see x_sigma = s(sigma) x_t at
        timestep 1000 sigma, as their scheduler feeds them, and return the velocity (FLUX: :meth:`_flux_output`)."""
        if self.family == "flux":
            return self._flux_output(model, noisy, timesteps, conditioning)
        sample = "hidden_states" if self.family in TRANSFORMER_FAMILIES else "sample"
        if self.sigmas is not None:
            sigma = self.sigmas.to(noisy.device)[timesteps.long().to(noisy.device)]
            noisy = noisy * flow_scale(sigma).to(noisy.dtype).view(-1, *([1] * (noisy.ndim - 1)))
            timesteps = (1000 * sigma * getattr(self.denoiser.config, "timestep_scale", 1.0)).to(noisy.dtype)
        output = model(**{sample: noisy}, timestep=timesteps, encoder_hidden_states=conditioning.hidden_states,
                       **conditioning.extra, return_dict=False)[0]
        if output.shape[1] == 2 * noisy.shape[1]:
            output = output[:, : noisy.shape[1]]
        return output

    def _flux_output(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                     conditioning: Conditioning) -> torch.Tensor:
        """FLUX's velocity at x_t, as ``FluxPipeline`` calls its transformer: x_sigma = s(sigma) x_t packed 2 x 2
        into tokens with their image ids, timestep (1000 sigma) / 1000, the guidance input ``self.guidance``
        (guidance-distilled transformers), the text ids of ``encode_prompt``; the packed output unpacked to
        (B, C, H, W)."""
        from diffusers import FluxPipeline

        sigma = self.sigmas.to(noisy.device)[timesteps.long().to(noisy.device)]
        noisy = noisy * flow_scale(sigma).to(noisy.dtype).view(-1, *([1] * (noisy.ndim - 1)))
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        guidance = None if self.guidance is None else torch.full((batch,), self.guidance, device=noisy.device)
        extra = conditioning.extra
        output = model(hidden_states=packed, timestep=(1000 * sigma).to(noisy.dtype) / 1000, guidance=guidance,
                       pooled_projections=extra["pooled_projections"], encoder_hidden_states=conditioning.hidden_states,
                       txt_ids=extra["txt_ids"][0], img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(output, height, width, 1)  # latent height and width: scale factor 1

    def epsilon(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: Conditioning) -> torch.Tensor:
        """The network's noise prediction at x_t, whatever its parametrisation."""
        output = self.network_output(model, noisy, timesteps, conditioning)
        return predicted_epsilon(output, noisy, self.alpha_bar(timesteps, noisy).to(output.dtype),
                                 self.prediction_type)


TRANSFORMER_FAMILIES = ("pixart", "sd3", "flux", "sana")


def _family(denoiser: nn.Module) -> str:
    name = type(denoiser).__name__
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "SanaTransformer2DModel":
        return "sana"
    if name.startswith("PixArt"):
        return "pixart"
    if getattr(denoiser.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if name == "UNet2DConditionModel":
        return "unet"
    raise CheckpointError(f"unsupported denoiser {name}: WaDi distils UNet2DConditionModel, PixArt, SD3, "
                          "FLUX and SANA transformers")


def _quiet_libraries() -> None:
    """Library chatter (progress bars, "requires torchvision" notices, config deprecations) would bury
    our own one-line errors on stderr; loading stays quiet unless it fails."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (transformers_logging, diffusers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def _require_pipeline_folder(folder: str, given_as: str = "") -> None:
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise CheckpointError(f"{folder}{given_as} is not a diffusers pipeline folder (model_index.json missing)")


def _single_file_pipeline_class(config: str):
    """The pipeline class named by the config folder's ``model_index.json``, if it loads single files."""
    import diffusers
    from diffusers.loaders import FromSingleFileMixin

    try:
        name = json.loads(Path(config, "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        raise CheckpointError(f"{config}/model_index.json is not readable JSON") from None
    pipeline_class = getattr(diffusers, str(name), None)
    if not isinstance(pipeline_class, type) or not issubclass(pipeline_class, FromSingleFileMixin):
        raise CheckpointError(f"--teacher-config {config} names {name!r}, which cannot load single-file checkpoints")
    return pipeline_class


def _check_single_file(path: str) -> None:
    """Refuse, from the tensor names alone, a file that is not an original (LDM-layout) SD checkpoint."""
    from wadi_analysis.checkpoint import open_file

    with open_file(Path(path)) as source:
        names = source.names()
    if not any(name.startswith(LDM_UNET_PREFIX) for name in names):
        raise CheckpointError(f"{path} is not an original single-file Stable Diffusion checkpoint (no "
                              f"{LDM_UNET_PREFIX}* weights); give a diffusers pipeline folder or such a file")


def _load_single_file(path: str, config: str | None):
    """A pipeline from an original single-file SD checkpoint, with every config, the tokenizer(s) and the
    scheduler from the local diffusers pipeline folder ``config``; nothing is downloaded."""
    _check_single_file(path)
    if config is None:
        raise CheckpointError(f"{path} is a single-file checkpoint: give --teacher-config, a local diffusers pipeline "
                              "folder of its architecture (configs, tokenizer, scheduler; its weights are not used)")
    _require_pipeline_folder(config, " (--teacher-config)")
    pipeline_class = _single_file_pipeline_class(config)
    return pipeline_class.from_single_file(path, config=config, local_files_only=True, safety_checker=None)


def _absent_components(folder: str) -> dict[str, None]:
    """Components a pipeline folder declares absent (``[null, null]`` in ``model_index.json``, e.g. the VAE
    of a pixel-space teacher), passed as None: diffusers would otherwise refuse the folder."""
    try:
        index = json.loads(Path(folder, "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: None for name, value in index.items() if not name.startswith("_") and value == [None, None]}


def load_teacher(path: str | os.PathLike, *, config: str | os.PathLike | None = None, text: bool = True,
                 flux_guidance: float | None = None) -> Teacher:
    """A teacher from a diffusers pipeline folder (denoiser, scheduler, VAE, text encoders, tokenizers), or
    from an original single-file SD checkpoint (``.safetensors``/``.ckpt``) read with diffusers'
    ``from_single_file`` against the local pipeline folder ``config`` (configs, tokenizers, scheduler).
    ``flux_guidance``: the guidance input of a guidance-distilled FLUX teacher (None: its pipeline's default);
    an :class:`InvalidValue` for any other teacher."""
    import warnings

    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    _quiet_libraries()
    source = os.fspath(path)
    config = None if config is None else os.fspath(config)
    single = os.path.isfile(source)
    if not single:
        if config is not None:
            raise CheckpointError(f"--teacher-config is for single-file teachers; {source} is not a file")
        _require_pipeline_folder(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if single:
                pipe = _load_single_file(source, config)
            else:
                pipe = DiffusionPipeline.from_pretrained(source, local_files_only=True,
                                                         **{"safety_checker": None, **_absent_components(source)})
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError, KeyError, NotImplementedError,
            SingleFileComponentError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyError):
            first = f"no tensor {exc.args[0]!r}" if exc.args else "a tensor is missing"
        if single:  # diffusers' converters fail in many ways on a file that does not fit the configs
            raise CheckpointError(f"cannot load the single-file teacher {source} with the configs of {config} "
                                  f"(an incomplete checkpoint, or another architecture): {first}") from None
        raise CheckpointError(f"cannot load the pipeline {source}: {first}") from None
    return with_flux_guidance(_teacher_from_pipeline(pipe, scheduler, source, text), flux_guidance, source)


def with_flux_guidance(teacher: Teacher, flux_guidance: float | None, source: str) -> Teacher:
    """``teacher`` with the guidance input ``flux_guidance`` (None: as loaded); an :class:`InvalidValue` where the
    teacher takes none (not FLUX, or a FLUX transformer without ``guidance_embeds``, e.g. FLUX.1-schnell)."""
    if flux_guidance is None:
        return teacher
    if teacher.guidance is None:
        from wadi_analysis.errors import InvalidValue

        raise InvalidValue(f"flux_guidance = {flux_guidance:g} is the guidance input of a guidance-distilled FLUX "
                           f"teacher (guidance_embeds); {source} takes none: leave flux_guidance unset")
    teacher.guidance = float(flux_guidance)
    return teacher


def _teacher_from_pipeline(pipe, scheduler, source: str, text: bool) -> Teacher:
    """Freeze the pipeline's networks and collect what distillation needs from it."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise CheckpointError(f"pipeline {source} has no unet or transformer")
    denoiser.requires_grad_(False)
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).requires_grad_(False)
    config = denoiser.config
    if _family(denoiser) == "flux":
        return _flux_teacher(pipe, denoiser, text)
    sigmas = flow_sigmas(pipe.scheduler)
    if sigmas is None and _family(denoiser) == "sana":  # e.g. SANA-Sprint's SCMScheduler (TrigFlow), a student
        raise CheckpointError(f"{source}: a SANA teacher needs a flow scheduler (FlowMatchEulerDiscreteScheduler, or "
                              f"DPM-Solver with flow sigmas and flow prediction), not {type(pipe.scheduler).__name__}")
    alphas_cumprod = scheduler.alphas_cumprod.double().clone() if sigmas is None else flow_alpha_bar(sigmas)
    return Teacher(denoiser=denoiser, family=_family(denoiser), alphas_cumprod=alphas_cumprod,
                   prediction_type=scheduler.config.prediction_type if sigmas is None else "flow",
                   pipeline=pipe if text else None, latent_channels=config.in_channels, sample_size=config.sample_size,
                   sigmas=sigmas)


def _flux_teacher(pipe, denoiser: nn.Module, text: bool) -> Teacher:
    """A FLUX teacher: latents of in_channels / 4 channels (packed 2 x 2 into the transformer's tokens) and the
    VAE's sample_size over its scale factor; sigmas at that size (:func:`.flow_schedule.flux_sigmas`); the guidance input of a
    guidance-distilled transformer: the pipeline's default ``guidance_scale`` (see the module docstring)."""
    import inspect

    size = pipe.vae.config.sample_size // pipe.vae_scale_factor
    sigmas = flux_sigmas(pipe.scheduler, size)
    guidance = None
    if denoiser.config.guidance_embeds:
        guidance = float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)
    return Teacher(denoiser=denoiser, family="flux", alphas_cumprod=flow_alpha_bar(sigmas), prediction_type="flow",
                   pipeline=pipe if text else None, latent_channels=denoiser.config.in_channels // 4,
                   sample_size=size, sigmas=sigmas, guidance=guidance)
