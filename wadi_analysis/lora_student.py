"""LoRA students: a teacher plus a LoRA (LCM-LoRA, Hyper-SD, ...), merged on the fly, one weight at a time.

:class:`LoraStudentSource` is a :class:`~wadi_analysis.checkpoint.CheckpointSource` whose weights are
the base's plus ``scale * alpha / rank * up @ down`` (computed in float32, returned in the base dtype),
so ``compare(teacher, open_lora_student(teacher, lora))`` analyses a LoRA student layer by layer
without writing a merged model. Weights the LoRA does not touch come back unchanged (``identical``).

LoRA files accepted (safetensors, or a ``weights_only`` torch pickle; a folder holding
``pytorch_lora_weights.safetensors``):

* diffusers / peft: ``[unet.|transformer.]<module>.lora_A.weight`` / ``lora_B.weight``, with
  optional ``<module>.alpha`` tensors or diffusers' ``lora_adapter_metadata`` (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``); without either, scale 1 (alpha = rank), as in diffusers;
* older diffusers attention-processor files: ``<...>.processor.to_q_lora.down.weight`` /
  ``up.weight`` and ``<module>.lora.down.weight`` / ``lora.up.weight`` (renamed with diffusers'
  ``convert_unet_state_dict_to_peft``);
* kohya-ss / A1111: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  with diffusers-style (``lora_unet_down_blocks_0_...``) or LDM/SGM-style
  (``lora_unet_input_blocks_1_1_...``) names, renamed with diffusers' own
  ``_maybe_map_sgm_blocks_to_diffusers`` (working around two of its SD1.x bugs) and
  ``_convert_non_diffusers_lora_to_diffusers``.

Linear, 1x1-conv and kxk-conv LoRAs (``down`` ``(r, in, kh, kw)``, ``up`` ``(out, r, 1, 1)``) are
merged; a Linear LoRA on a 1x1 conv (or the reverse) is accepted. Text-encoder keys (``lora_te*``,
``text_encoder*.``) are ignored and counted. DoRA (``lora_magnitude_vector``, ``dora_scale``), LoRA
bias terms and LyCORIS LoHa/LoKr files are refused with a :class:`CheckpointError`, as is a LoRA
module that matches no weight of the base. All key mapping works on names only: no tensor data of
the base is read to build it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .checkpoint import CheckpointError, CheckpointSource, open_file
from .locate import open_checkpoint

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
DENOISER_PREFIXES = ("unet.", "transformer.", "base_model.model.")
IGNORED_PREFIXES = ("lora_te", "text_encoder", "te.", "te1.", "te2.")
_DIFFUSERS_KEY = re.compile(r"(?P<module>.+)\.(?:(?P<factor>lora_A|lora_B)\.(?P<param>weight|bias)|alpha)")
_KOHYA_KEY = re.compile(r"(?P<module>lora_unet_[^.]+)\.(?P<kind>lora_down\.weight|lora_up\.weight|alpha)")


@dataclass
class LoraModule:
    """The LoRA factors of one base weight: ``delta = alpha / rank * up @ down``."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: scaling 1 (alpha = rank)
    key: str  # the down key in the file, for messages
    rslora: bool = False  # scaling alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
        """``scale * scaling * up @ down`` in float32, shaped like the base weight."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return product.mul_(scale * self.scaling).reshape(shape)


@dataclass
class LoraWeights:
    """A parsed LoRA file: base weight name (diffusers naming) -> factors."""

    path: Path
    format: str
    modules: dict[str, LoraModule]
    ignored: list[str] = field(default_factory=list)  # text-encoder keys

    def __len__(self) -> int:
        return len(self.modules)


def _layers_per_block(base_names) -> int:
    pattern = re.compile(r"down_blocks\.0\.resnets\.(\d+)\.")
    ids = {int(m.group(1)) for n in base_names or () if (m := pattern.match(n))}
    return max(ids) + 1 if ids else 2  # SD1.x/SD2.x/SDXL all use 2


def _sgm_to_diffusers(names: dict[str, str], layers_per_block: int) -> dict[str, str]:
    """diffusers' SGM (LDM) block renaming, with two fixes for SD1.x/SD2.x names: it is called one block
    at a time (it finds a block's keys by substring, so ``input_blocks_1`` would also take
    ``input_blocks_10/11``), and an up-sampler at ``.1`` (a level without attention) is moved to ``.2``
    (diffusers takes every ``.1`` for an attention; attentions never hold a bare ``conv``)."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    blocks: dict[str, dict[str, str]] = {}
    for key, value in names.items():
        key = re.sub(r"^(lora_unet_output_blocks_\d+)_1_conv\.", r"\1_2_conv.", key)
        match = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d+_", key)
        blocks.setdefault(match[0] if match else "", {})[key] = value
    config = SimpleNamespace(layers_per_block=layers_per_block)
    return {k: v for block in blocks.values() for k, v in _maybe_map_sgm_blocks_to_diffusers(block, config).items()}


