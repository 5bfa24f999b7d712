"""Independent diffusers -> original single-file converters for SD3/SD3.5, FLUX (BFL layout), PixArt and SANA.

Tests need original-layout checkpoints built from small random diffusers transformers, so that the
project's original -> diffusers mapping (``wadi_analysis.transformer_layouts``, partly diffusers' own
converter) is checked against tables that come from neither: written out by hand here from the original
model code (SD3's ``MMDiT``: ``joint_blocks.N.{x_block,context_block}``; BFL's ``flux/model.py``:
``double_blocks``/``single_blocks``; PixArt's ``PixArtMS``: ``blocks.N``; NVlabs SANA's ``SanaMS``: ``blocks.N``
with ``LiteLA`` self-attention, ``MultiHeadCrossAttention`` and ``GLUMBConv``). Fused weights are their parts
concatenated by rows (output channels); where the original stores shift before scale (adaLN of the final
layer, SD3's last context block) the halves are swapped back. Nothing here imports ``wadi_analysis``.
"""

from __future__ import annotations

import re

import torch

SD3_PREFIX = "model.diffusion_model."


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) rows as the original's (shift, scale); the swap is its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _fuse(state: dict, out: dict, target: str, parts: list[str]) -> None:
    """``target.{weight,bias}`` = the ``parts``' rows stacked, for each parameter the parts have."""
    for param in ("weight", "bias"):
        names = [f"{p}.{param}" for p in parts]
        if all(n in state for n in names):
            out[f"{target}.{param}"] = torch.cat([state.pop(n) for n in names])


def _rename(state: dict, out: dict, table: dict[str, str], param_names: dict[str, str] | None = None) -> None:
    """Move every key starting with a table prefix to its original prefix (exact module names)."""
    for name in list(state):
        module, _, param = name.rpartition(".")
        if module in table:
            out[f"{table[module]}.{(param_names or {}).get(param, param)}"] = state.pop(name)


