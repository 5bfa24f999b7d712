"""One API for every adapter the distiller can train on the same targets: LoRaD, peft LoRA and DoRA,
and full fine-tuning (the baselines of WaDi's adapter ablation).

Targets are always ``{module name: rank}`` (see :mod:`wadi_distill.lorad.targets`).
"""

from __future__ import annotations

import re

from torch import nn

from . import lorad

METHODS = ("lorad", "lora", "dora", "full")


def _peft_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def attach(model: nn.Module, method: str, targets: dict[str, int], name: str = "default", seed: int = 0,
           alpha: float | None = None) -> int:
    """Attach adapter ``name`` of ``method`` to the target modules; returns its trainable parameter count.

    Base weights are frozen (for ``full``: everything but the targets' weights and biases is frozen).
    ``alpha`` is LoRA/DoRA's ``lora_alpha`` (default: equal to each rank, i.e. scale 1).
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; one of {', '.join(METHODS)}")
    lorad.check_targets(model, targets)
    if method == "lorad":
        count = lorad.add_adapter(model, name, targets, seed=seed)
        lorad.set_adapter(model, name)
        return count
    if method == "full":
        modules = dict(model.named_modules())
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for target in targets:
            for parameter in modules[target].parameters():
                parameter.requires_grad_(True)
        return trainable_parameters(model)
    from peft import LoraConfig, inject_adapter_in_model

    first_rank = next(iter(targets.values()))
    config = LoraConfig(
        r=first_rank, lora_alpha=alpha or first_rank, target_modules=list(targets), use_dora=method == "dora",
        rank_pattern={re.escape(k): v for k, v in targets.items()},
        alpha_pattern={re.escape(k): alpha or v for k, v in targets.items()},
        init_lora_weights=True,  # B = 0: training starts exactly at the teacher, as LoRaD does
    )
    before = {id(p) for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=name)
    activate(model, name)
    return sum(p.numel() for p in model.parameters() if id(p) not in before)


def activate(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the active one (``None``: the frozen base) for LoRaD and peft layers alike."""
    if lorad.adapter_names(model):
        lorad.set_adapter(model, name if name in lorad.adapter_names(model) else None)
    for layer in _peft_layers(model):
        if name is None or name not in layer.lora_A:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lorad_parameters(model: nn.Module, targets: dict[str, int]) -> int:
    """r * (out + in/2) per target: what :func:`attach` with ``lorad`` would add."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].weight.shape[0] + modules[n].weight[0].numel() // 2) for n, rank in targets.items())


def lora_ranks_at_equal_budget(model: nn.Module, targets: dict[str, int]) -> dict[str, int]:
    """LoRA ranks with (about) the parameter count of LoRaD at ``targets``: r * (out + in) ~ r_lorad * (out + in/2)."""
    modules = dict(model.named_modules())
    ranks = {}
    for name, rank in targets.items():
        weight = modules[name].weight
        out_features, width = weight.shape[0], weight[0].numel()
        ranks[name] = max(1, round(rank * (out_features + width // 2) / (out_features + width)))
    return ranks


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name``, LoRaD or peft alike (peft names them ``...lora_A.<name>.weight``)."""
    found = lorad.adapter_parameters(model, name)
    if found:
        return found
    return [p for n, p in model.named_parameters() if f".{name}." in f".{n}." and "lora_" in n]

