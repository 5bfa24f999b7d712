"""The one-step student as a complete diffusers pipeline: the teacher's components, the merged denoiser
and a scheduler on which ``pipe(prompt, num_inference_steps=1, guidance_scale=0.0)`` computes exactly
what :func:`wadi_distill.distill.one_step` computes.

The generator predicts x0 from pure noise at the last training timestep T - 1, converting its output
with a_T (the schedule's own last value, or the run's ``[vsd] alpha_T``). The scheduler written is
``DDIMScheduler`` on the teacher's betas with

- ``timestep_spacing="trailing"``: one step runs at t = T - 1. "leading" spacing (DDIM's default, and
  what SD's own schedulers use) runs a single step at t = 1, where the generator returns noise;
- ``set_alpha_to_one=True``: the step ends at a = 1, i.e. returns x0 itself, not x0 re-noised to a_0;
- no clipping or thresholding: the generator's x0 is used as it is.

DDIM's x0 at one step is then the very formula of :func:`wadi_distill.vsd.predicted_x0` (epsilon and v),
so the pipeline's latents equal the project's bit for bit (tested; ``LCMScheduler`` agrees to ~1e-10
through its boundary condition, the default DDIM does not at all). A run whose a_T differs from the
schedule's own gets the teacher's betas with only the last one replaced (``trained_betas``), so that the
schedule's last a is a_T and every earlier one is the teacher's; where no beta in (0, 1) does that
(a_T at or above a at T - 2, e.g. the published 0.0047 on PixArt's schedule, whose last a is ~4e-5,
the published PixArt weights of :mod:`wadi_distill.published` included), the schedule follows the
teacher's a until it falls below a_T and holds a_T from there to T - 1 (:func:`betas_held_at`): one
step reads only the last a, so the pipeline is still exactly the generator's step (several steps on
such a schedule are not the teacher's, and the export is meant for one).

A rectified-flow teacher (SD3: ``FlowMatchEulerDiscreteScheduler``) gets its own scheduler class instead, from
its own config (:func:`one_step_flow_scheduler`): the generator predicts x0 = x_sigma - sigma v from pure noise at
sigma_max (the last training sigma, shift included: 1 for a static shift), and one Euler step of that scheduler,
x + (sigma_next - sigma) v with timesteps [1000 sigma_max] and sigmas [sigma_max, 0], is that very formula. So
only the inference-time options that would move those two sigmas are switched off (``ONE_STEP_FLOW_SCHEDULER``:
Karras/exponential/beta sigmas, a terminal shift, inverted sigmas, stochastic steps); the shift stays the
teacher's, and the result is checked by running ``set_timesteps(1)``. A run's own ``[vsd] alpha_T`` (its x0 is
no Euler step from sigma_max) is refused. Resolution-dependent (dynamic) shifting moves every sigma but 1
(time_shift(mu, 1, 1) = 1 for every mu): FLUX's is kept, its one step checked at the config's lowest and highest
mu (``FluxPipeline`` computes mu from the image size); an SD3 teacher with it is refused (its loader refuses it).

A SANA teacher ships ``DPMSolverMultistepScheduler`` with flow sigmas, which cannot run that step: its one step
starts at shift(1 - 1/N) (0.99967 for shift 3, N = 1000), not sigma_max = 1, at the integer timestep 999. Its export
is a ``SanaPipeline`` with the ``FlowMatchEulerDiscreteScheduler`` of the same sigmas (``shift = flow_shift``,
:func:`wadi_distill.flow_schedule.flow_match_config`), which the pipeline runs as it is (it passes ``num_inference_steps``
or ``sigmas`` to ``set_timesteps`` and the step's generator only where the scheduler takes one).

A FLUX export is a ``FluxPipeline``: its ``guidance_scale`` is the guidance input of a guidance-distilled
transformer, not CFG, so the one-step call passes the teacher's (:func:`one_step_call`), and ``sample --guidance
G`` > 1 (CFG against the empty prompt) is the pipeline's ``true_cfg_scale=G`` with ``negative_prompt=""``. That input
is the run's ``flux_guidance`` (else the pipeline's default 3.5); ``FluxPipeline.__call__`` has no configurable
default (``guidance_scale=3.5`` is a keyword default, and ``model_index.json`` holds components only), so it is
a call argument: ``wadi_one_step.json`` records it as ``flux_guidance`` and in ``one_step_call``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from wadi_analysis.errors import UserError

from .flow_schedule import flow_match_config
from .teacher import Teacher

# What makes one DDIM step the generator's step (see the module docstring).
ONE_STEP_SCHEDULER = {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False,
                      "thresholding": False,
                      "steps_offset": 1}  # unused by trailing spacing; SD pipelines call another value outdated
DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# What makes one FlowMatchEulerDiscreteScheduler step the generator's step (see the module docstring).
ONE_STEP_FLOW_SCHEDULER = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                           "shift_terminal": None, "invert_sigmas": False, "stochastic_sampling": False}
# How each kind of export's scheduler makes one step the generator's (wadi_one_step.json records it).
SCHEDULER_SUMMARIES = {False: "DDIMScheduler (trailing, set_alpha_to_one)",
                       True: "FlowMatchEulerDiscreteScheduler (one Euler step from sigma_max to 0)"}
ONE_STEP_CALL = "pipe(prompt, num_inference_steps=1, guidance_scale=0.0)"


def teacher_betas(scheduler_config: dict) -> torch.Tensor:
    """The teacher's betas (float32) as its schedulers compute them; :func:`wadi_distill.teacher.load_teacher`
    takes the schedule's a from the same ``DDPMScheduler``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).betas.clone()


