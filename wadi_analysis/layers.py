"""Taxonomy of a weight from its diffusers name and shape: kind, block, role and role group.

Works for SD1.x/SD2.x/SDXL U-Nets (UNet2DConditionModel), PixArt/DiT transformers and the flow-matching
transformers SD3/SD3.5 (SD3Transformer2DModel), FLUX.1 (FluxTransformer2DModel: ``transformer_blocks`` are
its double blocks, ``single_transformer_blocks`` its single blocks) and SANA (SanaTransformer2DModel:
linear self-attention ``attn1``, cross-attention ``attn2``, GLUMBConv feed-forward), and degrades
gracefully (group ``other``) for anything else. Examples::

    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight -> linear, down_blocks.1, attn2.to_k, attn2
    up_blocks.2.resnets.1.conv1.weight                                -> conv,   up_blocks.2,   resnet.conv1, resnet
    down_blocks.0.attentions.0.proj_in.weight  (SD1: 1x1 conv)        -> conv,   down_blocks.0, proj_in, proj
    transformer_blocks.7.ff.net.0.proj.weight                         -> linear, transformer_blocks.7, ff.in, ff
    transformer_blocks.3.attn.add_q_proj.weight  (SD3/FLUX context)   -> linear, transformer_blocks.3, attn.add_q_proj, attn
    single_transformer_blocks.3.proj_mlp.weight  (FLUX single block)  -> linear, single_transformer_blocks.3, proj_mlp, ff
    transformer_blocks.2.ff.conv_depth.weight    (SANA GLUMBConv)     -> conv,   transformer_blocks.2, ff.conv_depth, ff
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (pattern on the name inside its block without ".weight", role template, group); first match wins.
_ROLE_RULES: list[tuple[re.Pattern, str, str]] = [(re.compile(p), r, g) for p, r, g in [
    (r"(?:^|\.)(attn\d*)\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)(?:\.\d+)?$",
     r"\1.\2", r"\1"),
    (r"(?:^|\.)(attn\d*)\.(\w+)(?:\.\d+)?$", r"\1.\2", r"\1"),
    (r"(?:^|\.)ff(_context)?\.net\.0(?:\.proj)?$", r"ff\1.in", "ff"),
    (r"(?:^|\.)ff(_context)?\.net\.2$", r"ff\1.out", "ff"),
    (r"(?:^|\.)ff\.(conv_inverted|conv_depth|conv_point)$", r"ff.\1", "ff"),  # SANA's GLUMBConv
    (r"(?:^|\.)resnets\.\d+\.time_emb_proj$", "time_emb_proj", "resnet"),
    (r"(?:^|\.)resnets\.\d+\.(conv1|conv2|conv_shortcut)$", r"resnet.\1", "resnet"),
    (r"(?:^|\.)attentions\.\d+\.(proj_in|proj_out)$", r"\1", "proj"),
    (r"^downsamplers\.\d+\.(?:conv|op)$", "downsample", "sampler"),
    (r"^upsamplers\.\d+\.conv$", "upsample", "sampler"),
    (r"(?:^|\.)(timestep_embedder|time_embedding|add_embedding|class_embedding|caption_projection|"
     r"text_embedder|guidance_embedder|resolution_embedder|aspect_ratio_embedder)\.(linear_\d)$", r"\1.\2", "embedding"),
    (r"(?:^|\.)(class_embedder|class_embedding)(?:\.embedding_table)?$", "class_embedding", "embedding"),
    (r"^(norm\w*)\.linear$", r"\1.linear", "modulation"),
    (r"^(?:adaln_single|time_embed)\.linear$", "adaln.linear", "modulation"),  # SANA names it time_embed
    (r"(?:^|\.)scale_shift_table$", "scale_shift_table", "modulation"),
    (r"^(?:pos_embed|patch_embed)\.proj$|^x_embedder$", "patch_embed", "io"),  # FLUX: a Linear on packed patches
    (r"^pos_embed(?:\.pos_embed)?$", "pos_embed", "embedding"),  # SD3's fixed sin-cos table (a buffer)
    (r"^context_embedder$", "context_embedder", "embedding"),
    (r"^(conv_in|conv_out)$", r"\1", "io"),
    (r"^(proj_out(?:_\d)?|proj_in)$", r"\1", "io"),
]]
# Inside a block first: FLUX's single blocks fuse attention and MLP (proj_mlp is the MLP's up projection,
# proj_out maps [attention, MLP] back to the width), names that at the top level mean the output layer.
_IN_BLOCK_RULES: list[tuple[re.Pattern, str, str]] = [(re.compile(p), r, g) for p, r, g in [
    (r"^proj_mlp$", "proj_mlp", "ff"),
    (r"^proj_out$", "proj_out", "attn+ff"),
]]
_BLOCK = re.compile(r"^((?:down_blocks|up_blocks|transformer_blocks|single_transformer_blocks|blocks)\.\d+|mid_block)\.")
_EMBEDDING_TABLE = re.compile(r"(embedding_table|(^|\.)class_embedding|token_embedding|position_embedding)$")
_FREE_PARAMETER = re.compile(r"(scale_shift_table|(^|\.)pos_embed)$")


@dataclass(frozen=True)
class LayerLabel:
    kind: str   # linear | conv | embedding | param | vector
    block: str  # down_blocks.1, mid_block, up_blocks.0, transformer_blocks.7, time_embedding, ...
    role: str   # attn2.to_k, ff.in, resnet.conv1, time_emb_proj, proj_in, ...
    group: str  # attn, attn1, attn2, ff, attn+ff, resnet, proj, sampler, embedding, modulation, io, other


def weight_kind(name: str, ndim: int) -> str:
    """linear (2-D), conv (3-D and up), embedding tables and free 2-D parameters, vector (< 2-D)."""
    stem = name[:-len(".weight")] if name.endswith(".weight") else name
    if ndim < 2:
        return "vector"
    if ndim >= 3 and not _FREE_PARAMETER.search(stem):  # SD3's pos_embed.pos_embed is (1, tokens, width)
        return "conv"
    if _EMBEDDING_TABLE.search(stem):
        return "embedding"
    if _FREE_PARAMETER.search(stem) or not name.endswith(".weight"):
        return "param"
    return "linear"


def label(name: str, ndim: int = 2) -> LayerLabel:
    """Kind, block and role of the weight called ``name`` (diffusers naming)."""
    stem = name[:-len(".weight")] if name.endswith(".weight") else name
    match = _BLOCK.match(stem + ".")
    if match:
        block = match.group(1)
        local = stem[match.end():]
    else:  # a top-level module (time_embedding, conv_in, adaln_single, ...): its own name is the context
        block, local = stem.split(".")[0], stem
    # The role is read from the full path below the block, so names like attentions.0.proj_in keep context.
    for pattern, role, group in (_IN_BLOCK_RULES if match else []) + _ROLE_RULES:
        found = pattern.search(local)
        if found:
            return LayerLabel(weight_kind(name, ndim), block, found.expand(role), found.expand(group))
    return LayerLabel(weight_kind(name, ndim), block, re.sub(r"\.\d+(?=\.|$)", "", local), "other")
