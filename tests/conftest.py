"""Shared fixtures: a tiny SD1.5-layout U-Net pair written to disk in every supported format.

Weights are rounded to values that bf16 and fp16 both hold exactly, so every format stores the very
same numbers and every pairing of formats must give the very same table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.support.ldm_layout import to_ldm_state_dict
from wadi_analysis.examples import planted_student, tiny_sd15_config

SMALLEST_FP16_NORMAL = 2.0 ** -14

# pytest-xdist runs one process per core: more torch threads than that only contend (and OpenMP
# barriers stall badly on a loaded machine). Tests measure results, never speed.
torch.set_num_threads(1)


def representable_in_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        value = value.float().bfloat16().float()
        value[value.abs() < SMALLEST_FP16_NORMAL] = 0.0
        out[name] = value
    return out


def build_unet(state=None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**tiny_sd15_config())
    if state is not None:
        model.load_state_dict(state)
    return model


def write_formats(state: dict[str, torch.Tensor], root: Path) -> dict[str, Path]:
    """The same weights as every checkpoint format the reader supports."""
    root.mkdir(parents=True)
    config = tiny_sd15_config()
    model = build_unet(state)
    paths = {}
    model.save_pretrained(root / "diffusers")
    paths["diffusers_folder"] = root / "diffusers"
    model.save_pretrained(root / "sharded", max_shard_size="1MB")
    paths["sharded_index"] = root / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    paths["sharded_folder"] = root / "sharded"
    model.half().save_pretrained(root / "fp16_variant", variant="fp16")
    paths["fp16_variant_folder"] = root / "fp16_variant"
    pipeline = root / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}))
    save_file(state, pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    (pipeline / "unet" / "config.json").write_text(json.dumps(config))
    paths["pipeline_folder"] = pipeline
    paths["single"] = root / "single.safetensors"
    save_file(state, paths["single"])
    paths["fp16_single"] = root / "fp16.safetensors"
    save_file({k: v.half() for k, v in state.items()}, paths["fp16_single"])
    paths["bf16_single"] = root / "bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in state.items()}, paths["bf16_single"])
    paths["bin"] = root / "model.bin"
    torch.save(state, paths["bin"])
    paths["prefixed_pt"] = root / "prefixed.pt"
    torch.save({"module." + k: v for k, v in state.items()}, paths["prefixed_pt"])
    # An original single-file SD checkpoint: U-Net under LDM names beside other components and an
    # EMA copy (which must be ignored unless asked for).
    ldm = to_ldm_state_dict(state, layers_per_block=config["layers_per_block"],
                            num_levels=len(config["block_out_channels"]))
    others = {"first_stage_model.decoder.conv_in.weight": torch.ones(4, 4, 3, 3),
              "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    ema = {"model_ema." + k[len("model."):].replace(".", ""): 2 * v for k, v in ldm.items()}
    paths["ldm_single"] = root / "ldm.safetensors"
    save_file({**ldm, **others, **ema}, paths["ldm_single"])
    paths["ldm_ckpt"] = root / "ldm.ckpt"
    torch.save({"state_dict": {k: v.half() for k, v in {**ldm, **others}.items()}, "global_step": 7}, paths["ldm_ckpt"])
    return paths


@pytest.fixture(scope="session")
def tiny_pair():
    """(teacher_state, student_state) of the tiny SD1.5-layout U-Net with planted changes, half-exact."""
    teacher = representable_in_half(build_unet().state_dict())
    student, _ = planted_student(teacher, seed=1)
    return teacher, representable_in_half(student)


@pytest.fixture(scope="session")
def formats(tiny_pair, tmp_path_factory):
    """{"teacher": {format: path}, "student": {format: path}}."""
    root = tmp_path_factory.mktemp("formats")
    return {"teacher": write_formats(tiny_pair[0], root / "teacher"),
            "student": write_formats(tiny_pair[1], root / "student")}
