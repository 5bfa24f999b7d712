"""Independent diffusers -> original LDM (single-file Stable Diffusion) U-Net key converter.

Why this exists: tests need an "original single-file SD checkpoint" built from a small random
diffusers ``UNet2DConditionModel``, so that the project's LDM -> diffusers loading path (which
relies on diffusers' ``convert_ldm_unet_checkpoint``) can be checked against a table that does
*not* come from diffusers itself.  The rules below are therefore written out by hand, in the
spirit of the well-known ``convert_diffusers_to_original_stable_diffusion.py`` script
(``unet_conversion_map`` / ``_resnet`` / ``_layer``); nothing here imports
``diffusers.loaders.single_file_utils`` or ``DIFFUSERS_TO_LDM_MAPPING``.

Layout, with ``L = layers_per_block`` and ``n = num_levels`` (``len(block_out_channels)``):

* ``input_blocks.0.0`` is ``conv_in``; down level ``i`` layer ``j`` is ``input_blocks.{(L+1)*i+j+1}``
  (``.0`` resnet, ``.1`` attention), its downsampler ``input_blocks.{(L+1)*(i+1)}.0.op``.
* up level ``i`` layer ``j`` (``L+1`` layers) is ``output_blocks.{(L+1)*i+j}``; the upsampler sits in
  the level's last output block, at ``.2`` when the level has attentions, else at ``.1``.
* ``middle_block.0/1/2`` = ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``.
* Inside attention blocks (any number of ``transformer_blocks.N``, conv or linear ``proj_in``/
  ``proj_out``) names are identical in both layouts; inside resnets a few sub-modules are renamed.
"""

from __future__ import annotations

from typing import Iterable

LDM_PREFIX = "model.diffusion_model."

# Top-level modules: diffusers prefix -> LDM prefix.
_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL, addition_embed_type="text_time"
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}

