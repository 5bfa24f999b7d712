"""Original single-file SD3/SD3.5, FLUX (BFL), PixArt and SANA checkpoints against diffusers-keyed partners.

Tiny real diffusers transformers (random weights) are written twice on disk: as a diffusers folder and,
through the independent converters of ``tests/support/transformer_layout.py``, in the original layout
with fused q/k/v (and FLUX's fused q/k/v/MLP). Opened through ``open_checkpoint`` the original must give
the very same tensors under diffusers names, so ``compare`` finds no change anywhere, and a change planted
in the q rows of a fused weight shows up in ``to_q`` alone."""

import pytest
import torch
from safetensors.torch import save_file

from tests.support.transformer_layout import flux_to_original, pixart_to_original, sana_to_original, sd3_to_original
from wadi_analysis import compare, open_checkpoint
from wadi_analysis.checkpoint import CheckpointError, TensorInfo
from wadi_analysis.examples import real_config
from wadi_analysis.transformer_layouts import HALVES, WHOLE, original_layout_mapping, rows_of


def tiny_model(family):
    from diffusers import (FluxTransformer2DModel, PixArtTransformer2DModel, SanaTransformer2DModel,
                           SD3Transformer2DModel)

    torch.manual_seed(0)
    if family.startswith("sana"):  # sana-sprint: SANA-Sprint's guidance embedder and q/k RMS norms (as SANA-1.5)
        sprint = dict(guidance_embeds=True, qk_norm="rms_norm_across_heads") if family == "sana-sprint" else {}
        return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                      num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                      cross_attention_dim=16, caption_channels=24, sample_size=8, **sprint)
    if family == "sd3":  # SD3.5-style: a dual-attention block and RMS q/k norms; the last block context_pre_only
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                     dual_attention_layers=(0,), qk_norm="rms_norm")
    if family.startswith("flux"):
        return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16, caption_channels=24, sample_size=8,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000)


TO_ORIGINAL = {"sd3": sd3_to_original, "flux": flux_to_original, "flux-comfy": flux_to_original,
               "pixart": pixart_to_original, "sana": sana_to_original, "sana-sprint": sana_to_original}
# The fused weight holding block 0's q rows first, and the diffusers names that fused weight feeds.
Q_ROWS = {"sd3": ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "transformer_blocks.0.attn.to_q"),
          "flux": ("single_blocks.1.linear1.weight", "single_transformer_blocks.1.attn.to_q"),
          "pixart": ("blocks.0.attn.qkv.weight", "transformer_blocks.0.attn1.to_q"),
          "sana": ("blocks.1.attn.qkv.weight", "transformer_blocks.1.attn1.to_q")}


def original_state(family, state):
    if family == "flux-comfy":
        return flux_to_original(state, prefix="model.diffusion_model.")
    return TO_ORIGINAL[family](state)


_BUILT = {}


def build_pair(family, tmp_path_factory):
    """(family, diffusers state, original-layout state, folder with original.safetensors and diffusers/)."""
    if family in _BUILT:
        return _BUILT[family]
    root = tmp_path_factory.mktemp(family)
    model = tiny_model(family)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = original_state(family, state)
    if family == "sd3":  # a single file holds the text encoders and VAE too: left out, not compared
        original["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
        original["first_stage_model.decoder.conv_in.weight"] = torch.ones(4, 4, 3, 3)
    save_file(original, root / "original.safetensors")
    model.save_pretrained(root / "diffusers")
    _BUILT[family] = family, state, original, root
    return _BUILT[family]


@pytest.fixture(scope="module", params=list(TO_ORIGINAL))
def pair(request, tmp_path_factory):
    return build_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=list(Q_ROWS))
def fused_pair(request, tmp_path_factory):
    return build_pair(request.param, tmp_path_factory)


def test_original_layout_reads_the_diffusers_tensors(pair):
    family, state, _, root = pair
    with open_checkpoint(root / "original.safetensors") as source:
        assert sorted(source.names()) == sorted(state)
        for name, expected in state.items():
            assert source.info(name).shape == tuple(expected.shape), name
            assert torch.equal(source.tensor(name), expected), name
        mapping = source.key_mapping
        assert mapping.layout == f"original {family.split('-')[0]}" and not mapping.unmapped
        assert len(mapping.ignored) == (2 if family == "sd3" else 0)
        assert source.format.endswith(f"original {family.split('-')[0]} keys")


