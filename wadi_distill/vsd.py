"""Variational Score Distillation, as in WaDi §3: plain functions over tensors, one per equation.

Notation: ``alpha_bar`` is the teacher schedule's cumulative product a_t (a tensor broadcastable to
the latents, e.g. shape (B, 1, 1, 1)); ``prediction_type`` is the network's parametrisation:
"epsilon" (noise), "v_prediction" (v = sqrt(a) eps - sqrt(1 - a) x0), "sample" (x0 itself) or "flow" (a
rectified-flow velocity eps - x0, at the VP level a(sigma) of flow_alpha_bar; see flow_* below).
Flow-matching teachers (``flow_*``) use ``sigma`` instead: x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0;
``flow_as_epsilon`` maps them onto the eps equations, so the losses below serve both. Loss levels of a flow
teacher are drawn as for any teacher, uniform over its schedule's indices, whose levels are the shifted sigmas
(``Teacher.sigmas``, from ``flow_schedule.flow_sigmas``): sigma is drawn with the teacher's shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# fake-score prompt dropout: each sample alone (ours), or the whole batch at once (the published code)
DROPOUT_SCOPES = ("sample", "batch")


@dataclass
class VSDConfig:
    guidance_real: float = 1.5       # CFG scale of the teacher (real score)
    guidance_fake: float = 1.5       # CFG scale of the fake score
    t_min: int = 20                  # generator-loss timesteps ~ U[t_min, t_max]
    t_max: int = 980
    fake_t_min: int = 0              # fake-score timesteps ~ U[fake_t_min, fake_t_max]
    fake_t_max: int = 999
    prompt_dropout: float = 0.1      # fake-score steps: prompt -> null prompt with this probability
    prompt_dropout_scope: str = "sample"  # per sample, or "batch": the whole batch together (published)
    alpha_T: float | None = None     # one-step a_T; None: the teacher schedule's own last value (published: 0.0047)
    generator_weighting: str = "published"  # how the score difference becomes x0's gradient (GENERATOR_WEIGHTINGS)
    fake_weighting: str = "published"       # the fake score's denoising-loss weight over t (FAKE_WEIGHTINGS)


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Losses are reduced in float32 at least, even when the networks ran in fp16/bf16."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def predicted_x0(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from a network output at x_t:
    epsilon: (x_t - sqrt(1 - a) eps) / sqrt(a);  v: sqrt(a) x_t - sqrt(1 - a) v;  sample: the output."""
    if prediction_type == "epsilon":
        return (noisy - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * output
    if prediction_type == "sample":
        return output
    if prediction_type == "flow":
        return flow_x0(output, noisy * _flow_scale_from(alpha_bar), _sigma_from(alpha_bar))
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}")


def predicted_epsilon(output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """eps from a network output at x_t:
    epsilon: the output;  v: sqrt(a) v + sqrt(1 - a) x_t;  sample: (x_t - sqrt(a) x0) / sqrt(1 - a)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * noisy
    if prediction_type == "sample":
        return (noisy - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    if prediction_type == "flow":
        return flow_epsilon(output, noisy * _flow_scale_from(alpha_bar), _sigma_from(alpha_bar))
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}")


# --- rectified flow (SD3, FLUX, SANA): x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0 ---

def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps."""
    return (1 - sigma) * x0 + sigma * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = eps - x0 (= d x_sigma / d sigma), what flow-matching transformers predict."""
    return noise - x0


def flow_x0(velocity: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_sigma - sigma v."""
    return noisy - sigma * velocity


def flow_epsilon(velocity: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = x_sigma + (1 - sigma) v."""
    return noisy + (1 - sigma) * velocity


def shifted_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift sigma / (1 + (shift - 1) sigma), as FlowMatchEulerDiscreteScheduler (static shift);
    shift 1 is the identity, sigma = 1 stays 1 (pure noise) for every shift."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_scale(sigma: torch.Tensor) -> torch.Tensor:
    """s(sigma) = sqrt((1 - sigma)^2 + sigma^2): x_sigma / s is a variance-preserving x_t (see flow_alpha_bar)."""
    return ((1 - sigma) ** 2 + sigma ** 2).sqrt()


def flow_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """The VP level of a flow level:  a(sigma) = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2).

    x_sigma / s = ((1 - sigma) / s) x0 + (sigma / s) eps = sqrt(a) x0 + sqrt(1 - a) eps with the same eps, so
    add_noise(x0, eps, a) = x_sigma / s and every eps-space equation above applies unchanged."""
    return (1 - sigma) ** 2 / flow_scale(sigma) ** 2


def flow_as_epsilon(velocity: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A flow prediction in the eps teachers' units: (eps, x_t, a_t) =
    (x_sigma + (1 - sigma) v,  x_sigma / s(sigma),  a(sigma)), ready for generator_loss / fake_score_loss."""
    return flow_epsilon(velocity, noisy, sigma), noisy / flow_scale(sigma), flow_alpha_bar(sigma)


def flow_published_gradient(v_real: torch.Tensor, v_fake: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The published VSD weighting for a flow teacher, in velocity units:
    g = sigma^2 (1 - sigma) / ((1 - sigma)^2 + sigma^2) (v_real - v_fake).

    Derivation: x_sigma = s x_t with x_t at a = a(sigma) and the same eps (flow_alpha_bar), so the flow
    teacher is an eps teacher at level a; the published g = (1 - a)(e_real - e_fake) carries over with
    1 - a = sigma^2 / s^2, and at the same x_sigma e_real - e_fake = (1 - sigma)(v_real - v_fake)
    (flow_epsilon). It vanishes at sigma = 1, where x_sigma is pure noise and says nothing about x0."""
    return sigma ** 2 * (1 - sigma) / flow_scale(sigma) ** 2 * (v_real - v_fake)


def _sigma_from(alpha_bar: torch.Tensor) -> torch.Tensor:
    """flow_alpha_bar inverted:  sigma = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))."""
    return (1 - alpha_bar).sqrt() / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())


def _flow_scale_from(alpha_bar: torch.Tensor) -> torch.Tensor:
    """s(sigma) at a = a(sigma):  s = 1 / (sqrt(a) + sqrt(1 - a)), so x_sigma = s x_t."""
    return 1 / (alpha_bar.sqrt() + (1 - alpha_bar).sqrt())


def guided(unconditional: torch.Tensor, conditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: e_uncond + scale (e_cond - e_uncond)."""
    return unconditional + scale * (conditional - unconditional)