def _finish(state: dict, out: dict) -> dict:
    if state:
        raise KeyError(f"keys this converter does not place: {sorted(state)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- SD3 / SD3.5

def sd3_to_original(diffusers_state: dict, prefix: str = SD3_PREFIX) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in the original (SAI) single-file layout."""
    state, out = dict(diffusers_state), {}
    out["pos_embed"] = state.pop("pos_embed.pos_embed")
    _rename(state, out, {"pos_embed.proj": "x_embedder.proj",
                         "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                         "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
                         "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                         "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
                         "context_embedder": "context_embedder", "proj_out": "final_layer.linear"})
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(state.pop(f"norm_out.linear.{param}"))
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = f"{d}attn.to_add_out.weight" not in state  # context_pre_only: its adaLN has shift, scale only
        _fuse(state, out, x + "attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        _fuse(state, out, c + "attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        _fuse(state, out, x + "attn2.qkv", [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"])
        _rename(state, out, {d + "attn.norm_q": x + "attn.ln_q", d + "attn.norm_k": x + "attn.ln_k",
                             d + "attn.norm_added_q": c + "attn.ln_q", d + "attn.norm_added_k": c + "attn.ln_k",
                             d + "attn2.norm_q": x + "attn2.ln_q", d + "attn2.norm_k": x + "attn2.ln_k",
                             d + "attn.to_out.0": x + "attn.proj", d + "attn.to_add_out": c + "attn.proj",
                             d + "attn2.to_out.0": x + "attn2.proj", d + "norm1.linear": x + "adaLN_modulation.1",
                             d + "ff.net.0.proj": x + "mlp.fc1", d + "ff.net.2": x + "mlp.fc2",
                             d + "ff_context.net.0.proj": c + "mlp.fc1", d + "ff_context.net.2": c + "mlp.fc2"})
        for param in ("weight", "bias"):
            modulation = state.pop(f"{d}norm1_context.linear.{param}")
            out[f"{c}adaLN_modulation.1.{param}"] = _swap_halves(modulation) if last else modulation
    return {prefix + k: v for k, v in _finish(state, out).items()}


# ----------------------------------------------------------------------------- FLUX (Black Forest Labs)

def flux_to_original(diffusers_state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in BFL's layout (``flux1-dev.safetensors``: bare keys;
    ComfyUI-style files add ``model.diffusion_model.``)."""
    state, out = dict(diffusers_state), {}
    _rename(state, out, {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                         "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                         "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                         "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                         "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                         "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                         "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"})
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(state.pop(f"norm_out.linear.{param}"))
    scale = {"weight": "scale"}
    for kind, original in (("transformer_blocks", "double_blocks"), ("single_transformer_blocks", "single_blocks")):
        for i in sorted({int(m.group(1)) for k in state if (m := re.match(rf"{kind}\.(\d+)\.", k))}):
            d, o = f"{kind}.{i}.", f"{original}.{i}."
            if kind == "transformer_blocks":
                _fuse(state, out, o + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
                _fuse(state, out, o + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj",
                                                       d + "attn.add_v_proj"])
                _rename(state, out, {d + "attn.norm_q": o + "img_attn.norm.query_norm",
                                     d + "attn.norm_k": o + "img_attn.norm.key_norm",
                                     d + "attn.norm_added_q": o + "txt_attn.norm.query_norm",
                                     d + "attn.norm_added_k": o + "txt_attn.norm.key_norm"}, scale)
                _rename(state, out, {d + "norm1.linear": o + "img_mod.lin", d + "norm1_context.linear": o + "txt_mod.lin",
                                     d + "ff.net.0.proj": o + "img_mlp.0", d + "ff.net.2": o + "img_mlp.2",
                                     d + "ff_context.net.0.proj": o + "txt_mlp.0", d + "ff_context.net.2": o + "txt_mlp.2",
                                     d + "attn.to_out.0": o + "img_attn.proj", d + "attn.to_add_out": o + "txt_attn.proj"})
            else:
                _fuse(state, out, o + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"])
                _rename(state, out, {d + "attn.norm_q": o + "norm.query_norm", d + "attn.norm_k": o + "norm.key_norm"},
                        scale)
                _rename(state, out, {d + "norm.linear": o + "modulation.lin", d + "proj_out": o + "linear2"})
    return {prefix + k: v for k, v in _finish(state, out).items()}


# ----------------------------------------------------------------------------- PixArt-α / Σ

def pixart_to_original(diffusers_state: dict) -> dict[str, torch.Tensor]:
    """A PixArtTransformer2DModel state dict in the original PixArt layout (``blocks.N.attn.qkv``)."""
    state, out = dict(diffusers_state), {}
    _rename(state, out, {"pos_embed.proj": "x_embedder.proj",
                         "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
                         "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
                         "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
                         "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
                         "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
                         "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
                         "adaln_single.linear": "t_block.1", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
                         "caption_projection.linear_2": "y_embedder.y_proj.fc2", "proj_out": "final_layer.linear"})
    out["final_layer.scale_shift_table"] = state.pop("scale_shift_table")
    for i in sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = state.pop(d + "scale_shift_table")
        _fuse(state, out, o + "attn.qkv", [d + "attn1.to_q", d + "attn1.to_k", d + "attn1.to_v"])
        _fuse(state, out, o + "cross_attn.kv_linear", [d + "attn2.to_k", d + "attn2.to_v"])
        _rename(state, out, {d + "attn1.to_out.0": o + "attn.proj", d + "attn2.to_q": o + "cross_attn.q_linear",
                             d + "attn2.to_out.0": o + "cross_attn.proj", d + "ff.net.0.proj": o + "mlp.fc1",
                             d + "ff.net.2": o + "mlp.fc2"})
    return _finish(state, out)


# ----------------------------------------------------------------------------- SANA / SANA-1.5 / SANA-Sprint

def sana_to_original(diffusers_state: dict) -> dict[str, torch.Tensor]:
    """A SanaTransformer2DModel state dict in NVlabs' SANA layout (``blocks.N.attn.qkv``, ``cross_attn.q_linear``
    / ``kv_linear``, ``mlp.{inverted,depth,point}_conv.conv``); with guidance embeds (Sprint) the timestep
    embedder sits directly under ``time_embed`` and the guidance one is ``cfg_embedder``; q/k norms
    (``qk_norm``) are ``attn.q_norm`` / ``cross_attn.k_norm``..."""
    state, out = dict(diffusers_state), {}
    time = "time_embed.timestep_embedder" if "time_embed.guidance_embedder.linear_1.weight" in state else \
        "time_embed.emb.timestep_embedder"
    _rename(state, out, {"patch_embed.proj": "x_embedder.proj", f"{time}.linear_1": "t_embedder.mlp.0",
                         f"{time}.linear_2": "t_embedder.mlp.2", "time_embed.linear": "t_block.1",
                         "time_embed.guidance_embedder.linear_1": "cfg_embedder.mlp.0",
                         "time_embed.guidance_embedder.linear_2": "cfg_embedder.mlp.2",
                         "caption_projection.linear_1": "y_embedder.y_proj.fc1",
                         "caption_projection.linear_2": "y_embedder.y_proj.fc2", "caption_norm": "attention_y_norm",
                         "proj_out": "final_layer.linear"})
    out["final_layer.scale_shift_table"] = state.pop("scale_shift_table")
    for i in sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = state.pop(d + "scale_shift_table")
        _fuse(state, out, o + "attn.qkv", [d + "attn1.to_q", d + "attn1.to_k", d + "attn1.to_v"])
        _fuse(state, out, o + "cross_attn.kv_linear", [d + "attn2.to_k", d + "attn2.to_v"])
        _rename(state, out, {d + "attn1.to_out.0": o + "attn.proj", d + "attn1.norm_q": o + "attn.q_norm",
                             d + "attn1.norm_k": o + "attn.k_norm", d + "attn2.to_q": o + "cross_attn.q_linear",
                             d + "attn2.norm_q": o + "cross_attn.q_norm", d + "attn2.norm_k": o + "cross_attn.k_norm",
                             d + "attn2.to_out.0": o + "cross_attn.proj",
                             d + "ff.conv_inverted": o + "mlp.inverted_conv.conv",
                             d + "ff.conv_depth": o + "mlp.depth_conv.conv",
                             d + "ff.conv_point": o + "mlp.point_conv.conv"})
    return _finish(state, out)