def test_compare_original_against_diffusers_finds_no_change(pair):
    family, state, _, root = pair
    result = compare(root / "original.safetensors", root / "diffusers")
    layers = result.layers
    assert not result.summary["missing_in_teacher"] and not result.summary["missing_in_student"]
    assert not result.summary["shape_mismatches"]
    assert set(layers["name"]) == {n for n, t in state.items() if t.ndim >= 2}
    assert (layers["direction_change_max"] == 0).all() and (layers["norm_change_max"] == 0).all()
    linear = layers[layers["kind"] == "linear"]
    assert not (linear["group"] == "other").any()


def test_a_change_in_q_rows_shows_up_in_to_q_alone(fused_pair, tmp_path):
    family, _, original, root = fused_pair
    fused_key, to_q = Q_ROWS[family]
    changed = dict(original)
    fused = changed[fused_key].clone()
    width = fused.shape[1]
    q_rows = fused.shape[0] // (7 if family == "flux" else 3)
    fused[:q_rows] = torch.roll(fused[:q_rows], 1, dims=1) + 0.1 * torch.randn(q_rows, width)
    changed[fused_key] = fused
    save_file(changed, tmp_path / "student.safetensors")
    layers = compare(root / "diffusers", tmp_path / "student.safetensors").layers.set_index("name")
    moved = layers.index[layers["direction_change_max"] > 0].tolist()
    assert moved == [f"{to_q}.weight"]
    assert layers.loc[f"{to_q}.weight", "direction_change_mean"] > 1


def test_row_ranges_are_views_of_the_file(fused_pair):
    family, _, _, root = fused_pair
    fused_key, to_q = Q_ROWS[family]
    with open_checkpoint(root / "original.safetensors") as source:
        whole = source.raw_source.tensor(fused_key)
        q = source.tensor(f"{to_q}.weight")
        assert q.data_ptr() == whole.data_ptr()  # the first rows, no copy
        assert source.raw_name(f"{to_q}.weight") == fused_key


def test_flux_table_agrees_with_diffusers_converter_on_flux1_dev():
    """On the real FLUX.1-dev names and shapes (meta device) the project's FLUX table takes the same rows
    of the same keys as diffusers' converter (which fixes FLUX.1's width 3072, hence the project's own table)."""
    check_against_converter("flux1_dev_transformer", flux_to_original,
                            "convert_flux_transformer_checkpoint_to_diffusers")


def test_sd3_tags_agree_with_diffusers_converter_on_sd3_medium():
    """The SD3 mapping from 12-row tags equals the converter's on the real SD3-medium row counts."""
    check_against_converter("sd3_medium_transformer", sd3_to_original,
                            "convert_sd3_transformer_checkpoint_to_diffusers")


def test_sana_tags_agree_with_diffusers_converter_on_sana_1600m():
    """On the real SANA-1600M names and row counts, with the fixed sin-cos table and null caption the original
    file also holds (the converter drops both), the mapping takes the converter's rows."""
    check_against_converter("sana_1600m_1024px_transformer", sana_to_original,
                            "convert_sana_transformer_to_diffusers",
                            extra={"pos_embed": (1, 1024, 2240), "y_embedder.y_embedding": (300, 2304)})