# Sub-modules of a ResnetBlock2D: diffusers name -> LDM ResBlock name.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _block_table(names: set[str], layers_per_block: int, num_levels: int) -> dict[str, tuple[str, bool]]:
    """diffusers block prefix -> (LDM block prefix, is_resnet)."""
    L = layers_per_block
    table: dict[str, tuple[str, bool]] = {}
    for i in range(num_levels):
        for j in range(L):
            ldm = f"input_blocks.{(L + 1) * i + j + 1}"
            table[f"down_blocks.{i}.resnets.{j}."] = (f"{ldm}.0.", True)
            table[f"down_blocks.{i}.attentions.{j}."] = (f"{ldm}.1.", False)
        for j in range(L + 1):
            ldm = f"output_blocks.{(L + 1) * i + j}"
            table[f"up_blocks.{i}.resnets.{j}."] = (f"{ldm}.0.", True)
            table[f"up_blocks.{i}.attentions.{j}."] = (f"{ldm}.1.", False)
        if i < num_levels - 1:  # the deepest down level / last up level does not resample
            table[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(L + 1) * (i + 1)}.0.op.", False)
            has_attn = any(n.startswith(f"up_blocks.{i}.attentions.") for n in names)
            table[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{(L + 1) * i + L}.{2 if has_attn else 1}.", False)
    table["mid_block.resnets.0."] = ("middle_block.0.", True)
    table["mid_block.attentions.0."] = ("middle_block.1.", False)
    table["mid_block.resnets.1."] = ("middle_block.2.", True)
    for d, ldm in _TOP_LEVEL.items():
        table[d] = (ldm, False)
    return table


def diffusers_to_ldm_unet_names(names: Iterable[str], layers_per_block: int, num_levels: int) -> dict[str, str]:
    """Map each diffusers U-Net key to its LDM key (with the 'model.diffusion_model.' prefix).

    Raises KeyError for a key no rule covers, ValueError if two keys would collide.
    """
    names = list(names)
    table = _block_table(set(names), layers_per_block, num_levels)
    out: dict[str, str] = {}
    for name in names:
        matches = [p for p in table if name.startswith(p)]
        if len(matches) != 1:
            raise KeyError(f"cannot map diffusers U-Net key {name!r} (matching rules: {matches})")
        prefix = matches[0]
        ldm_prefix, is_resnet = table[prefix]
        rest = name[len(prefix):]
        if is_resnet:
            module, _, param = rest.partition(".")
            if module not in _RESNET:
                raise KeyError(f"unknown resnet sub-module in {name!r}")
            rest = f"{_RESNET[module]}.{param}"
        out[name] = LDM_PREFIX + ldm_prefix + rest
    if len(set(out.values())) != len(out):
        raise ValueError("diffusers -> LDM key mapping is not one-to-one")
    return out


def to_ldm_state_dict(unet_state_dict: dict, layers_per_block: int, num_levels: int) -> dict:
    """Same tensors under LDM names (prefixed with 'model.diffusion_model.')."""
    mapping = diffusers_to_ldm_unet_names(unet_state_dict, layers_per_block, num_levels)
    return {mapping[k]: v for k, v in unet_state_dict.items()}


# --- VAE (AutoencoderKL -> LDM ``first_stage_model.*``) and CLIP text encoder -----------------------
# Written out by hand as above (the layout of ``ldm.modules.diffusionmodules.model.Encoder/Decoder``),
# nothing taken from diffusers' converters.

LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP_LEVEL = {"conv_norm_out": "norm_out"}


def _vae_name(name: str, num_levels: int) -> tuple[str, bool]:
    """(LDM name, is a mid-block attention projection) of one diffusers AutoencoderKL key."""
    part, _, rest = name.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return name, False
    pieces = rest.split(".")
    if pieces[0] == "down_blocks":
        level, kind = pieces[1], pieces[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.P
            return f"{part}.down.{level}.downsample.{'.'.join(pieces[4:])}", False
        module, param = pieces[4], ".".join(pieces[5:])
        return f"{part}.down.{level}.block.{pieces[3]}.{_VAE_RESNET[module]}.{param}", False
    if pieces[0] == "up_blocks":
        level, kind = num_levels - 1 - int(pieces[1]), pieces[2]  # LDM counts up levels from the bottom
        if kind == "upsamplers":
            return f"{part}.up.{level}.upsample.{'.'.join(pieces[4:])}", False
        module, param = pieces[4], ".".join(pieces[5:])
        return f"{part}.up.{level}.block.{pieces[3]}.{_VAE_RESNET[module]}.{param}", False
    if pieces[0] == "mid_block":
        if pieces[1] == "resnets":
            return f"{part}.mid.block_{int(pieces[2]) + 1}.{_VAE_RESNET[pieces[3]]}.{'.'.join(pieces[4:])}", False
        inner = ".".join(pieces[3:])
        for diffusers_name, ldm_name in _VAE_ATTENTION.items():
            if inner.startswith(diffusers_name + "."):
                param = inner[len(diffusers_name) + 1:]
                return f"{part}.mid.attn_1.{ldm_name}.{param}", diffusers_name != "group_norm"
        raise KeyError(f"unknown VAE attention key {name!r}")
    module, param = pieces[0], ".".join(pieces[1:])
    return f"{part}.{_VAE_TOP_LEVEL.get(module, module)}.{param}", False


def vae_to_ldm_state_dict(vae_state_dict: dict, num_levels: int) -> dict:
    """An AutoencoderKL state dict under LDM names; the mid-block attention projections become 1x1
    convolutions, as the original VAE stores them."""
    out = {}
    for name, tensor in vae_state_dict.items():
        ldm, is_projection = _vae_name(name, num_levels)
        out[LDM_VAE_PREFIX + ldm] = tensor[:, :, None, None] if is_projection and tensor.ndim == 2 else tensor
    if len(out) != len(vae_state_dict):
        raise ValueError("diffusers -> LDM VAE key mapping is not one-to-one")
    return out


def clip_to_ldm_state_dict(text_encoder_state_dict: dict) -> dict:
    """A CLIPTextModel state dict under the original SD names (``cond_stage_model.transformer.text_model.*``);
    accepts both the nested (``text_model.*``) and the flattened key layout of transformers."""
    return {LDM_CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in text_encoder_state_dict.items()}