def betas_ending_at(betas: torch.Tensor, alpha_T: float) -> torch.Tensor:
    """``betas`` with the last one replaced so that the cumulative product of ``1 - betas`` (float32, as
    diffusers computes it) ends at ``alpha_T``; a :class:`UserError` where no beta in (0, 1) does that."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    before_last = float(alphas_cumprod[-2])
    last = 1.0 - alpha_T / before_last
    if not 0.0 < last < 1.0:
        raise UserError(
            f"the run's alpha_T = {alpha_T:.6g} cannot be the last a of a diffusers schedule that keeps this "
            f"teacher's (a at timestep {betas.numel() - 2} is {before_last:.6g}; alpha_T must lie below it), so no "
            "scheduler runs this generator in one step; `wadi-distill merge TEACHER RUN/generator_adapter.safetensors "
            "--out DIR` writes the merged denoiser alone")
    betas = betas.clone()
    betas[-1] = last
    return betas


def betas_held_at(betas: torch.Tensor, alpha_T: float) -> torch.Tensor:
    """``betas`` whose cumulative product is the teacher's while that lies above ``alpha_T`` and ``alpha_T`` from
    then on to the last timestep (one beta changed, the later ones 0): a schedule ending at an ``alpha_T`` above
    the teacher's a at T - 2 (the published 0.0047 on PixArt's schedule, whose a falls below it at t = 727). One
    step reads only its last a; several steps on it are not the teacher's. A :class:`UserError` for an
    ``alpha_T`` at or above the schedule's first a."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    below = (alphas_cumprod < alpha_T).nonzero()
    if below.numel() == 0 or int(below[0]) == 0:
        raise UserError(f"alpha_T = {alpha_T:.6g} must lie between this teacher's last and first a "
                        f"({float(alphas_cumprod[-1]):.6g}, {float(alphas_cumprod[0]):.6g})")
    first = int(below[0])
    held = betas.clone()
    held[first] = 1.0 - alpha_T / float(alphas_cumprod[first - 1])
    held[first + 1:] = 0.0
    return held


def one_step_scheduler(scheduler_config: dict, alpha_T: float):
    """A ``DDIMScheduler`` whose ``num_inference_steps=1`` is the generator's step: at T - 1, with a_T =
    ``alpha_T``, returning x0: the teacher's betas with the last one changed (:func:`betas_ending_at`), or,
    for an ``alpha_T`` at or above the teacher's a at T - 2, held from where the teacher's a falls below it
    (:func:`betas_held_at`); a :class:`UserError` for an ``alpha_T`` outside the teacher's range of a."""
    from diffusers import DDIMScheduler

    betas = teacher_betas(scheduler_config)
    settings = dict(ONE_STEP_SCHEDULER)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if alphas_cumprod[-1] != torch.tensor(alpha_T, dtype=torch.float32) or \
            scheduler_config.get("beta_schedule") not in DDIM_BETA_SCHEDULES:
        held = alpha_T >= float(alphas_cumprod[-2])
        # the betas themselves, already rescaled where the teacher rescales them (zero SNR)
        trained = betas_held_at(betas, alpha_T) if held else betas_ending_at(betas, alpha_T)
        settings.update(trained_betas=trained.tolist(), rescale_betas_zero_snr=False)
    return DDIMScheduler.from_config(scheduler_config, **settings)


