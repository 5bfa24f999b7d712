"""Original single-file layouts of flow-matching and DiT transformers, mapped to diffusers names by rows.

Original checkpoints fuse what diffusers keeps apart: SD3/SD3.5 (``model.diffusion_model.joint_blocks.N.
x_block.attn.qkv``), FLUX (Black Forest Labs' layout: ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.
linear1`` = q, k, v and the MLP's up projection), PixArt (``blocks.N.attn.qkv``, ``cross_attn.kv_linear``) and
SANA (NVlabs' layout: the same ``blocks.N.attn.qkv`` and ``cross_attn.kv_linear``, GLUMBConv ``mlp.inverted_conv
/depth_conv/point_conv.conv``).
Rows of a weight are its output channels, so a fused weight is its parts stacked by rows and each diffusers
weight is a row range of one stored tensor (or, where the original orders shift/scale the other way round,
two ranges swapped). A :class:`RowKeyMapping` records, for each diffusers name, the stored key and its row
ranges as *fractions* of the stored rows (q = [0, 1/3) of qkv; FLUX's q = [0, 1/7) of linear1, whose MLP
is 4 widths), so it is built from key names alone and a tensor is read as a view of those rows, lazily.

Where diffusers has a converter (SD3: ``convert_sd3_transformer_checkpoint_to_diffusers``; SANA:
``convert_sana_transformer_to_diffusers``) it is the source of truth: it is run on *row tags* (each key's
value is a vector whose entries name the key and the row), and the rows each output holds say where it came
from, no tensor data read. diffusers' FLUX converter fixes the width to FLUX.1's 3072, so FLUX's table is
written out below (tests check it against the converter on the real FLUX.1-dev names); PixArt's converter is
a script outside the package, so its table is too, as are the few SANA names the packaged converter lacks
(SANA-1.5 / Sprint q/k norms, Sprint's guidance embedder, from diffusers' ``scripts/convert_sana_to_diffusers.py``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .checkpoint import CheckpointSource, KeyMapping, TensorInfo
from .errors import one_line

ORIGINAL_PREFIX = "model.diffusion_model."
Rows = tuple[tuple[Fraction, Fraction], ...]  # row ranges [start, stop) as fractions of the stored rows
WHOLE: Rows = ((Fraction(0), Fraction(1)),)
_TAG_ROWS = 12  # tag length per key: every fraction the converters cut at (1/2, 1/3) is a whole number of tags


@dataclass
class RowKeyMapping(KeyMapping):
    """A :class:`KeyMapping` whose canonical names may be row ranges of the stored tensor they name."""

    rows: dict[str, Rows] = field(default_factory=dict)  # canonical name -> ranges (absent: the whole tensor)


def rows_of(info: TensorInfo, ranges: Rows) -> list[tuple[int, int]]:
    """The row ranges as row indices of a stored tensor with ``info``'s shape, or a ValueError when the
    stored rows do not divide (the tensor is not the fused weight the layout says)."""
    total = info.shape[0] if info.shape else 0
    out = []
    for start, stop in ranges:
        a, b = start * total, stop * total
        if a.denominator != 1 or b.denominator != 1:
            raise ValueError(f"its {total} rows do not split into the parts of a fused weight")
        out.append((int(a), int(b)))
    return out


def sliced_info(info: TensorInfo, ranges: Rows) -> TensorInfo:
    """Shape and dtype of the rows ``ranges`` of a stored tensor."""
    count = sum(b - a for a, b in rows_of(info, ranges))
    return TensorInfo((count, *info.shape[1:]), info.dtype)


def read_rows(source: CheckpointSource, key: str, ranges: Rows) -> torch.Tensor:
    """The rows ``ranges`` of the stored tensor ``key``: a view for one range, a copy of those rows only
    for several (never the whole fused tensor copied)."""
    tensor = source.tensor(key)
    parts = [tensor[a:b] for a, b in rows_of(source.info(key), ranges)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ----------------------------------------------------------------------------- detection

def detect_layout(names: list[str]) -> str | None:
    """``sd3``, ``flux``, ``sana`` or ``pixart`` when the keys are that model's original layout, else None
    (SANA before PixArt: both have ``blocks.N.attn.qkv`` and ``t_block``; only SANA's MLP is GLUMBConv)."""
    stems = {k.removeprefix(ORIGINAL_PREFIX) for k in names}
    if any(k.startswith("joint_blocks.") for k in stems):
        return "sd3"
    if any(k.startswith("double_blocks.") for k in stems) and any(k.startswith("single_blocks.") for k in stems):
        return "flux"
    if any(re.match(r"blocks\.\d+\.mlp\.inverted_conv\.conv\.weight$", k) for k in stems):
        return "sana"
    if any(re.match(r"blocks\.\d+\.attn\.qkv\.weight$", k) for k in names) and "t_block.1.weight" in names:
        return "pixart"
    return None


def original_layout_mapping(names: list[str]) -> RowKeyMapping:
    """The diffusers names of an original SD3 / FLUX / SANA / PixArt checkpoint (see the module docstring)."""
    layout = detect_layout(names)
    build = {"sd3": _sd3_table, "flux": _flux_table, "sana": _sana_table, "pixart": _pixart_table}[layout]
    model_keys = [k for k in names if k.startswith(ORIGINAL_PREFIX)] or [
        k for k in names if not k.startswith(("text_encoders.", "first_stage_model.", "cond_stage_model.",
                                               "conditioner.", "vae."))]
    table = build([k.removeprefix(ORIGINAL_PREFIX) for k in model_keys])  # canonical -> (stem, rows)
    stored = {k.removeprefix(ORIGINAL_PREFIX): k for k in model_keys}
    mapping = {new: stored[stem] for new, (stem, _) in table.items()}
    rows = {new: ranges for new, (_, ranges) in table.items() if ranges != WHOLE}
    used = set(mapping.values())
    unmapped = [k for k in model_keys if k not in used]  # e.g. PixArt's and SANA's pos_embed, y_embedding
    left_out = used | set(unmapped)
    ignored = [k for k in names if k not in left_out]  # text encoders, VAE
    return RowKeyMapping(mapping, layout=f"original {layout}", ignored=ignored, unmapped=unmapped, rows=rows)


# ----------------------------------------------------------------------------- diffusers' converters on row tags

def _sd3_table(keys: list[str]) -> dict[str, tuple[str, Rows]]:
    """SD3's mapping: diffusers' own converter run on row tags (:func:`_converted_rows`)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return _converted_rows(keys, convert_sd3_transformer_checkpoint_to_diffusers, "SD3 keys (joint_blocks.*)")


def _converted_rows(keys: list[str], converter, what: str) -> dict[str, tuple[str, Rows]]:
    """A converter's mapping from row tags: key i's tag vector holds i * T + r for its T rows r, so each
    output's tags name the key and the (fractional) rows it took."""
    tags = {k: torch.arange(i * _TAG_ROWS, (i + 1) * _TAG_ROWS, dtype=torch.int64) for i, k in enumerate(keys)}
    diffusers_logger = logging.getLogger("diffusers")
    previous_level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        converted = converter(dict(tags))
    except Exception as exc:  # the converter assumes a complete transformer
        detail = one_line(exc)[:160] or type(exc).__name__
        raise ValueError(f"its {what} do not form a transformer diffusers' converter can "
                         f"map ({type(exc).__name__}: {detail})") from None
    finally:
        diffusers_logger.setLevel(previous_level)
    table = {}
    for new, tag in converted.items():
        if not isinstance(tag, torch.Tensor) or tag.ndim != 1 or tag.numel() == 0:
            continue
        owners = {int(t) // _TAG_ROWS for t in tag}
        if len(owners) != 1:  # not a row range of one stored tensor: never in these converters
            raise ValueError(f"diffusers' converter builds {new} from several tensors")
        key = keys[owners.pop()]
        local = [int(t) % _TAG_ROWS for t in tag]
        ranges, start = [], 0
        for i in range(1, len(local) + 1):  # runs of consecutive rows
            if i == len(local) or local[i] != local[i - 1] + 1:
                ranges.append((Fraction(local[start], _TAG_ROWS), Fraction(local[i - 1] + 1, _TAG_ROWS)))
                start = i
        table[new] = (key, tuple(ranges))
    return table


# ----------------------------------------------------------------------------- FLUX (Black Forest Labs layout)

THIRDS = tuple((Fraction(i, 3), Fraction(i + 1, 3)) for i in range(3))
SEVENTHS = tuple((Fraction(i, 7), Fraction(i + 1, 7)) for i in range(3)) + ((Fraction(3, 7), Fraction(1)),)
HALVES = ((Fraction(0), Fraction(1, 2)), (Fraction(1, 2), Fraction(1)))
SWAPPED_HALVES = (HALVES[1], HALVES[0])  # original shift, scale -> diffusers scale, shift

_FLUX_TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
             "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
_FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
                "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
                "txt_mlp.2": "ff_context.net.2", "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out"}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
                "linear2": "proj_out"}