def published_gradient(x0: torch.Tensor, noisy: torch.Tensor, eps_real: torch.Tensor, eps_fake: torch.Tensor,
                       alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The published weighting:  g = (1 - a_t)(e_real - e_fake)."""
    return (1 - alpha_bar_t) * (eps_real - eps_fake)


def dmd_gradient(x0: torch.Tensor, noisy: torch.Tensor, eps_real: torch.Tensor, eps_fake: torch.Tensor,
                 alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """DMD's normalised weighting (Yin et al. 2024, eq. 8), in x0 space:
    g = (x0_fake - x0_real) / mean_chw |x0 - x0_real|,  x0_s = (x_t - sqrt(1 - a_t) e_s) / sqrt(a_t).

    x0_fake - x0_real = sqrt((1 - a_t) / a_t)(e_real - e_fake): the published direction, each sample
    scaled by how far the teacher's denoised estimate lies from it, so no timestep or sample dominates."""
    x0_real = predicted_x0(eps_real, noisy, alpha_bar_t, "epsilon")
    x0_fake = predicted_x0(eps_fake, noisy, alpha_bar_t, "epsilon")
    scale = (x0.detach() - x0_real).abs().flatten(1).mean(1).clamp_min(1e-8)
    return (x0_fake - x0_real) / scale.view(-1, *([1] * (x0.dim() - 1)))


GENERATOR_WEIGHTINGS = {"published": published_gradient, "dmd": dmd_gradient}


def generator_loss(x0: torch.Tensor, eps_real: torch.Tensor, eps_fake: torch.Tensor,
                   alpha_bar_t: torch.Tensor, noisy: torch.Tensor | None = None,
                   weighting: str = "published") -> torch.Tensor:
    """VSD generator loss:  g = nan_to_num(weighting(e_real - e_fake));  L = 0.5 mse(x0, sg(x0 - g)).

    Its gradient with respect to x0 is g / N (N = number of elements): the score difference pushes the
    generator's samples from where the fake score says they are towards where the teacher says data is.
    ``noisy`` (x_t) is needed by weightings that work in x0 space ("dmd").
    """
    gradient = torch.nan_to_num(GENERATOR_WEIGHTINGS[weighting](
        _full_precision(x0), None if noisy is None else _full_precision(noisy), _full_precision(eps_real),
        _full_precision(eps_fake), _full_precision(alpha_bar_t)))
    target = (x0 - gradient).detach()
    return 0.5 * F.mse_loss(_full_precision(x0), _full_precision(target))


# the fake score's denoising-loss weight w(a_t) on eps:  published sqrt(a_t) (so a_t on the squared error),
# "uniform" 1 (DDPM's simple loss, the one the teacher was trained with)
FAKE_WEIGHTINGS = {"published": lambda alpha_bar_t: alpha_bar_t.sqrt(), "uniform": torch.ones_like}


def fake_score_loss(eps_predicted: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor,
                    weighting: str = "published") -> torch.Tensor:
    """Fake-score denoising loss:  L = mse(w(a_t) eps_fake(x_t), w(a_t) eps), w from FAKE_WEIGHTINGS."""
    weight = FAKE_WEIGHTINGS[weighting](alpha_bar_t)
    return F.mse_loss(_full_precision(weight * eps_predicted), _full_precision(weight * noise))
