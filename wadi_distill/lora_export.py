"""The merged change of a one-step generator as a LoRA: W' = W + ΔW, ΔW ≈ up @ down by truncated SVD.

LoRaD rotates weight rows, which no sum of a low-rank term expresses exactly, and a full fine-tune or a
plan may change a layer at any rank; so this LoRA is an approximation of the merged model whose error is
measured and written beside it (``lora_layers.csv``, :meth:`LayerLoRA.row`; ``lora_report.json``, :func:`report`).

The math, for one layer with weight (o, i) or a conv kernel (o, i, kh, kw):

- a conv kernel is the matrix (o, i·kh·kw), flattened row-major (:func:`as_matrix`), as kohya, peft and
  diffusers store conv LoRAs: down is a (r, i, kh, kw) conv with the layer's stride and padding, up a 1×1
  conv (o, r, 1, 1), and up @ down (flattened) is the kernel's change (:func:`factor_shapes`);
- ΔW = U S Vᵀ (float64); ΔW_r = (U_r S_r^½)(S_r^½ V_rᵀ) = up @ down, the best rank-r approximation in
  Frobenius norm (Eckart–Young), the singular values split evenly so neither factor is tiny in fp16
  (:func:`truncated_factors`);
- the error of layer l is e_l = ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F = (Σ_{k>r} s_k² / Σ_k s_k²)^½ in exact
  arithmetic, measured on the stored float32 factors; the total is (Σ_l ‖ΔW_l − ΔW_l,r‖² / Σ_l ‖ΔW_l‖²)^½
  (:func:`total_relative_error`);
- the rank: ``rank`` R gives min(R, min(o, i·kh·kw)); ``energy`` E gives the smallest r with
  Σ_{k≤r} s_k² ≥ E Σ_k s_k², E = 1 the full rank (:func:`energy_rank`); both give the energy rank capped at R
  (:func:`choose_rank`). Scale 1: alpha = r, so the loaders' alpha / r is 1.

The layers: every Linear and single-group Conv2d; a grouped (depthwise) conv has no LoRA layout, so its
change is listed with the biases and norms a LoRA does not hold (:func:`has_lora_layout`, :func:`other_changes`).
Key names and file layouts are :mod:`wadi_distill.lora_keys`'s; this module computes and reports.
"""

from __future__ import annotations

import csv
import io
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from wadi_analysis.errors import InvalidValue

from . import lora_keys

LORA_FOLDER = "lora"  # inside an export
LAYERS_CSV = "lora_layers.csv"
REPORT_JSON = "lora_report.json"
CHECK_PROMPTS = ("a photo of a bag", "")  # runs without validation prompts; "" is the null conditioning
CHECK_SEED = 0
LAYER_KINDS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LoRASettings:
    """How the rank of each layer's LoRA is chosen (see the module docstring): ``rank`` R and/or ``energy`` E."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise InvalidValue(f"--lora-rank must be a whole number >= 1 (got {self.rank!r})")
        if self.energy is not None and (isinstance(self.energy, bool) or not isinstance(self.energy, (int, float))
                                        or not math.isfinite(self.energy) or not 0 < self.energy <= 1):
            raise InvalidValue(f"--lora-energy must be a number in (0, 1], the share of the change's squared "
                               f"singular values to keep (got {self.energy!r})")
        if self.rank is None and self.energy is None:
            raise InvalidValue("a LoRA export needs --lora-rank, --lora-energy or both")


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the matrix (o, i) or, for a conv kernel (o, i, kh, kw), (o, i·kh·kw) row-major."""
    return weight.reshape(weight.shape[0], -1)


