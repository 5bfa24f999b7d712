"""Model surgery for LoRaD: several named adapters on one frozen base model.

Each adapted Linear/Conv2d gets a ``torch.nn.utils.parametrize`` parametrization of its ``weight``:
``module.weight`` *is* the rotated weight whenever an adapter is active, so the module's own forward
runs its single matmul/convolution on it, and any code that reads ``.weight`` sees the adapted
value. With no adapter active, ``weight`` is the frozen base weight: one model serves as teacher
(no adapter), generator (large-rank adapter) and fake score (small-rank adapter).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from wadi_analysis.geometry import row_width

from .rotation import RotationAdapter, rotate_rows

ADAPTABLE = (nn.Linear, nn.Conv2d)


class LoRaDParametrization(nn.Module):
    """Holds every adapter of one weight; applies the active one (or none)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None  # an adapter whose rotation is already in the base weight

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.active is None or self.active not in self.adapters or self.active == self.merged:
            return weight
        theta = self.adapters[self.active].theta()
        # Angles and the rotation in float32 (theta's dtype); one cast back to the base dtype.
        return rotate_rows(weight, theta).to(weight.dtype)


def lorad_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoRaDParametrization]]:
    """(name, module, parametrization) for every LoRaD-adapted module of ``model``."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LoRaDParametrization):
                    yield name, module, p


def base_weight(module: nn.Module) -> torch.Tensor:
    """The stored (unrotated, or merged) weight of an adapted or plain module."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def add_adapter(model: nn.Module, name: str, targets: dict[str, int], seed: int = 0) -> int:
    """Attach adapter ``name`` with the given rank per module name; returns its parameter count.

    The base weights are frozen. The new adapter is not activated (see :func:`set_adapter`).
    """
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in the model ({len(missing)} missing targets)")
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    count = 0
    for module_name, rank in targets.items():
        module = modules[module_name]
        if not isinstance(module, ADAPTABLE):
            raise ValueError(f"{module_name} is a {type(module).__name__}; LoRaD adapts Linear and Conv2d")
        parametrization = next((p for _, m, p in lorad_modules(module) if m is module), None)
        if parametrization is None:
            parametrization = LoRaDParametrization()
            parametrize.register_parametrization(module, "weight", parametrization)
        if name in parametrization.adapters:
            raise ValueError(f"{module_name} already has an adapter named {name!r}")
        weight = base_weight(module)
        # Initialise on the CPU with the seeded generator (or shape-only on meta), then move.
        adapter = RotationAdapter(weight.shape[0], row_width(weight.shape), rank,
                                  generator=None if weight.is_meta else generator,
                                  device="meta" if weight.is_meta else "cpu")
        parametrization.adapters[name] = adapter.to(weight.device)
        count += sum(p.numel() for p in adapter.parameters())
    set_adapter(model, _active_name(model))
    return count


def _active_name(model: nn.Module) -> str | None:
    return next((p.active for _, _, p in lorad_modules(model) if p.active is not None), None)


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, _, p in lorad_modules(model):
        names.update(dict.fromkeys(p.adapters))
    return list(names)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Activate adapter ``name`` (``None``: the frozen base). Only its parameters require grad."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; adapters: {', '.join(adapter_names(model)) or 'none'}")
    for _, _, p in lorad_modules(model):
        p.active = name if name in p.adapters else None
        for adapter_name, adapter in p.adapters.items():
            adapter.requires_grad_(adapter_name == name)


def disable_adapters(model: nn.Module) -> None:
    """The base model's behaviour (the teacher)."""
    set_adapter(model, None)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [param for _, _, p in lorad_modules(model) if name in p.adapters for param in p.adapters[name].parameters()]


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``{module}.lorad_A`` / ``{module}.lorad_B`` for adapter ``name``."""
    state = {}
    for module_name, _, p in lorad_modules(model):
        if name in p.adapters:
            state[f"{module_name}.lorad_A"] = p.adapters[name].A.detach()
            state[f"{module_name}.lorad_B"] = p.adapters[name].B.detach()
    return state


@torch.no_grad()
def merge(model: nn.Module, name: str) -> None:
    """Write adapter ``name``'s rotation into the base weights (kept, marked merged; see :func:`unmerge`)."""
    for _, _, p in lorad_modules(model):
        if p.merged is not None:
            raise ValueError(f"adapter {p.merged!r} is already merged; unmerge it first")
    for _, module, p in lorad_modules(model):
        if name in p.adapters:
            original = module.parametrizations.weight.original
            original.copy_(rotate_rows(original, p.adapters[name].theta().float()).to(original.dtype))
            p.merged = name


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` by rotating back (exact up to rounding of the base dtype)."""
    for _, module, p in lorad_modules(model):
        if p.merged is not None:
            original = module.parametrizations.weight.original
            theta = p.adapters[p.merged].theta().float()
            original.copy_(rotate_rows(original, -theta).to(original.dtype))
            p.merged = None


@torch.no_grad()
def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Bake adapter ``name`` (if given) into the weights and remove every LoRaD parametrization.

    The result is the plain model class (e.g. a diffusers ``UNet2DConditionModel``) with ordinary
    ``weight`` parameters and state-dict keys.
    """
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}")
    for _, module, p in list(lorad_modules(model)):
        original = module.parametrizations.weight.original
        if name is not None and name in p.adapters and p.merged != name:
            if p.merged is not None:
                raise ValueError(f"adapter {p.merged!r} is merged; unmerge it before baking {name!r}")
            original.copy_(rotate_rows(original, p.adapters[name].theta().float()).to(original.dtype))
        elif p.merged is not None and p.merged != name:
            raise ValueError(f"adapter {p.merged!r} is merged; unmerge it or bake that adapter")
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model
