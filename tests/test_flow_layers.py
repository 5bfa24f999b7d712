"""The taxonomy and the LoRaD presets on the exact SD3-medium, FLUX.1-dev and SANA-1600M architectures
(meta device, no weights); their parameter counts and kinds are checked in tests/test_layers.py with SD1.5,
SDXL and PixArt."""

import pytest

from tests.test_layers import meta_model
from wadi_analysis.layers import label

FLOW_CONFIGS = ("sd3_medium_transformer", "flux1_dev_transformer", "sana_1600m_1024px_transformer")
# LoRaD trainable parameters of each preset on that config: (modules, parameters).
PRESET_COUNTS = {
    ("sd3_medium_transformer", "sd3-generator"): (333, 186_187_776),
    ("sd3_medium_transformer", "sd3-fake"): (285, 31_408_128),
    ("flux1_dev_transformer", "flux-generator"): (494, 537_919_488),
    ("flux1_dev_transformer", "flux-fake"): (418, 97_124_352),
    ("sana_1600m_1024px_transformer", "sana-generator"): (200, 113_254_400),
    ("sana_1600m_1024px_transformer", "sana-fake"): (200, 28_313_600),
}


@pytest.fixture(scope="module", params=FLOW_CONFIGS)
def architecture(request):
    return request.param, meta_model(request.param)


def test_every_block_is_found(architecture):
    """Blocks are the transformer's own blocks: FLUX's 19 double and 38 single, SD3's 24, SANA's 20."""
    name, model = architecture
    blocks = {label(n, t.ndim).block for n, t in model.state_dict().items()}
    expected = {"sd3_medium_transformer": {f"transformer_blocks.{i}" for i in range(24)},
                "flux1_dev_transformer": {f"transformer_blocks.{i}" for i in range(19)}
                | {f"single_transformer_blocks.{i}" for i in range(38)},
                "sana_1600m_1024px_transformer": {f"transformer_blocks.{i}" for i in range(20)}}[name]
    assert {b for b in blocks if "blocks." in b} == expected


@pytest.mark.parametrize("name,kind,block,role,group", [
    # SD3 / SD3.5 (joint attention, context stream, adaLN-Zero modulation)
    ("transformer_blocks.3.attn.to_q.weight", "linear", "transformer_blocks.3", "attn.to_q", "attn"),
    ("transformer_blocks.3.attn.add_k_proj.weight", "linear", "transformer_blocks.3", "attn.add_k_proj", "attn"),
    ("transformer_blocks.3.attn.to_out.0.weight", "linear", "transformer_blocks.3", "attn.to_out", "attn"),
    ("transformer_blocks.3.attn.to_add_out.weight", "linear", "transformer_blocks.3", "attn.to_add_out", "attn"),
    ("transformer_blocks.3.attn2.to_v.weight", "linear", "transformer_blocks.3", "attn2.to_v", "attn2"),  # SD3.5
    ("transformer_blocks.3.ff_context.net.0.proj.weight", "linear", "transformer_blocks.3", "ff_context.in", "ff"),
    ("transformer_blocks.3.ff.net.2.weight", "linear", "transformer_blocks.3", "ff.out", "ff"),
    ("transformer_blocks.3.norm1.linear.weight", "linear", "transformer_blocks.3", "norm1.linear", "modulation"),
    ("transformer_blocks.3.norm1_context.linear.weight", "linear", "transformer_blocks.3", "norm1_context.linear",
     "modulation"),
    ("norm_out.linear.weight", "linear", "norm_out", "norm_out.linear", "modulation"),
    ("proj_out.weight", "linear", "proj_out", "proj_out", "io"),
    ("pos_embed.proj.weight", "conv", "pos_embed", "patch_embed", "io"),
    ("pos_embed.pos_embed", "param", "pos_embed", "pos_embed", "embedding"),
    ("context_embedder.weight", "linear", "context_embedder", "context_embedder", "embedding"),
    ("time_text_embed.timestep_embedder.linear_1.weight", "linear", "time_text_embed", "timestep_embedder.linear_1",
     "embedding"),
    ("time_text_embed.text_embedder.linear_2.weight", "linear", "time_text_embed", "text_embedder.linear_2",
     "embedding"),
    # FLUX.1 single blocks and embedders
    ("single_transformer_blocks.5.attn.to_k.weight", "linear", "single_transformer_blocks.5", "attn.to_k", "attn"),
    ("single_transformer_blocks.5.proj_mlp.weight", "linear", "single_transformer_blocks.5", "proj_mlp", "ff"),
    ("single_transformer_blocks.5.proj_out.weight", "linear", "single_transformer_blocks.5", "proj_out", "attn+ff"),
    ("single_transformer_blocks.5.norm.linear.weight", "linear", "single_transformer_blocks.5", "norm.linear",
     "modulation"),
    ("x_embedder.weight", "linear", "x_embedder", "patch_embed", "io"),
    ("time_text_embed.guidance_embedder.linear_2.weight", "linear", "time_text_embed", "guidance_embedder.linear_2",
     "embedding"),
    # SANA: linear attention, cross-attention, GLUMBConv feed-forward
    ("transformer_blocks.2.attn1.to_q.weight", "linear", "transformer_blocks.2", "attn1.to_q", "attn1"),
    ("transformer_blocks.2.attn2.to_out.0.weight", "linear", "transformer_blocks.2", "attn2.to_out", "attn2"),
    ("transformer_blocks.2.ff.conv_inverted.weight", "conv", "transformer_blocks.2", "ff.conv_inverted", "ff"),
    ("transformer_blocks.2.ff.conv_depth.weight", "conv", "transformer_blocks.2", "ff.conv_depth", "ff"),
    ("transformer_blocks.2.ff.conv_point.weight", "conv", "transformer_blocks.2", "ff.conv_point", "ff"),
    ("time_embed.linear.weight", "linear", "time_embed", "adaln.linear", "modulation"),
    ("patch_embed.proj.weight", "conv", "patch_embed", "patch_embed", "io"),
])
def test_known_labels(name, kind, block, role, group):
    ndim = {"conv": 4, "param": 3}.get(kind, 2)
    found = label(name, ndim)
    assert (found.kind, found.block, found.role, found.group) == (kind, block, role, group)


@pytest.mark.parametrize("config,preset", list(PRESET_COUNTS))
def test_preset_parameter_counts_on_the_real_configs(config, preset):
    from wadi_distill import adapters, lorad

    model = meta_model(config)
    targets = lorad.resolve_preset(model, preset)
    modules, parameters = PRESET_COUNTS[config, preset]
    assert len(targets) == modules
    assert all(label(n + ".weight", 2).group not in ("embedding", "io") for n in targets)
    if preset.endswith("-fake"):  # attention and feed-forward only: no modulation
        assert all(label(n + ".weight", 2).group in ("attn", "attn1", "attn2", "ff", "attn+ff") for n in targets)
    assert not any(n.endswith("conv_depth") for n in targets)
    assert adapters.attach(model, "lorad", targets, "gen") == parameters
    print(f"{preset} on {config}: {parameters / 1e6:.2f} M trainable LoRaD parameters")
