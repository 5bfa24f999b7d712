"""Key names and file layouts of the two LoRA formats ``export --lora-rank/--lora-energy`` writes; the
factors themselves are :mod:`wadi_distill.lora_export`'s.

- **diffusers / peft** (``pytorch_lora_weights.safetensors``, diffusers' own default name, so
  ``pipe.load_lora_weights(EXPORT / "lora")`` finds it; every family, ``component`` ``unet`` for SD/SDXL and
  ``transformer`` for PixArt, SD3 and FLUX.1, the prefix SD3's and FLUX's loader mixins select by):
  ``{component}.{module}.lora_A.weight`` (down) and ``.lora_B.weight`` (up), as diffusers' ``save_lora_weights``
  writes them, with its ``lora_adapter_metadata`` (the peft ``LoraConfig``, keys prefixed with the
  component): the exact module names as one regex (peft full-matches a string ``target_modules``; a list
  would also match any module whose name ends in a target's), each module's rank in ``rank_pattern`` and
  alpha = rank in ``alpha_pattern`` (anchored with ``^``, which peft's ``(.*\\.)?(pattern)$`` then only
  matches at the start).
- **kohya** (``lora_kohya.safetensors``, U-Nets only): ``lora_unet_{name}.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (a scalar, = rank), ``name`` the module's name with ``.`` as ``_``:
  for SD 1.x/2.x the diffusers name (kohya's sd-scripts train that U-Net; diffusers' SD loader reads these
  names without a U-Net config), for SDXL the original (sgm/LDM) name, ``input_blocks.4.1...`` (what
  sd-scripts writes for SDXL; diffusers' SDXL loader maps it back with the U-Net's config). ComfyUI and
  A1111 read both spellings. The SDXL names come from :func:`ldm_names`, checked against diffusers' own
  LDM converter on every export. PixArt has no kohya layout (no tool reads one), so it gets none. Neither do
  SD3 and FLUX.1: diffusers' SD3 loader converts no kohya file at all, and its FLUX loader reads kohya files
  only in BFL's names with fused q/k/v (``lora_unet_double_blocks_0_img_attn_qkv``, ``single_blocks_N_linear1``),
  whose LoRA would be one factorisation of the fused change, not the per-layer one reported here.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from wadi_analysis.errors import UserError

PEFT_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
KOHYA_PREFIX = "lora_unet_"

# Top-level U-Net modules: diffusers name -> LDM name.
_LDM_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
# Inside a ResnetBlock2D: diffusers name -> LDM ResBlock name.
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def peft_state(component: str, layers) -> dict[str, torch.Tensor]:
    """``{component}.{module}.lora_A.weight`` = down, ``.lora_B.weight`` = up."""
    state = {}
    for layer in layers:
        state[f"{component}.{layer.name}.lora_A.weight"] = layer.down
        state[f"{component}.{layer.name}.lora_B.weight"] = layer.up
    return state


def peft_config(component: str, layers) -> dict:
    """The ``LoraConfig`` fields diffusers reads from ``lora_adapter_metadata``, prefixed with ``component``."""
    ranks = {layer.name: layer.rank for layer in layers}
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(name)}": rank for name, rank in ranks.items()}
    config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": "^(?:" + "|".join(map(re.escape, ranks)) + ")$", "use_dora": False,
              "lora_bias": False, "bias": "none", "init_lora_weights": True}
    return {f"{component}.{key}": value for key, value in config.items()}


def write_peft(path: Path, layers, component: str) -> None:
    """The diffusers / peft LoRA file."""
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(peft_config(component, layers), sort_keys=True)}
    save_file(peft_state(component, layers), path, metadata=metadata)


def ldm_names(denoiser: nn.Module) -> dict[str, str]:
    """The original (LDM/sgm) name of every parameter of a ``UNet2DConditionModel``, by diffusers name, checked
    to map back exactly under diffusers' own converter (:func:`wadi_analysis.keymap.ldm_unet_mapping`)."""
    from wadi_analysis.keymap import LDM_UNET_PREFIX, ldm_unet_mapping

    names = list(denoiser.state_dict())
    table = _ldm_block_table(denoiser, names)
    out = {}
    for name in names:
        prefix = next((p for p in table if name.startswith(p + ".")), None)
        if prefix is None:
            raise UserError(f"the U-Net's {name} has no place in the original (LDM) layout; no kohya file for it")
        ldm, resnet = table[prefix]
        rest = name[len(prefix) + 1:]
        if resnet:
            module, _, parameter = rest.partition(".")
            rest = f"{_LDM_RESNET.get(module, module)}.{parameter}"
        out[name] = f"{ldm}.{rest}"
    try:
        back = ldm_unet_mapping([LDM_UNET_PREFIX + v for v in out.values()]).names
    except ValueError as exc:
        raise UserError(f"the U-Net's original (LDM) names are not diffusers' ({exc}); no kohya file for it") from None
    wrong = [n for n in names if back.get(n) != LDM_UNET_PREFIX + out[n]]
    if wrong:
        raise UserError(f"the U-Net's {wrong[0]} does not map back from its LDM name {out[wrong[0]]} under diffusers' "
                        "converter; no kohya file for it")
    return out


