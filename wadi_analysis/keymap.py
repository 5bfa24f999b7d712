"""Key normalisation and alignment of two checkpoints.

Checkpoints name the same weight differently: original Stable Diffusion files use the LDM layout
(``model.diffusion_model.input_blocks.1.1.proj_in.weight``), training frameworks add prefixes
(``module.``, ``unet.``), original SD3 / FLUX / PixArt files fuse q, k, v (:mod:`.transformer_layouts`).
Everything is mapped to diffusers names. The LDM mapping is diffusers' own
converter run on the *names* alone (each value is its own key), so no tensor data is read to build it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from .checkpoint import CheckpointError, CheckpointSource, KeyMapping, TensorInfo
from .errors import one_line
from .transformer_layouts import RowKeyMapping, detect_layout, original_layout_mapping, read_rows, sliced_info

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema."
STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "unet.", "transformer.", "model.", "base_model.model.")


def _infer_ldm_unet_config(unet_keys: list[str]) -> dict:
    """The few config fields diffusers' LDM converter needs, read off the key names."""
    input_ids = {int(m.group(1)) for k in unet_keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    downsamplers = sorted({int(m.group(1)) for k in unet_keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    if downsamplers:
        layers_per_block = downsamplers[0] - 1
    else:  # a single resolution level: conv_in + the level's layers
        layers_per_block = max(input_ids, default=1)
    config: dict = {"layers_per_block": layers_per_block}
    if any(k.startswith("label_emb.0.") for k in unet_keys):
        # label_emb is SDXL's text/time embedding (add_embedding) or, in unCLIP-style models, a class
        # projection (class_embedding). SDXL is the one whose first level has no attention.
        sdxl_like = not any(k.startswith("input_blocks.1.1.") for k in unet_keys)
        config["addition_embed_type"] = "text_time" if sdxl_like else None
        config["class_embed_type"] = None if sdxl_like else "projection"
    return config


def ldm_unet_mapping(names: list[str], ema: bool = False) -> KeyMapping:
    """Map original LDM U-Net names to diffusers names with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_keys = [k[len(LDM_UNET_PREFIX):] for k in names if k.startswith(LDM_UNET_PREFIX)]
    config = _infer_ldm_unet_config(unet_keys)
    name_checkpoint = {k: k for k in names}
    # The converter only moves values between keys, so with names as values it returns the mapping.
    diffusers_logger = logging.getLogger("diffusers")
    previous_level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # it warns about EMA weights it is told to skip
    try:
        if config["layers_per_block"] < 1:  # a downsampler at input_blocks.0 or 1: no level has layers
            raise ValueError("a downsampler at input_blocks.0 or 1, where the first level's layers belong")
        converted = convert_ldm_unet_checkpoint(name_checkpoint, config, extract_ema=ema)
    except Exception as exc:  # the converter assumes a well-formed U-Net: any failure means these keys are not one
        detail = one_line(exc)[:160] or type(exc).__name__
        raise ValueError(f"its LDM U-Net keys (model.diffusion_model.*) do not form a U-Net diffusers' "
                         f"converter can map ({type(exc).__name__}: {detail})") from None
    finally:
        diffusers_logger.setLevel(previous_level)
    mapping = {new: old for new, old in converted.items() if isinstance(old, str)}
    used = set(mapping.values())
    if ema and not any(v.startswith(LDM_EMA_PREFIX) for v in used):
        raise ValueError("this checkpoint has no EMA copy of the U-Net (model_ema.*)")

    def source_of(unet_key: str) -> str:  # EMA copies live under flattened names: model_ema.diffusion_modelinput_blocks...
        return "model_ema.diffusion_model" + unet_key[len(LDM_UNET_PREFIX):].replace(".", "") if ema else unet_key

    unmapped = [k for k in names if k.startswith(LDM_UNET_PREFIX) and source_of(k) not in used]
    left_out = used | set(unmapped)
    ignored = [k for k in names if k not in left_out]  # other components (VAE, text encoders), the unused copy
    return KeyMapping(mapping, layout="ldm" + (" (ema)" if ema else ""), ignored=ignored, unmapped=unmapped)


def normalize_names(names: list[str], ema: bool = False) -> KeyMapping:
    """Canonical (diffusers-style) names for a checkpoint's keys."""
    if detect_layout(names) is not None:  # SD3 / FLUX / PixArt originals (before LDM: SD3 shares its prefix)
        if ema:
            raise ValueError("--ema applies to original LDM U-Net checkpoints with model_ema.* keys")
        return original_layout_mapping(names)
    if sum(k.startswith(LDM_UNET_PREFIX) for k in names) > 0:
        return ldm_unet_mapping(names, ema=ema)
    if ema:
        raise ValueError("--ema applies to original LDM checkpoints with model_ema.* keys")
    for prefix in STRIPPABLE_PREFIXES:
        if names and all(k.startswith(prefix) for k in names):
            return KeyMapping({k[len(prefix):]: k for k in names}, layout=f"diffusers (prefix {prefix!r} stripped)")
    return KeyMapping({k: k for k in names})


class RenamedSource(CheckpointSource):
    """A view of another source under canonical names."""

    def __init__(self, source: CheckpointSource, mapping: KeyMapping) -> None:
        super().__init__()
        self.inner = source
        self.mapping = mapping
        self.path = source.path
        self.format = source.format + ("" if mapping.layout == "diffusers" else f", {mapping.layout} keys")
        self.metadata = source.metadata
        # Row ranges of fused weights (transformer originals): checked against the stored rows here.
        self._rows = mapping.rows if isinstance(mapping, RowKeyMapping) else {}
        try:
            self._infos = {new: sliced_info(source.info(old), self._rows[new]) if new in self._rows
                           else source.info(old) for new, old in mapping.names.items()}
        except ValueError as exc:
            source.close()
            raise CheckpointError(f"{source.path}: {exc}") from None

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._rows:
            return read_rows(self.inner, self.mapping.names[name], self._rows[name])
        return self.inner.tensor(self.mapping.names[name])

    def release(self, name: str) -> None:
        self.inner.release(self.mapping.names[name])

    def close(self) -> None:
        self.inner.close()

    def files(self) -> list:
        return self.inner.files()

    @property
    def raw_source(self) -> CheckpointSource:
        return self.inner

    def raw_name(self, name: str) -> str:
        return self.mapping.names[name]

    @property
    def key_mapping(self) -> KeyMapping:
        return self.mapping


def row_shape(info: TensorInfo) -> tuple[int, int]:
    """The (out_channels, -1) view every statistic works on."""
    return info.shape[0], info.numel // max(info.shape[0], 1)


@dataclass
class Alignment:
    """Which weights two checkpoints share, in teacher order."""

    common: list[str]
    missing_in_teacher: list[str]
    missing_in_student: list[str]
    shape_mismatches: list[str]


def align(teacher: CheckpointSource, student: CheckpointSource) -> Alignment:
    student_names = set(student.names())
    teacher_names = teacher.names()
    common, mismatched = [], []
    for name in teacher_names:
        if name not in student_names:
            continue
        a, b = teacher.info(name), student.info(name)
        # A Linear (o, i) and a 1x1 conv (o, i, 1, 1) hold the same rows; anything else must match exactly.
        same = a.shape == b.shape or (len(a.shape) >= 2 and len(b.shape) >= 2 and row_shape(a) == row_shape(b)
                                      and tuple(d for d in a.shape if d != 1) == tuple(d for d in b.shape if d != 1))
        (common if same else mismatched).append(name)
    teacher_set = set(teacher_names)
    return Alignment(
        common=common,
        missing_in_teacher=[n for n in student.names() if n not in teacher_set],
        missing_in_student=[n for n in teacher_names if n not in student_names],
        shape_mismatches=mismatched,
    )