# fused original module -> (diffusers modules, their row ranges)
_FLUX_FUSED = {"img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), THIRDS),
               "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), THIRDS),
               "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), SEVENTHS)}


def _parameter(original: str) -> str:
    """FLUX's RMSNorm stores ``scale`` where diffusers has ``weight``."""
    return "weight" if original == "scale" else original


def _flux_table(keys: list[str]) -> dict[str, tuple[str, Rows]]:
    """FLUX's mapping, as diffusers' converter does it (width read from the keys' rows, not fixed)."""
    table = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        block = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)$", module)
        if block is None:
            if module in _FLUX_TOP:
                table[f"{_FLUX_TOP[module]}.{param}"] = (key, WHOLE)
            elif module == "final_layer.adaLN_modulation.1":
                table[f"norm_out.linear.{param}"] = (key, SWAPPED_HALVES)
            continue
        kind, index, inner = block.groups()
        prefix = f"{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{index}."
        renames = _FLUX_DOUBLE if kind == "double_blocks" else _FLUX_SINGLE
        if inner in renames:
            table[f"{prefix}{renames[inner]}.{_parameter(param)}"] = (key, WHOLE)
        elif inner in _FLUX_FUSED and (inner == "linear1") == (kind == "single_blocks"):
            for part, ranges in zip(*_FLUX_FUSED[inner]):
                table[f"{prefix}{part}.{param}"] = (key, (ranges,))
    return table


