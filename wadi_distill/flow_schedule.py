"""Flow-matching schedules of a teacher's scheduler: the training sigmas (shift included) of SD3, SANA and
FLUX schedulers, and the ``FlowMatchEulerDiscreteScheduler`` config that stands for each of them."""

from __future__ import annotations

import torch

from wadi_analysis.checkpoint import CheckpointError


def flux_sigmas(scheduler, size: int) -> torch.Tensor:
    """A FLUX teacher's training sigmas (ascending, as :func:`flow_sigmas`) at latents of ``size`` x ``size``:
    with dynamic shifting, the scheduler's ``time_shift`` at the mu ``FluxPipeline`` computes for
    (size / 2)^2 tokens (``calculate_shift``); else the static shift of :func:`flow_sigmas`."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if not scheduler.config.get("use_dynamic_shifting"):
        return flow_sigmas(scheduler)
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # unshifted before set_timesteps
    config = fresh.config
    mu = calculate_shift((size // 2) ** 2, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return fresh.time_shift(mu, 1.0, fresh.sigmas.double()).flip(0).clone()


def flow_match_config(scheduler) -> dict | None:
    """The ``FlowMatchEulerDiscreteScheduler`` config of a flow-matching scheduler: a FlowMatch* scheduler's own;
    for SANA's ``DPMSolverMultistepScheduler`` with flow sigmas and flow prediction, ``num_train_timesteps`` and
    ``shift = flow_shift`` (its sigmas shift(1 - i/N) are this scheduler's; a dynamic shift is refused with it);
    None for any other scheduler."""
    config = dict(scheduler.config)
    if type(scheduler).__name__.startswith("FlowMatch"):
        return config
    if config.get("use_flow_sigmas") and config.get("prediction_type") == "flow_prediction":
        return {"num_train_timesteps": config["num_train_timesteps"], "shift": config.get("flow_shift", 1.0),
                "use_dynamic_shifting": bool(config.get("use_dynamic_shifting"))}
    return None


def flow_sigmas(scheduler) -> torch.Tensor | None:
    """A flow-matching scheduler's training sigmas (shift included), ascending so that timestep i has the
    i-th least noise and the last is sigma_max = 1; None for any other scheduler (:func:`flow_match_config`)."""
    config = flow_match_config(scheduler)
    if config is None:
        return None
    from diffusers import FlowMatchEulerDiscreteScheduler

    fresh = FlowMatchEulerDiscreteScheduler.from_config(config)  # before any set_timesteps
    if fresh.config.use_dynamic_shifting:
        raise CheckpointError("flow teachers with dynamic (resolution-dependent) shifting are not supported yet")
    return fresh.sigmas.double().flip(0).clone()