def full_rank(shape: torch.Size | tuple[int, ...]) -> int:
    """min(o, i·kh·kw): the largest rank a change of this weight can have."""
    return min(shape[0], math.prod(shape[1:]))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r >= 1 with Σ_{k≤r} s_k² ≥ energy · Σ_k s_k² (s sorted descending, not all zero);
    ``energy`` = 1 keeps every value (the full rank: the LoRA is then exact), however small the last ones."""
    squares = singular_values.double() ** 2
    if energy >= 1:  # a share that rounds to 1 before the last value must not end the count early
        return len(squares)
    share = torch.cumsum(squares, 0) / squares.sum()
    # rounding may leave the last share a hair below ``energy``: then every value is needed
    return min(int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype))) + 1, len(squares))


def choose_rank(singular_values: torch.Tensor, settings: LoRASettings) -> int:
    """The rank of one layer: ``settings.rank`` capped at the full rank, the energy rank, or the energy rank
    capped at ``settings.rank`` when both are given."""
    rank = len(singular_values)
    if settings.energy is not None:
        rank = energy_rank(singular_values, settings.energy)
    return rank if settings.rank is None else min(rank, settings.rank)


def truncated_factors(delta: torch.Tensor, settings: LoRASettings) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (o, r), down (r, n), kept energy Σ_{k≤r} s_k² / Σ s_k²) of the matrix ``delta`` (o, n):
    up = U_r S_r^½, down = S_r^½ V_rᵀ, both float32; computed in float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = choose_rank(s, settings)
    root = s[:rank].sqrt()
    kept = float((s[:rank] ** 2).sum() / (s ** 2).sum())
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), kept


def factor_shapes(up: torch.Tensor, down: torch.Tensor, weight_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as the LoRA layers hold them: Linear up (o, r), down (r, i); Conv2d up (o, r, 1, 1),
    down (r, i, kh, kw) (the inverse of :func:`as_matrix`)."""
    if len(weight_shape) == 2:
        return up.contiguous(), down.contiguous()
    return up[:, :, None, None].contiguous(), down.reshape(down.shape[0], *weight_shape[1:]).contiguous()