def check_against_converter(config, to_original, converter_name, extra=None):
    """Tag every stored row with its global index; the converter's outputs must hold exactly the rows the
    project's mapping names (``extra``: keys without a diffusers weight, by shape)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders import single_file_utils

    cls = next(c for prefix, c in (("flux", FluxTransformer2DModel), ("sana", SanaTransformer2DModel),
                                   ("sd3", SD3Transformer2DModel)) if config.startswith(prefix))
    with init_empty_weights():
        model = cls.from_config(real_config(config))
    original = to_original(dict(model.state_dict()))
    shapes = {k: tuple(v.shape) for k, v in original.items()} | (extra or {})
    offsets, start = {}, 0
    for key, shape in shapes.items():
        offsets[key] = start
        start += shape[0]
    tags = {k: torch.arange(offsets[k], offsets[k] + shapes[k][0]) for k in shapes}
    converted = getattr(single_file_utils, converter_name)(dict(tags))
    mapping = original_layout_mapping(list(shapes))
    assert set(mapping.names) == set(converted) == set(model.state_dict())
    for name, tag in converted.items():
        key = mapping.names[name]
        ranges = rows_of(TensorInfo(shapes[key], torch.float32), mapping.rows.get(name, WHOLE))
        expected = torch.cat([torch.arange(offsets[key] + a, offsets[key] + b) for a, b in ranges])
        assert torch.equal(tag, expected), name


def test_fused_rows_that_do_not_split_are_refused(tmp_path):
    state = pixart_to_original({k: v.detach().clone() for k, v in tiny_model("pixart").state_dict().items()})
    state["blocks.1.attn.qkv.weight"] = torch.zeros(50, 16)  # 50 rows are not q, k and v of one width
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="do not split into the parts of a fused weight"):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_incomplete_sd3_file_is_a_user_error(tmp_path):
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(48, 16)},
              tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="SD3 keys"):
        open_checkpoint(tmp_path / "partial.safetensors")


def test_pixart_keys_without_a_diffusers_weight_are_reported_unmapped(tmp_path):
    """The original PixArt file's fixed sin-cos ``pos_embed`` and its null caption ``y_embedding`` have no
    diffusers weight (diffusers recomputes the one, the pipeline holds the other): unmapped, not compared."""
    state = pixart_to_original({k: v.detach().clone() for k, v in tiny_model("pixart").state_dict().items()})
    state["pos_embed"] = torch.zeros(1, 16, 16)
    state["y_embedder.y_embedding"] = torch.zeros(120, 24)
    save_file(state, tmp_path / "pixart.safetensors")
    with open_checkpoint(tmp_path / "pixart.safetensors") as source:
        assert sorted(source.key_mapping.unmapped) == ["pos_embed", "y_embedder.y_embedding"]
        # per block, qkv (weight, bias) gives six tensors and kv_linear four: 2 blocks x (4 + 2) fewer raw keys
        assert "pos_embed" not in source.names() and len(source.raw_source) == len(source) - 2 * (4 + 2) + 2


def test_swap_with_a_fused_original_student_is_a_user_error(fused_pair, tmp_path):
    """swap writes the student's own layout; a fused q/k/v student cannot take per-weight hybrids."""
    from wadi_analysis.swap import swap

    _, _, original, root = fused_pair
    save_file(original, tmp_path / "student.safetensors")
    with pytest.raises(CheckpointError, match="fuses q, k, v"):
        swap(root / "diffusers", tmp_path / "student.safetensors", tmp_path / "hybrid.safetensors")
    assert not (tmp_path / "hybrid.safetensors").exists()


def test_sana_keys_without_a_diffusers_weight_are_reported_unmapped(tmp_path):
    """A SANA-Sprint file's fixed ``pos_embed``, null caption ``y_embedding`` and its training-only
    ``logvar_linear`` have no diffusers weight: unmapped, not compared. The file is SANA's, not PixArt's,
    though both have ``blocks.N.attn.qkv`` and ``t_block``."""
    state = sana_to_original({k: v.detach().clone() for k, v in tiny_model("sana-sprint").state_dict().items()})
    extra = {"pos_embed": torch.zeros(1, 16, 16), "y_embedder.y_embedding": torch.zeros(10, 24),
             "logvar_linear.weight": torch.zeros(1, 16), "logvar_linear.bias": torch.zeros(1)}
    save_file(state | extra, tmp_path / "sprint.safetensors")
    with open_checkpoint(tmp_path / "sprint.safetensors") as source:
        mapping = source.key_mapping
        assert mapping.layout == "original sana" and sorted(mapping.unmapped) == sorted(extra)
        assert mapping.names["time_embed.guidance_embedder.linear_2.weight"] == "cfg_embedder.mlp.2.weight"
        assert mapping.names["transformer_blocks.1.attn2.norm_k.weight"] == "blocks.1.cross_attn.k_norm.weight"
        assert mapping.names["transformer_blocks.0.attn2.to_v.bias"] == "blocks.0.cross_attn.kv_linear.bias"
        assert mapping.rows["transformer_blocks.0.attn2.to_v.bias"] == (HALVES[1],)


def test_a_change_in_sana_kv_rows_shows_up_in_to_v_alone(tmp_path_factory, tmp_path):
    """The second half of the cross-attention's fused kv_linear is attn2.to_v (weight and bias)."""
    _, _, original, root = build_pair("sana", tmp_path_factory)
    changed = dict(original)
    kv = changed["blocks.0.cross_attn.kv_linear.weight"].clone()
    half = kv.shape[0] // 2
    kv[half:] = torch.roll(kv[half:], 1, dims=1)
    changed["blocks.0.cross_attn.kv_linear.weight"] = kv
    save_file(changed, tmp_path / "student.safetensors")
    layers = compare(root / "diffusers", tmp_path / "student.safetensors").layers.set_index("name")
    assert layers.index[layers["direction_change_max"] > 0].tolist() == ["transformer_blocks.0.attn2.to_v.weight"]
