"""Loading the denoiser a distillation works on (diffusers model or pipeline folders, local only)."""

from __future__ import annotations

import json
import os

from torch import nn

from wadi_analysis.checkpoint import CheckpointError
from wadi_analysis.locate import model_folder


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