def one_step_flow_scheduler(scheduler_config: dict, sigma_max: float, dynamic: bool = False):
    """A ``FlowMatchEulerDiscreteScheduler`` on the teacher's config (its shift kept) whose
    ``num_inference_steps=1`` is the generator's step: timesteps [1000 sigma_max], sigmas [sigma_max, 0], so
    the step x + (0 - sigma_max) v is x0 = x_sigma - sigma v at sigma_max; a :class:`UserError` for dynamic
    shifting unless ``dynamic`` (FLUX: then checked at the config's base and max shift as mu) or a config on which
    one step does not run so (checked by ``set_timesteps(1)``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if scheduler_config.get("use_dynamic_shifting") and not dynamic:
        raise UserError("a flow teacher with dynamic (resolution-dependent) shifting cannot be exported as a one-step "
                        "pipeline: its one step's sigma would depend on the image size")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **ONE_STEP_FLOW_SCHEDULER)
    config = scheduler.config
    mus = (config.get("base_shift", 0.5), config.get("max_shift", 1.15)) if config.use_dynamic_shifting else (None,)
    expected = torch.tensor([sigma_max, 0.0], dtype=torch.float32)
    for mu in mus:
        probe = FlowMatchEulerDiscreteScheduler.from_config(config)
        probe.set_timesteps(1, mu=mu)
        if not torch.equal(probe.sigmas.float(), expected) or \
                not torch.equal(probe.timesteps.float(), expected[:1] * probe.config.num_train_timesteps):
            raise UserError(f"this flow teacher's scheduler does not run one step from sigma_max = {sigma_max:.6g} to "
                            f"0 (its sigmas: {probe.sigmas.tolist()}), so no one-step pipeline is written")
    return scheduler


def one_step_scheduler_for(teacher: Teacher, alpha_T: float):
    """The export's scheduler for ``teacher``: :func:`one_step_flow_scheduler` for a flow teacher (whose one step
    starts at its sigma_max, a = 0: an ``alpha_T`` other than the schedule's own is refused), else
    :func:`one_step_scheduler` with ``alpha_T``."""
    if teacher.sigmas is None:
        return one_step_scheduler(teacher.pipeline.scheduler.config, alpha_T)
    if alpha_T != float(teacher.alphas_cumprod[-1]):
        raise UserError(f"the run's [vsd] alpha_T = {alpha_T:.6g} has no one-step pipeline on a flow teacher, whose "
                        "one Euler step starts at sigma_max (a = 0); export runs that leave alpha_T unset")
    return one_step_flow_scheduler(flow_match_config(teacher.pipeline.scheduler), float(teacher.sigmas[-1]),
                                   dynamic=teacher.family == "flux")


def one_step_call(teacher: Teacher) -> str:
    """The export's one-step call, for ``wadi_one_step.json``: ``guidance_scale=0.0`` (no CFG), or for a
    guidance-distilled teacher (FLUX.1-dev) its guidance input, which is what FluxPipeline's ``guidance_scale`` is."""
    if teacher.guidance is not None:
        return f"pipe(prompt, num_inference_steps=1, guidance_scale={teacher.guidance:g})"
    return ONE_STEP_CALL


def scheduler_summary(teacher: Teacher) -> str:
    """How the export's scheduler makes its one step the generator's, for ``wadi_one_step.json``."""
    return SCHEDULER_SUMMARIES[teacher.sigmas is not None]


def write_pipeline(teacher: Teacher, merged: nn.Module, scheduler, out: Path) -> str:
    """The teacher's pipeline with ``merged`` as its denoiser and ``scheduler`` as its scheduler, saved to ``out``
    (safetensors; no absolute path in any config), and ``out`` itself also a model folder of ``merged`` (hard
    links to the denoiser's files where the filesystem allows, copies otherwise). Returns the pipeline's class."""
    pipe = teacher.pipeline
    if pipe is None:
        raise ValueError("the teacher was loaded without its pipeline")
    pipe.register_modules(**{teacher.component: merged, "scheduler": scheduler})
    pipe.save_pretrained(out, safe_serialization=True)
    _drop_recorded_paths(out)
    _mirror_files(out / teacher.component, out)
    return type(pipe).__name__


def _drop_recorded_paths(out: Path) -> None:
    """diffusers writes ``_name_or_path`` (where each part was loaded from, an absolute path) into every
    config; an export records no path, so it can be moved."""
    for path in [out / "model_index.json", *out.glob("*/config.json"), *out.glob("*/scheduler_config.json")]:
        config = json.loads(path.read_text())
        if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _mirror_files(folder: Path, out: Path) -> None:
    """Every file of ``folder`` also under ``out`` (a hard link, else a copy): the same files twice, one copy on disk."""
    for path in folder.iterdir():
        try:
            os.link(path, out / path.name)
        except OSError:  # no hard links here (another filesystem, FAT, some network shares)
            shutil.copyfile(path, out / path.name)
