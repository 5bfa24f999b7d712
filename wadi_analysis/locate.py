"""From a path a user typed to a checkpoint source under canonical names.

Accepted: a ``.safetensors`` file, a sharded ``*.safetensors.index.json`` (or a folder holding one),
a diffusers model folder (``config.json`` + ``diffusion_pytorch_model[.VARIANT].safetensors``, sharded
or not, ``.bin`` as a fallback), a diffusers pipeline folder (``model_index.json``; the ``unet/`` or
``transformer/`` component, or the one named), and ``.bin/.pt/.pth/.ckpt`` state dicts.

Symbolic links: a checkpoint is read from the path the user named. That path may itself be a link,
and links inside a named folder are followed; a component folder (``unet/``), weights file or shard
that is a link leading *out of* the named folder is refused with a :class:`CheckpointError` naming
the link (a Hugging Face cache snapshot, whose files link into the same repository's ``blobs/``, is
the one exception). Nothing is ever written through a link (:mod:`wadi_analysis.outputs`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint import PICKLE_SUFFIXES, CheckpointError, CheckpointSource, check_link_inside, open_file, read_json_bytes
from .keymap import RenamedSource, normalize_names

DENOISER_COMPONENTS = ("unet", "transformer", "prior", "decoder")
WEIGHTS_STEM = "diffusion_pytorch_model"


def _pipeline_index(folder: Path) -> dict:
    """``model_index.json`` of a pipeline folder: a JSON mapping, else a :class:`CheckpointError`."""
    try:
        text = (folder / "model_index.json").read_text()
    except (OSError, UnicodeDecodeError):
        raise CheckpointError(f"{folder}/model_index.json is not readable text") from None
    index = read_json_bytes(text, f"{folder}/model_index.json is not a pipeline index (it")
    if not isinstance(index, dict):
        raise CheckpointError(f"{folder}/model_index.json is not a pipeline index (not a mapping of components)")
    return index


def _pick_component(folder: Path, component: str | None) -> Path:
    index = _pipeline_index(folder)
    if component:
        if not (folder / component).is_dir():
            listed = ", ".join(k for k in index if not k.startswith("_")) or "none"
            raise CheckpointError(f"pipeline {folder} has no component {component!r} (components: {listed})")
        return folder / component
    for name in DENOISER_COMPONENTS:
        if name in index and (folder / name).is_dir():
            return folder / name
    raise CheckpointError(f"pipeline {folder} has no unet/ or transformer/ component; name one with --component")


def _component_folder(path: Path, component: str | None) -> Path:
    """The model folder inside the folder ``path`` the user named (itself, or a pipeline component),
    which must not be a link out of ``path``."""
    if component and (Path(component).name != component or component in (".", "..")):
        raise CheckpointError(f"--component {component!r} is not a component folder name")
    if (path / "model_index.json").is_file():
        chosen = _pick_component(path, component)
    elif component and (path / component).is_dir():
        chosen = path / component
    else:
        return path
    check_link_inside(chosen, path)
    return chosen


def _model_folder_file(folder: Path, variant: str | None) -> Path | None:
    """The weights file of a diffusers model folder, honouring the variant (fp16, ema, ...)."""
    def candidates(var: str | None) -> list[Path]:
        infix = f".{var}" if var else ""
        return [folder / f"{WEIGHTS_STEM}.safetensors.index{infix}.json",
                folder / f"{WEIGHTS_STEM}{infix}.safetensors",
                folder / f"{WEIGHTS_STEM}.bin.index{infix}.json",
                folder / f"{WEIGHTS_STEM}{infix}.bin"]

    if variant:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", variant):
            raise CheckpointError(f"--variant {variant!r} is not a variant name (letters, digits, - and _)")
        found = [p for p in candidates(variant) if p.is_file()]
        if not found:
            raise CheckpointError(f"{folder} has no {variant!r} variant of {WEIGHTS_STEM}")
        return found[0]
    found = [p for p in candidates(None) if p.is_file()]
    if found:
        return found[0]
    # No plain weights: accept the only variant present (e.g. a folder saved with variant="fp16").
    variants = sorted({p.name.split(".")[1] for p in folder.glob(f"{WEIGHTS_STEM}.*.safetensors")
                       if not p.name.split(".")[1].startswith(("safetensors", "bin"))} |
                      {p.name.split(".")[-2] for p in folder.glob(f"{WEIGHTS_STEM}.safetensors.index.*.json")})
    variants = [v for v in variants if "-of-" not in v]
    if len(variants) == 1:
        return _model_folder_file(folder, variants[0])
    if len(variants) > 1:
        raise CheckpointError(f"{folder} holds several variants ({', '.join(variants)}); choose one with --variant")
    return None


def model_folder(path: str | os.PathLike, component: str | None = None) -> Path:
    """The diffusers model folder (holding ``config.json``) of a model or pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (a diffusers model or pipeline folder is needed)")
    path = _component_folder(path, component)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a diffusers model folder")
    return path


def resolve_path(path: str | os.PathLike, component: str | None = None, variant: str | None = None) -> Path:
    """The file that holds the weights (a safetensors file, an index JSON or a torch pickle)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a file nor a folder")
    named = path
    path = _component_folder(path, component)
    weights = _model_folder_file(path, variant) or _only_checkpoint(path)
    check_link_inside(weights, named)
    return weights


def _only_checkpoint(path: Path) -> Path:
    """The one checkpoint file of a folder that is not a diffusers model folder."""
    indexes = sorted(path.glob("*.safetensors.index*.json"))
    singles = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    for group in (indexes, singles if not indexes else [], pickles):
        if len(group) == 1:
            return group[0]
        if len(group) > 1:
            names = ", ".join(p.name for p in group[:4])
            raise CheckpointError(f"{path} holds several checkpoints ({names}); name the file")
    raise CheckpointError(f"{path} holds no loadable checkpoint (no safetensors, index or .bin/.pt/.ckpt file)")


def open_checkpoint(path: str | os.PathLike, *, component: str | None = None, variant: str | None = None,
                    ema: bool = False) -> CheckpointSource:
    """Open any supported checkpoint lazily, with keys in diffusers naming.

    Args:
        path: file or folder (see module docstring).
        component: pipeline component folder to read (default: ``unet`` or ``transformer``).
        variant: diffusers weight variant such as ``fp16`` (default: plain weights, else the only variant).
        ema: read the EMA copy (``model_ema.*``) of an original LDM checkpoint instead of the weights.
    """
    file = resolve_path(path, component=component, variant=variant)
    source = open_file(file)
    try:
        mapping = normalize_names(source.names(), ema=ema)
    except ValueError as exc:
        source.close()
        raise CheckpointError(f"{file}: {exc}") from None
    if not mapping.names:
        source.close()
        raise CheckpointError(f"{file} holds no tensors")
    return RenamedSource(source, mapping)