def _ldm_block_table(denoiser: nn.Module, names: list[str]) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (LDM prefix, is a ResnetBlock2D). With L layers per level: down level i
    layer j is ``input_blocks.{(L+1)i+j+1}`` (.0 resnet, .1 attention), its downsampler
    ``input_blocks.{(L+1)(i+1)}.0.op``; up level i layer j (L+1 of them) ``output_blocks.{(L+1)i+j}``, the
    upsampler in its last, at .2 after an attention, else .1; the middle block 0/1/2."""
    config = denoiser.config
    per, levels = config.layers_per_block, len(config.block_out_channels)
    if not isinstance(per, int):
        raise UserError("the U-Net has different layers per block; the original (LDM) layout has one count")
    table = {d: (ldm, False) for d, ldm in _LDM_TOP_LEVEL.items()}
    table.update({"mid_block.resnets.0": ("middle_block.0", True), "mid_block.attentions.0": ("middle_block.1", False),
                  "mid_block.resnets.1": ("middle_block.2", True)})
    for i in range(levels):
        for j in range(per):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{(per + 1) * i + j + 1}.0", True)
            table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{(per + 1) * i + j + 1}.1", False)
        for j in range(per + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{(per + 1) * i + j}.0", True)
            table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{(per + 1) * i + j}.1", False)
        table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(per + 1) * (i + 1)}.0.op", False)
        attention = any(n.startswith(f"up_blocks.{i}.attentions.") for n in names)
        table[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{(per + 1) * i + per}.{2 if attention else 1}", False)
    return table


def kohya_names(family: str, denoiser: nn.Module, layers) -> dict[str, str]:
    """``lora_unet_...`` of every layer: SD 1.x/2.x by diffusers name, SDXL by original (LDM) name."""
    if family == "sdxl":
        ldm = ldm_names(denoiser)
        names = {layer.name: ldm[f"{layer.name}.weight"].removesuffix(".weight") for layer in layers}
    else:
        names = {layer.name: layer.name for layer in layers}
    return {module: KOHYA_PREFIX + name.replace(".", "_") for module, name in names.items()}


def kohya_state(names: dict[str, str], layers) -> dict[str, torch.Tensor]:
    """``{name}.lora_down.weight`` = down, ``.lora_up.weight`` = up, ``.alpha`` = rank (scale alpha / rank = 1)."""
    state = {}
    for layer in layers:
        name = names[layer.name]
        state[f"{name}.lora_down.weight"] = layer.down
        state[f"{name}.lora_up.weight"] = layer.up
        state[f"{name}.alpha"] = torch.tensor(float(layer.rank))
    return state


def write_kohya(path: Path, layers, family: str, denoiser: nn.Module) -> None:
    """The kohya LoRA file, with sd-scripts' descriptive metadata (ComfyUI and A1111 need none of it)."""
    state = kohya_state(kohya_names(family, denoiser, layers), layers)
    ranks = {layer.rank for layer in layers}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"  # what sd-scripts' resize_lora writes for per-layer ranks
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
                "wadi_lora": "truncated SVD of the merged one-step generator's change; alpha = rank per layer"}
    save_file(state, path, metadata=metadata)


def file_names(family: str) -> dict[str, str | None]:
    """{format: file name} for a denoiser family: peft always, kohya for U-Nets only (None: not written; PixArt,
    SD3, FLUX.1 and other transformers have no kohya layout diffusers reads in their diffusers names)."""
    return {"diffusers": PEFT_FILE, "kohya": KOHYA_FILE if family in ("unet", "sdxl") else None}


def write_files(folder: Path, layers, family: str, component: str, denoiser: nn.Module) -> None:
    """The LoRA files of :func:`file_names` in ``folder``."""
    names = file_names(family)
    write_peft(folder / names["diffusers"], layers, component)
    if names["kohya"] is not None:
        write_kohya(folder / names["kohya"], layers, family, denoiser)
