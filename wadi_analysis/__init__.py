"""wadi_analysis: compare a teacher and a one-step student checkpoint weight by weight (WaDi §1).

Data flows one way: checkpoint source -> aligned pairs -> per-layer rows (pandas DataFrame) ->
figures/tables -> report.

The names below are imported from their modules on first use, so a command that needs none of them
(``wadi-analyze --help``) starts without torch and pandas.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {  # public name -> the module defining it
    "CheckpointError": "checkpoint", "CheckpointSource": "checkpoint", "TensorInfo": "checkpoint",
    "Comparison": "compare", "compare": "compare", "compare_sources": "compare", "summarize": "compare",
    "LayerLabel": "layers", "label": "layers",
    "open_checkpoint": "locate",
    "LoraStudentSource": "lora_student", "open_lora_student": "lora_student", "read_lora": "lora_student",
}

__all__ = [
    "CheckpointError", "CheckpointSource", "Comparison", "LayerLabel", "TensorInfo", "compare",
    "compare_sources", "label", "LoraStudentSource", "open_checkpoint", "open_lora_student", "read_lora", "summarize",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule ``compare`` would bind ``wadi_analysis.compare`` to it; the package's
        # ``compare`` is the function (as an eager ``from .compare import compare`` left it).
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