# ----------------------------------------------------------------------------- PixArt (original DiT layout)

_PIXART_TOP = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear",
               "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
               "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
               "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
               "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
               "y_embedder.y_proj.fc1": "caption_projection.linear_1",
               "y_embedder.y_proj.fc2": "caption_projection.linear_2", "final_layer.linear": "proj_out"}
_PIXART_BLOCK = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q",
                 "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
_PIXART_FUSED = {"attn.qkv": (("attn1.to_q", "attn1.to_k", "attn1.to_v"), THIRDS),
                 "cross_attn.kv_linear": (("attn2.to_k", "attn2.to_v"), HALVES)}


def _pixart_table(keys: list[str]) -> dict[str, tuple[str, Rows]]:
    """Original PixArt-α/Σ names as diffusers' conversion script maps them (``scripts/convert_pixart_*``)."""
    table = {}
    for key in keys:
        if key in ("final_layer.scale_shift_table",):
            table["scale_shift_table"] = (key, WHOLE)
            continue
        module, _, param = key.rpartition(".")
        block = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if block is None:
            if module in _PIXART_TOP:
                table[f"{_PIXART_TOP[module]}.{param}"] = (key, WHOLE)
            continue
        index, inner = block.groups()
        prefix = f"transformer_blocks.{index}."
        if inner == "scale_shift_table":
            table[prefix + inner] = (key, WHOLE)
            continue
        inner_module = inner.rpartition(".")[0]
        if inner_module in _PIXART_BLOCK:
            table[f"{prefix}{_PIXART_BLOCK[inner_module]}.{param}"] = (key, WHOLE)
        elif inner_module in _PIXART_FUSED:
            for part, ranges in zip(*_PIXART_FUSED[inner_module]):
                table[f"{prefix}{part}.{param}"] = (key, (ranges,))
    return table


# ----------------------------------------------------------------------------- SANA (NVlabs layout)

# Popped by diffusers' SANA converter whether or not the model has them; given a placeholder tag when absent
# (SANA without a y norm, a file without the fixed sin-cos table) and whatever they map to dropped.
_SANA_OPTIONAL = ("pos_embed", "y_embedder.y_embedding", "attention_y_norm.weight")
# Names the packaged converter does not know, as diffusers' scripts/convert_sana_to_diffusers.py maps them:
# q/k RMS norms (SANA-1.5, SANA-Sprint; ``qk_norm``) and Sprint's guidance embedder.
_SANA_BLOCK_EXTRA = {"attn.q_norm.weight": "attn1.norm_q.weight", "attn.k_norm.weight": "attn1.norm_k.weight",
                     "cross_attn.q_norm.weight": "attn2.norm_q.weight",
                     "cross_attn.k_norm.weight": "attn2.norm_k.weight"}
_SANA_GUIDANCE = {"cfg_embedder.mlp.0": "time_embed.guidance_embedder.linear_1",
                  "cfg_embedder.mlp.2": "time_embed.guidance_embedder.linear_2"}
_SANA_PLAIN_TIME = "time_embed.emb.timestep_embedder."  # AdaLayerNormSingle's; with guidance_embeds (Sprint):
_SANA_SPRINT_TIME = "time_embed.timestep_embedder."      # SanaCombinedTimestepGuidanceEmbeddings'


def _sana_table(keys: list[str]) -> dict[str, tuple[str, Rows]]:
    """SANA's mapping: diffusers' ``convert_sana_transformer_to_diffusers`` on row tags, plus the q/k norms and
    Sprint's guidance embedder by table. Sprint (a ``cfg_embedder``) keeps its timestep embedder directly under
    ``time_embed``, as the conversion script writes it. ``logvar_linear`` (Sprint's training head) has no
    diffusers weight: unmapped."""
    from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers

    placeholders = [k for k in _SANA_OPTIONAL if k not in keys]
    table = _converted_rows(keys + placeholders, convert_sana_transformer_to_diffusers, "SANA keys (blocks.*)")
    table = {new: entry for new, entry in table.items() if entry[0] not in placeholders}
    if any(k.startswith("cfg_embedder.") for k in keys):
        table = {(_SANA_SPRINT_TIME + new[len(_SANA_PLAIN_TIME):] if new.startswith(_SANA_PLAIN_TIME) else new): entry
                 for new, entry in table.items()}
    for key in keys:
        module, _, param = key.rpartition(".")
        block = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if block is not None and block.group(2) in _SANA_BLOCK_EXTRA:
            table[f"transformer_blocks.{block.group(1)}.{_SANA_BLOCK_EXTRA[block.group(2)]}"] = (key, WHOLE)
        elif module in _SANA_GUIDANCE:
            table[f"{_SANA_GUIDANCE[module]}.{param}"] = (key, WHOLE)
    return table