def _kohya_groups(path: Path, keys: list[str], base_names) -> dict[str, dict[str, str]]:
    """diffusers module name -> {"down"/"up"/"alpha": key in the file}, via diffusers' own renaming."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    parsed = {}
    for key in keys:
        if not (match := _KOHYA_KEY.fullmatch(key)):
            raise CheckpointError(f"{path}: unsupported LoRA key {key!r} (only lora_down/lora_up/alpha LoRAs; "
                                  f"LyCORIS LoHa/LoKr and similar are not supported)")
        parsed[key] = (match["module"], match["kind"].split(".")[0])
    for module in {module for module, _ in parsed.values()}:
        for kind in ("lora_down", "lora_up"):
            if f"{module}.{kind}.weight" not in parsed:
                raise CheckpointError(f"{path}: LoRA module {module!r} has no {kind} weight")
    # The converters only move values between keys: with names as values they return the renaming.
    names = {k: k for k, (_, kind) in parsed.items() if kind != "alpha"}
    try:
        renamed = _sgm_to_diffusers(names, _layers_per_block(base_names))
        converted = convert_unet_state_dict_to_peft(_convert_non_diffusers_lora_to_diffusers(renamed)[0])
    except Exception as exc:  # diffusers' converters assume well-formed names: any failure means these are not
        detail = f": {str(exc)[:120]}" if isinstance(exc, KeyError) else ""  # a missing key says which
        raise CheckpointError(f"{path}: diffusers cannot rename this kohya LoRA: its module names are not "
                              f"those of an SD U-Net ({type(exc).__name__}{detail})") from None
    groups: dict[str, dict[str, str]] = {}
    for new, old in converted.items():
        if not (match := _DIFFUSERS_KEY.fullmatch(new.removeprefix("unet."))) or not match["factor"]:
            raise CheckpointError(f"{path}: diffusers renamed the kohya key {old!r} to {new!r}, not a LoRA factor")
        group = groups.setdefault(match["module"], {})
        group["down" if match["factor"] == "lora_A" else "up"] = old
        if (alpha := f"{parsed[old][0]}.alpha") in parsed:
            group["alpha"] = alpha
    if len(converted) != len(names) or sum(("down" in g) + ("up" in g) for g in groups.values()) != len(names):
        raise CheckpointError(f"{path}: diffusers' kohya renaming dropped or merged LoRA keys "
                              f"(LDM and diffusers block names mixed?)")
    return groups


def _diffusers_groups(path: Path, keys: list[str]) -> tuple[str, dict[str, dict[str, str]]]:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    stripped = {}
    for key in keys:
        prefix = next((p for p in DENOISER_PREFIXES if key.startswith(p)), "")
        stripped[key[len(prefix):]] = key
    layout = "diffusers/peft"
    if not any(".lora_A." in k or ".lora_B." in k for k in stripped):
        try:
            stripped = convert_unet_state_dict_to_peft(stripped)  # old attention-processor names, as diffusers does
        except Exception as exc:  # what diffusers' renaming throws on names it does not know
            raise CheckpointError(f"{path}: diffusers cannot rename its LoRA keys ({type(exc).__name__}: "
                                  f"{str(exc)[:120]})") from None
        layout = "diffusers (attention processors)"
    groups: dict[str, dict[str, str]] = {}
    for name, key in stripped.items():
        match = _DIFFUSERS_KEY.fullmatch(re.sub(r"\.lora_A\.weight\.alpha$", ".alpha", name))
        if not match:
            raise CheckpointError(f"{path}: {key!r} is not a LoRA weight (expected lora_A/lora_B, "
                                  f"lora_down/lora_up or alpha keys)")
        if match["param"] == "bias":
            raise CheckpointError(f"{path}: LoRA bias terms ({key!r}) are not supported")
        group = groups.setdefault(match["module"], {})
        group["alpha" if not match["factor"] else "down" if match["factor"] == "lora_A" else "up"] = key
    for module, group in groups.items():
        if not {"down", "up"} <= set(group):
            missing = "lora_B" if "down" in group else "lora_A"
            raise CheckpointError(f"{path}: LoRA module {module!r} has no {missing} weight")
    return layout, groups


def _adapter_config(metadata: dict[str, str]) -> dict:
    """The peft ``LoraConfig`` diffusers stores in the file's metadata (unprefixed), or {}."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    if not isinstance(config, dict):
        return {}
    for prefix in ("unet.", "transformer."):  # saved by a pipeline: one config per component
        if any(k.startswith(prefix) for k in config):
            return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    return config


