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

from wadi_analysis.errors import InvalidValue
from wadi_analysis.plan import PLAN_FORMAT, PRESETS, Preset, find_preset, write_plan

__all__ = ["PLAN_FORMAT", "PRESETS", "TargetSpec", "check_targets", "preset", "read_plan", "resolve_preset",
           "resolve_spec", "write_plan"]

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


def preset(name: str) -> Preset:
    """The published placement called ``name`` (``wadi_analysis.plan.PRESETS``), or a message listing them."""
    return find_preset(name)


def _is_rank(value: object) -> bool:
    """A rank is a positive int; JSON's true is an int to Python, never a rank."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def resolve_preset(model: nn.Module, preset_name: str, rank: int | None = None) -> dict[str, int]:
    """The published placement ``preset_name``, optionally at another ``rank`` (None: the preset's)."""
    chosen = preset(preset_name)
    if rank is not None and not _is_rank(rank):
        raise InvalidValue(f"rank for preset {preset_name} must be a positive integer, not {rank!r}")
    rank = chosen.rank if rank is None else rank
    return {name: rank for name, module in _modules_of_kinds(model, tuple(KINDS))
            if chosen.matches(name, next(k for k, cls in KINDS.items() if isinstance(module, cls)))}


def read_plan(path: str | os.PathLike) -> dict[str, int]:
    """A placement plan: ``{"format": "wadi-lorad-plan", "targets": {module: rank}}`` or a bare mapping."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InvalidValue(f"cannot read plan {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidValue(f"plan {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidValue(f"plan {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise InvalidValue(f"plan {path} is nested too deeply to be a plan") from None
    if not isinstance(data, dict):
        raise InvalidValue(f"plan {path} must be a JSON object, not {type(data).__name__}")
    if "format" in data and data["format"] != PLAN_FORMAT:
        raise InvalidValue(f"plan {path} has format {data['format']!r}, expected {PLAN_FORMAT!r}")
    targets = data.get("targets") if "format" in data else data
    return _plan_targets(path, targets)


def _plan_targets(path, targets: object) -> dict[str, int]:
    """A plan's ``{module name: rank}``: names non-empty strings, ranks positive integers."""
    if not isinstance(targets, dict) or not targets:
        raise InvalidValue(f"plan {path}: targets must be a non-empty mapping of module names to ranks")
    for name, rank in targets.items():
        if not name.strip():
            raise InvalidValue(f"plan {path}: a module name is empty")
        if not _is_rank(rank):
            raise InvalidValue(f"plan {path}: rank of {name!r} must be a positive integer, not {rank!r}")
    return dict(targets)


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
