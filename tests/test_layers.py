"""The taxonomy on the exact SD1.5, SD2.1, SDXL and PixArt-alpha architectures (meta device, no weights)."""

import collections

import pytest
import torch
from accelerate import init_empty_weights

from wadi_analysis.examples import real_config
from wadi_analysis.layers import label

# Published parameter counts; they pin the configs to the real architectures.
PARAMETERS = {"sd15_unet": 859_520_964, "sd21_unet": 865_910_724, "sdxl_unet": 2_567_463_684,
              "pixart_alpha_xl2_transformer": 610_856_096,
              # the flow-matching transformers (published 2.03 B, 11.9 B, 1.6 B): see tests/test_flow_layers.py
              "sd3_medium_transformer": 2_028_328_000, "flux1_dev_transformer": 11_901_408_320,
              "sana_1600m_1024px_transformer": 1_604_462_752}
MODEL_CLASSES = {"pixart_alpha_xl2_transformer": "PixArtTransformer2DModel",
                 "sd3_medium_transformer": "SD3Transformer2DModel", "flux1_dev_transformer": "FluxTransformer2DModel",
                 "sana_1600m_1024px_transformer": "SanaTransformer2DModel"}


def meta_model(name):
    import diffusers

    cls = getattr(diffusers, MODEL_CLASSES.get(name, "UNet2DConditionModel"))
    with init_empty_weights():
        return cls.from_config(real_config(name))


@pytest.fixture(scope="module", params=list(PARAMETERS))
def architecture(request):
    return request.param, meta_model(request.param)


def test_config_is_the_real_architecture(architecture):
    name, model = architecture
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_every_weight_is_labelled(architecture):
    _, model = architecture
    for weight_name, tensor in model.state_dict().items():
        if tensor.ndim < 2:
            continue
        found = label(weight_name, tensor.ndim)
        assert found.group != "other" and found.role and found.block, weight_name


def test_kinds_match_module_types(architecture):
    _, model = architecture
    state = model.state_dict()
    counted = collections.Counter(label(n, t.ndim).kind for n, t in state.items() if t.ndim >= 2)
    modules = list(model.modules())
    assert counted["linear"] == sum(isinstance(m, torch.nn.Linear) for m in modules)
    assert counted["conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in modules)
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            expected = "linear" if isinstance(module, torch.nn.Linear) else "conv"
            assert label(module_name + ".weight", module.weight.ndim).kind == expected, module_name
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            expected = "linear" if isinstance(module, torch.nn.Linear) else "conv"
            assert label(module_name + ".weight", module.weight.ndim).kind == expected, module_name


def test_sd1_projection_is_conv_and_sd2_linear():
    sd15 = meta_model("sd15_unet").state_dict()
    sd21 = meta_model("sd21_unet").state_dict()
    name = "down_blocks.1.attentions.0.proj_in.weight"
    assert label(name, sd15[name].ndim) == label(name, 4)
    assert label(name, sd15[name].ndim).kind == "conv" and label(name, sd21[name].ndim).kind == "linear"
    assert label(name, 4).role == "proj_in" and label(name, 4).block == "down_blocks.1"


@pytest.mark.parametrize("name,kind,block,role,group", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "linear", "down_blocks.1", "attn2.to_k", "attn2"),
    ("up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0.weight", "linear", "up_blocks.2", "attn1.to_out", "attn1"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", "linear", "mid_block", "ff.in", "ff"),
    ("down_blocks.0.resnets.1.conv1.weight", "conv", "down_blocks.0", "resnet.conv1", "resnet"),
    ("up_blocks.0.resnets.0.time_emb_proj.weight", "linear", "up_blocks.0", "time_emb_proj", "resnet"),
    ("up_blocks.0.resnets.0.conv_shortcut.weight", "conv", "up_blocks.0", "resnet.conv_shortcut", "resnet"),
    ("down_blocks.2.downsamplers.0.conv.weight", "conv", "down_blocks.2", "downsample", "sampler"),
    ("time_embedding.linear_1.weight", "linear", "time_embedding", "time_embedding.linear_1", "embedding"),
    ("add_embedding.linear_2.weight", "linear", "add_embedding", "add_embedding.linear_2", "embedding"),
    ("transformer_blocks.7.attn2.to_v.weight", "linear", "transformer_blocks.7", "attn2.to_v", "attn2"),
    ("transformer_blocks.7.scale_shift_table", "param", "transformer_blocks.7", "scale_shift_table", "modulation"),
    ("adaln_single.linear.weight", "linear", "adaln_single", "adaln.linear", "modulation"),
    ("adaln_single.emb.timestep_embedder.linear_1.weight", "linear", "adaln_single", "timestep_embedder.linear_1", "embedding"),
    ("caption_projection.linear_1.weight", "linear", "caption_projection", "caption_projection.linear_1", "embedding"),
    ("pos_embed.proj.weight", "conv", "pos_embed", "patch_embed", "io"),
    ("transformer_blocks.0.norm1.linear.weight", "linear", "transformer_blocks.0", "norm1.linear", "modulation"),
    ("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight", "embedding", "transformer_blocks.0",
     "class_embedding", "embedding"),
])
def test_known_labels(name, kind, block, role, group):
    ndim = 4 if kind == "conv" else 2
    found = label(name, ndim)
    assert (found.kind, found.block, found.role, found.group) == (kind, block, role, group)