def _number(value, what: str) -> float:
    """A finite number from a LoRA's metadata (JSON true or "4" are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{what} is {str(value)[:40]!r}, not a finite number")
    return float(value)


def _alpha_patterns(path: Path, config: dict) -> list[tuple[re.Pattern, float]]:
    """peft's ``alpha_pattern`` (regex -> alpha), validated: compiled as peft's ``get_pattern_key`` matches."""
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: alpha_pattern in its metadata is not a mapping of patterns to alphas")
    compiled = []
    for pattern, alpha in patterns.items():
        try:
            regex = re.compile(rf"(.*\.)?({pattern})$")
        except re.error as exc:
            raise CheckpointError(f"{path}: alpha_pattern {pattern[:60]!r} is not a regular expression ({exc})") from None
        compiled.append((regex, _number(alpha, f"{path}: alpha_pattern {pattern[:60]!r}")))
    return compiled


def _config_alpha(path: Path, config: dict, module: str) -> float | None:
    for regex, alpha in _alpha_patterns(path, config):
        if regex.match(module):
            return alpha
    alpha = config.get("lora_alpha")
    return None if alpha is None else _number(alpha, f"{path}: lora_alpha in its metadata")


def _tensor_alpha(path: Path, key: str, value: torch.Tensor) -> float:
    """A module's ``alpha`` tensor: one finite number."""
    if value.numel() != 1:
        raise CheckpointError(f"{path}: {key!r} holds {value.numel()} values; an alpha is one number")
    return _number(value.float().item(), f"{path}: {key!r}")


def _check_factors(path: Path, module: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) of one module: float, rank >= 1, matching."""
    shapes = f"down {tuple(down.shape)}, up {tuple(up.shape)}"
    if not (down.is_floating_point() and up.is_floating_point()):
        raise CheckpointError(f"{path}: LoRA factors of {module!r} are not floating point ({down.dtype}, {up.dtype})")
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or down.shape[0] != math.prod(up.shape[1:]):
        raise CheckpointError(f"{path}: LoRA factors of {module!r} do not fit together ({shapes})")
    if down.shape[0] == 0 or 0 in up.shape or 0 in down.shape:
        raise CheckpointError(f"{path}: LoRA factors of {module!r} are empty (rank 0 or no rows: {shapes})")


def read_lora(path: str | os.PathLike, base_names=None) -> LoraWeights:
    """Parse a LoRA file into per-base-weight factors, named like the base's diffusers weights.

    ``base_names`` (the base's weight names) only tell the kohya LDM-name converter the number of
    layers per block (default 2, as in SD1.x/SD2.x/SDXL).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / LORA_FILE_NAME).is_file():
            raise CheckpointError(f"{path} is a folder without {LORA_FILE_NAME}; name the LoRA file")
        path = path / LORA_FILE_NAME
    if not path.is_file():
        raise CheckpointError(f"cannot read the LoRA file {path}: "
                              + ("it does not exist" if not path.exists() else "not a file"))
    source = open_file(path)
    try:
        ignored = [k for k in source.names() if k.startswith(IGNORED_PREFIXES)]
        keys = [k for k in source.names() if not k.startswith(IGNORED_PREFIXES)]
        config = _adapter_config(source.metadata)
        dora = next((k for k in keys if "lora_magnitude_vector" in k or "dora_scale" in k), None)
        if dora or config.get("use_dora"):
            raise CheckpointError(f"{path} is a DoRA LoRA ({dora or 'use_dora in its metadata'}): "
                                  f"DoRA LoRAs are not supported yet")
        if not keys:
            raise CheckpointError(f"{path} holds no U-Net/transformer LoRA weights "
                                  f"({len(ignored)} text-encoder keys ignored)")
        if any(k.startswith("lora_unet_") for k in keys):
            layout, groups = "kohya", _kohya_groups(path, keys, base_names)
        else:
            layout, groups = _diffusers_groups(path, keys)

        def read(key: str) -> torch.Tensor:
            return source.tensor(key).detach().clone()

        modules = {}
        for module, group in groups.items():
            down, up = read(group["down"]), read(group["up"])
            _check_factors(path, module, down, up)
            alpha = (_tensor_alpha(path, group["alpha"], read(group["alpha"])) if "alpha" in group
                     else _config_alpha(path, config, module))
            modules[module + ".weight"] = LoraModule(down, up, alpha, group["down"], config.get("use_rslora") is True)
    finally:
        source.close()
    return LoraWeights(path, layout, modules, ignored)


