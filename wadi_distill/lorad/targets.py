"""Where adapters go: glob patterns, module kinds, placement-plan files and the published presets.

Every way of choosing targets resolves to the same thing: ``{module name: rank}``.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from wadi_analysis.plan import PLAN_FORMAT, PRESETS, write_plan

__all__ = ["PLAN_FORMAT", "PRESETS", "TargetSpec", "check_targets", "read_plan", "resolve_preset", "resolve_spec",
           "write_plan"]

KINDS = {"linear": nn.Linear, "conv": nn.Conv2d}


@dataclass
class TargetSpec:
    """A target choice: glob patterns and kinds at one rank, optionally with per-module overrides."""

    patterns: list[str] = field(default_factory=lambda: ["*"])
    kinds: tuple[str, ...] = ("linear",)
    rank: int = 32
    exclude: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)  # glob -> rank, first match wins


def _modules_of_kinds(model: nn.Module, kinds: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown module kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
    types = tuple(KINDS[k] for k in kinds)
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]


def resolve_spec(model: nn.Module, spec: TargetSpec) -> dict[str, int]:
    targets = {}
    for name, _ in _modules_of_kinds(model, tuple(spec.kinds)):
        if not any(fnmatch.fnmatchcase(name, p) for p in spec.patterns):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in spec.exclude):
            continue
        targets[name] = next((r for p, r in spec.ranks.items() if fnmatch.fnmatchcase(name, p)), spec.rank)
    return targets


def resolve_preset(model: nn.Module, preset: str, rank: int | None = None) -> dict[str, int]:
    """The published placement ``preset`` (see ``wadi_analysis.plan.PRESETS``), optionally at another rank."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    return {name: rank or chosen.rank for name, module in _modules_of_kinds(model, tuple(KINDS))
            if chosen.matches(name, next(k for k, cls in KINDS.items() if isinstance(module, cls)))}


def read_plan(path: str | os.PathLike) -> dict[str, int]:
    """A placement plan: ``{"format": "wadi-lorad-plan", "targets": {module: rank}}`` or a bare mapping."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read plan {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"plan {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"plan {path} must be a JSON object")
    if "format" in data and data["format"] != PLAN_FORMAT:
        raise ValueError(f"plan {path} has format {data['format']!r}, expected {PLAN_FORMAT!r}")
    targets = data.get("targets") if "format" in data else data
    if not isinstance(targets, dict) or not all(isinstance(r, int) and r > 0 for r in targets.values()):
        raise ValueError(f"plan {path} must map module names to positive integer ranks")
    return {str(k): int(v) for k, v in targets.items()}


def check_targets(model: nn.Module, targets: dict[str, int]) -> dict[str, int]:
    """Validate a target mapping against ``model``: names exist, modules are Linear/Conv2d (also when an
    earlier adapter wrapped them, as peft does), ranks fit."""
    modules = dict(model.named_modules())
    for name, rank in targets.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the model has no module {name!r}")
        base = getattr(module, "base_layer", module)
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{name} is a {type(base).__name__}; only Linear and Conv2d can be adapted")
        if rank < 1:
            raise ValueError(f"rank for {name} must be >= 1")
    if not targets:
        raise ValueError("no module matches the targets")
    return targets