def low_rank_change(up: torch.Tensor, down: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """ΔW_r = up @ down in the weight's shape, float64 (either factor layout)."""
    return (as_matrix(up).double() @ as_matrix(down).double()).reshape(weight_shape)


@dataclass
class LayerLoRA:
    """One changed layer: its LoRA factors (float32, in the layers' shapes) and how well they reproduce ΔW."""

    name: str
    kind: str  # linear | conv
    shape: tuple[int, ...]
    up: torch.Tensor
    down: torch.Tensor
    full_rank: int
    energy_kept: float
    change_norm: float  # ‖ΔW‖_F
    residual_norm: float  # ‖ΔW − up @ down‖_F, of the stored factors

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def relative_error(self) -> float:
        return self.residual_norm / self.change_norm

    def row(self) -> dict:
        """The layer's line of ``lora_layers.csv``."""
        return {"name": self.name, "kind": self.kind, "shape": "x".join(map(str, self.shape)), "rank": self.rank,
                "full_rank": self.full_rank, "energy_kept": self.energy_kept, "change_norm": self.change_norm,
                "relative_error": self.relative_error, "parameters": self.up.numel() + self.down.numel()}


def layer_lora(name: str, teacher: torch.Tensor, merged: torch.Tensor, settings: LoRASettings) -> LayerLoRA:
    """The LoRA of one layer's change ΔW = merged − teacher (non-zero), with its measured error."""
    delta = merged.double() - teacher.double()
    up, down, kept = truncated_factors(as_matrix(delta), settings)
    up, down = factor_shapes(up, down, delta.shape)
    residual = float(torch.linalg.vector_norm(delta - low_rank_change(up, down, delta.shape)))
    return LayerLoRA(name, "linear" if delta.ndim == 2 else "conv", tuple(delta.shape), up, down,
                     full_rank(delta.shape), kept, float(torch.linalg.vector_norm(delta)), residual)


def total_relative_error(layers: list[LayerLoRA]) -> float:
    """(Σ_l ‖ΔW_l − ΔW_l,r‖² / Σ_l ‖ΔW_l‖²)^½ over the changed layers."""
    return math.sqrt(sum(l.residual_norm ** 2 for l in layers) / sum(l.change_norm ** 2 for l in layers))


def teacher_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's weight of every Linear/Conv2d of ``model`` before its adapter is merged, by module name.

    A LoRaD module's stored weight and a peft layer's base weight are copied (merging rewrites them in
    place); a plain module's weight is only referenced (merging leaves it, and a fully fine-tuned
    generator is a separate model whose teacher this is)."""
    from torch.nn.utils import parametrize

    from .lorad.model import base_weight

    # peft layers (duck-typed as peft's own BaseTunerLayer is): their base layer and factors are modules inside
    peft = [name for name, m in model.named_modules() if hasattr(m, "get_base_layer") and hasattr(m, "lora_A")]
    weights = {}
    for name, module in model.named_modules():
        if name in peft:
            weights[name] = module.get_base_layer().weight.detach().clone()
        elif isinstance(module, LAYER_KINDS) and not any(name.startswith(p + ".") for p in peft):
            weight = base_weight(module).detach()
            weights[name] = weight.clone() if parametrize.is_parametrized(module, "weight") else weight
    return weights


def has_lora_layout(module: nn.Module) -> bool:
    """A Linear, or a Conv2d of one group. A grouped (e.g. SANA's depthwise) conv's kernel (o, i/g, kh, kw) acts
    on its group's inputs only; the LoRA layout, a down conv over all inputs then a 1×1 up conv, has no such
    product (peft's grouped conv LoRA is a different factorisation), so its change is reported, not exported."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def changed_layers(teacher: dict[str, torch.Tensor], merged: nn.Module) -> list[str]:
    """The Linear/Conv2d layers of ``merged`` with a LoRA layout whose weight differs from ``teacher``'s, in
    model order."""
    return [name for name, m in merged.named_modules() if has_lora_layout(m)
            and not torch.equal(m.weight.detach(), teacher[name])]


def other_changes(teacher_model: nn.Module, merged: nn.Module, teacher: dict[str, torch.Tensor] | None = None
                  ) -> list[str]:
    """The changed tensors no LoRA holds, by state-dict key: biases, norms, embeddings (a fully fine-tuned
    generator's; none for an adapter run, whose merged model is its teacher's own) and, given the teacher's
    weights ``teacher``, the weights of changed layers without a LoRA layout (:func:`has_lora_layout`)."""
    grouped = [f"{name}.weight" for name, m in merged.named_modules() if isinstance(m, LAYER_KINDS)
               and not has_lora_layout(m) and teacher is not None and not torch.equal(m.weight.detach(), teacher[name])]
    if teacher_model is merged:
        return grouped
    weights = {f"{name}.weight" for name, m in merged.named_modules() if isinstance(m, LAYER_KINDS)}
    theirs = teacher_model.state_dict()
    return [k for k, v in merged.state_dict().items()
            if k not in weights and k in theirs and not torch.equal(v, theirs[k])] + grouped


def build(teacher: dict[str, torch.Tensor], merged: nn.Module, settings: LoRASettings) -> list[LayerLoRA]:
    """The LoRA of every Linear/Conv2d of ``merged`` whose weight differs from ``teacher``'s, in model order."""
    modules = dict(merged.named_modules())
    return [layer_lora(name, teacher[name], modules[name].weight.detach(), settings)
            for name in changed_layers(teacher, merged)]


@contextmanager
def lora_applied(teacher_model: nn.Module, teacher: dict[str, torch.Tensor], layers: list[LayerLoRA]):
    """The teacher's denoiser with the LoRA loaded, W + up @ down in each LoRA layer, while the block runs;
    its weights are put back after. (An adapter run's teacher model is the merged model itself, whose other
    tensors are the teacher's, but for layers without a LoRA layout, which get the teacher's weight back here;
    a full fine-tune's is the teacher, apart from the merged copy.)"""
    modules = dict(teacher_model.named_modules())
    kept = {}
    try:
        for layer in layers:
            module = modules[layer.name]
            kept[layer.name] = module.weight
            value = teacher[layer.name].double() + low_rank_change(layer.up, layer.down, module.weight.shape)
            module.weight = nn.Parameter(value.to(module.weight.dtype), requires_grad=False)
        for name, module in modules.items():  # what a loader of the LoRA leaves as the teacher's
            if isinstance(module, LAYER_KINDS) and not has_lora_layout(module) and not torch.equal(
                    module.weight.detach(), teacher[name]):
                kept[name] = module.weight
                module.weight = nn.Parameter(teacher[name].clone(), requires_grad=False)
        yield teacher_model
    finally:
        for name, weight in kept.items():
            modules[name].weight = weight


@torch.no_grad()
def output_difference(bundle, merged: nn.Module, teacher: dict[str, torch.Tensor], layers: list[LayerLoRA],
                      vsd, prompts: list[str]) -> dict:
    """One-step latents and decoded images of the teacher + LoRA against the merged model, on the same noise
    (seed :data:`CHECK_SEED`) and ``prompts``, one conditional pass: max and mean absolute difference of the
    latents, the max relative to the merged latents' largest value, the max in grey levels (0-255).
    ``bundle`` is the teacher (:class:`wadi_distill.teacher.Teacher`); its denoiser gets the LoRA."""
    from .sampling import decode, initial_noise, one_step_sample

    noise = initial_noise(bundle, len(prompts), CHECK_SEED)
    conditioning = bundle.encode(prompts)
    models = {id(m): (m, m.training) for m in (merged, bundle.denoiser)}  # one model, for adapter runs
    for model, _ in models.values():
        model.eval()
    reference = one_step_sample(bundle, merged, noise, conditioning, vsd)
    with lora_applied(bundle.denoiser, teacher, layers) as loaded:
        approximate = one_step_sample(bundle, loaded, noise, conditioning, vsd)
    for model, training in models.values():
        model.train(training)
    difference = (approximate - reference).abs().float()
    images = torch.from_numpy(decode(bundle, approximate).astype("int16") -
                              decode(bundle, reference).astype("int16")).abs()
    return {"prompts": list(prompts), "seed": CHECK_SEED, "latents_max_abs_difference": float(difference.max()),
            "latents_mean_abs_difference": float(difference.mean()),
            "latents_relative_max_difference": float(difference.max() / reference.abs().max().clamp_min(1e-30)),
            "image_max_abs_difference": int(images.max())}


def check_prompts(config: dict) -> list[str]:
    """The prompts of the output check: the run's first two validation prompts, else :data:`CHECK_PROMPTS`."""
    recorded = config.get("validation_prompts")
    usable = isinstance(recorded, list) and recorded and all(isinstance(p, str) for p in recorded)
    return list(recorded if usable else CHECK_PROMPTS)[:2]


def report(layers: list[LayerLoRA], settings: LoRASettings, files: dict[str, str | None], outputs: dict,
           not_in_lora: list[str]) -> dict:
    """``lora_report.json``: the rank criterion, files, layer count, ranks, parameters, total relative
    error and the one-step output difference."""
    ranks = [l.rank for l in layers]
    return {"criterion": asdict(settings), "files": files, "layers": len(layers),
            "rank_min": min(ranks), "rank_max": max(ranks), "parameters": sum(l.row()["parameters"] for l in layers),
            "total_relative_error": total_relative_error(layers),
            "max_layer_relative_error": max(l.relative_error for l in layers),
            "one_step": outputs, "changes_not_in_lora": not_in_lora, "scale": "alpha = rank (scale 1)"}


def layers_csv(layers: list[LayerLoRA]) -> str:
    """``lora_layers.csv``: one row per changed layer (:meth:`LayerLoRA.row`)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(layers[0].row()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(l.row() for l in layers)
    return text.getvalue()


def write(folder: Path, layers: list[LayerLoRA], family: str, component: str, denoiser: nn.Module,
          summary: dict) -> None:
    """The LoRA files (:mod:`wadi_distill.lora_keys`), ``lora_layers.csv`` and ``lora_report.json`` in ``folder``
    (inside an export's staged folder)."""
    folder.mkdir()
    lora_keys.write_files(folder, layers, family, component, denoiser)
    (folder / LAYERS_CSV).write_text(layers_csv(layers))
    (folder / REPORT_JSON).write_text(json.dumps(summary, indent=2) + "\n")


def read_report(folder: Path) -> dict:
    """The ``lora_report.json`` of an export's LoRA folder."""
    return json.loads((Path(folder) / REPORT_JSON).read_text())


def summary_line(summary: dict) -> str:
    """What ``export`` prints about the LoRA."""
    one_step = summary["one_step"]
    return (f"LoRA of {summary['layers']} changed layers, ranks {summary['rank_min']}-{summary['rank_max']}, "
            f"{summary['parameters']:,} parameters: total relative error {summary['total_relative_error']:.4g}; "
            f"one-step difference to the merged model: latents max {one_step['latents_max_abs_difference']:.3g} "
            f"(relative {one_step['latents_relative_max_difference']:.3g}), images max "
            f"{one_step['image_max_abs_difference']} grey levels"
            + (f"; {len(summary['changes_not_in_lora'])} other changed tensors (biases, norms, grouped convs) are "
               "not in it" if summary["changes_not_in_lora"] else "")
            + ("; diffusers/peft file only (no kohya layout for this denoiser)" if not summary["files"].get("kohya")
               else ""))