class LoraStudentSource(CheckpointSource):
    """The base checkpoint with a LoRA merged into each weight as it is read.

    Names and infos are the base's; ``tensor(name)`` is ``base + scale * alpha / rank * up @ down``
    computed in float32 and cast to the base dtype (unchanged when the LoRA does not touch ``name``
    or ``scale`` is 0). The base is read lazily; ``release`` and ``close`` go to the base.
    """

    def __init__(self, base: CheckpointSource, lora_path: str | os.PathLike, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        if isinstance(scale, bool) or not math.isfinite(float(scale)):
            raise CheckpointError(f"the LoRA scale {scale!r} is not a finite number")
        self.scale = float(scale)
        self.lora = read_lora(lora_path, base.names())
        self.path = self.lora.path
        self.metadata = base.metadata
        self._infos = {name: base.info(name) for name in base.names()}
        unmatched = [(name, m.key) for name, m in self.lora.modules.items() if name not in self._infos]
        if unmatched:
            name, key = unmatched[0]
            closest = difflib.get_close_matches(name, list(self._infos), n=1) or list(self._infos)[:1] or ["none"]
            raise CheckpointError(
                f"{self.path}: {len(unmatched)} of {len(self.lora)} LoRA modules match no weight of the base model, "
                f"e.g. {key!r} -> {name!r} (closest base weight: {closest[0]!r})")
        for name, module in self.lora.modules.items():
            shape = self._infos[name].shape
            if len(shape) < 2 or (module.up.shape[0], module.down[0].numel()) != (shape[0], math.prod(shape[1:])):
                raise CheckpointError(f"{self.path}: the LoRA of {name!r} gives {module.up.shape[0]}x"
                                      f"{module.down[0].numel()} rows but the base weight is {tuple(shape)}")
        self.format = (f"{base.format} + LoRA ({self.lora.format}, {len(self.lora)} weights, scale {self.scale:g}"
                       + (f", {len(self.lora.ignored)} text-encoder keys ignored)" if self.lora.ignored else ")"))

    def tensor(self, name: str) -> torch.Tensor:
        weight = self.base.tensor(name)
        module = self.lora.modules.get(name)
        if module is None or self.scale == 0:
            return weight
        return (weight.float() + module.delta(weight.shape, self.scale)).to(weight.dtype)

    def release(self, name: str) -> None:
        self.base.release(name)

    def files(self) -> list[Path]:
        return [*self.base.files(), self.lora.path]

    def close(self) -> None:
        self.base.close()


def open_lora_student(teacher, lora_path: str | os.PathLike, scale: float = 1.0, **open_kwargs) -> LoraStudentSource:
    """The student ``teacher + scale * LoRA``; ``teacher`` is a path (opened with
    :func:`~wadi_analysis.open_checkpoint` and ``open_kwargs``) or an open source (closed with the student)."""
    if isinstance(teacher, CheckpointSource):
        return LoraStudentSource(teacher, lora_path, scale)
    base = open_checkpoint(teacher, **open_kwargs)
    try:
        return LoraStudentSource(base, lora_path, scale)
    except BaseException:
        base.close()
        raise
