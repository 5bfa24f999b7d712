"""Checks the independent diffusers -> LDM U-Net key table in ldm_layout.py.

The table is cross-checked against diffusers' own LDM -> diffusers converter (allowed here; only
ldm_layout.py itself must stay independent of diffusers.loaders.single_file_utils).
"""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from tests.support.ldm_layout import LDM_PREFIX, diffusers_to_ldm_unet_names, to_ldm_state_dict

_COMMON = dict(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=32)

CONFIGS = {
    "sd1_L1": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, use_linear_projection=False,
    ),
    "sd1_L2": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=8, use_linear_projection=False,
    ),
    # Real SD1/SD2 depth: 4 levels -> input/output block indices reach 11 (two-digit indices).
    "sd2_4level_L2": dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 16, 32, 32), layers_per_block=2, attention_head_dim=8, use_linear_projection=True,
    ),
    "sdxl_L2": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def unet(request):
    torch.manual_seed(0)
    return UNet2DConditionModel(**_COMMON, **CONFIGS[request.param])


def _mapping(unet):
    cfg = unet.config
    return diffusers_to_ldm_unet_names(unet.state_dict(), cfg.layers_per_block, len(cfg.block_out_channels))


def test_one_to_one_and_complete(unet):
    mapping = _mapping(unet)
    assert set(mapping) == set(unet.state_dict())
    assert len(set(mapping.values())) == len(mapping)
    assert all(v.startswith(LDM_PREFIX) for v in mapping.values())


def test_matches_diffusers_ldm_converter(unet):
    cfg = unet.config
    mapping = _mapping(unet)
    checkpoint = {ldm: ldm for ldm in mapping.values()}
    conv_cfg = {"layers_per_block": cfg.layers_per_block, "addition_embed_type": cfg.addition_embed_type,
                "class_embed_type": None}
    assert convert_ldm_unet_checkpoint(checkpoint, conv_cfg) == mapping


def test_tensor_round_trip_loads_strictly(unet):
    cfg = unet.config
    ldm_sd = to_ldm_state_dict(unet.state_dict(), cfg.layers_per_block, len(cfg.block_out_channels))
    conv_cfg = {"layers_per_block": cfg.layers_per_block, "addition_embed_type": cfg.addition_embed_type}
    back = convert_ldm_unet_checkpoint(ldm_sd, conv_cfg)
    fresh = UNet2DConditionModel.from_config(cfg)
    fresh.load_state_dict(back, strict=True)
    for k, v in unet.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_known_names():
    names = ["down_blocks.0.downsamplers.0.conv.weight", "up_blocks.0.upsamplers.0.conv.bias",
             "up_blocks.1.attentions.0.proj_in.weight", "up_blocks.1.upsamplers.0.conv.weight",
             "down_blocks.1.resnets.1.conv_shortcut.weight", "add_embedding.linear_2.bias"]
    got = diffusers_to_ldm_unet_names(names, layers_per_block=2, num_levels=3)
    assert {k: v[len(LDM_PREFIX):] for k, v in got.items()} == {
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "up_blocks.0.upsamplers.0.conv.bias": "output_blocks.2.1.conv.bias",  # level 0 has no attention
        "up_blocks.1.attentions.0.proj_in.weight": "output_blocks.3.1.proj_in.weight",
        "up_blocks.1.upsamplers.0.conv.weight": "output_blocks.5.2.conv.weight",
        "down_blocks.1.resnets.1.conv_shortcut.weight": "input_blocks.5.0.skip_connection.weight",
        "add_embedding.linear_2.bias": "label_emb.0.2.bias",
    }


@pytest.mark.parametrize("bad", ["down_blocks.3.resnets.0.conv1.weight", "mid_block.resnets.0.foo.weight",
                                 "class_embedding.linear_1.weight", "up_blocks.2.upsamplers.0.conv.weight"])
def test_unknown_key_raises(bad):
    with pytest.raises(KeyError):
        diffusers_to_ldm_unet_names([bad], layers_per_block=2, num_levels=3)
