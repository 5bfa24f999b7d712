"""LoRA students (teacher + LoRA merged on the fly) against peft's and diffusers' own merges.

One peft LoRA (conv and linear targets, two ranks, alpha != rank, B != 0) on a tiny SD1.5-layout
U-Net is written in every supported file format; each must merge to the weights of the peft model
after ``fuse_lora()`` and give the very same comparison table. An SDXL-like U-Net (linear proj_in,
add_embedding) checks kohya's SGM names, a tiny PixArt the ``transformer.`` prefix.
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from tests.support.ldm_layout import LDM_PREFIX, diffusers_to_ldm_unet_names
from wadi_analysis import CheckpointError, compare, open_checkpoint
from wadi_analysis.checkpoint import TensorDictSource
from wadi_analysis.examples import tiny_sd15_config
from wadi_analysis.lora_student import LoraStudentSource, open_lora_student, read_lora

import peft  # noqa: E402  (a test dependency: missing peft must fail, not skip)

SD15_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv_shortcut",
                "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
SDXL_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32)
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "conv1", "conv2",
                "time_emb_proj", "linear_1", "linear_2", "conv_in", "conv_out", "conv_shortcut",
                "downsamplers.0.conv", "upsamplers.0.conv"]
TE_KOHYA = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}


def build(model_cls, config: dict, targets=None):
    """The base model, or the base with a peft LoRA (r=4, proj_in r=2, alpha=8, random B) when targets are given."""
    torch.manual_seed(0)
    model = model_cls(**config)
    if targets:
        torch.manual_seed(1)
        lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                      rank_pattern={"proj_in": 2} if "proj_in" in targets else {})
        if hasattr(model, "add_adapter"):
            model.add_adapter(lora_config)
        else:  # models without diffusers' PeftAdapterMixin (PixArt)
            peft.inject_adapter_in_model(lora_config, model)
            model.peft_config = {"default": lora_config}
    return model


def fused(lora_model, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The weights of the LoRA model merged by diffusers' fuse_lora() (peft's merge() where there is none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(lora_model)
    if hasattr(model, "fuse_lora"):
        model.fuse_lora(lora_scale=scale)
        model.unload_lora()
        return model.state_dict()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(scale)
            module.merge()
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def modules_of(lora_sd) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in lora_sd})


def kohya(lora_sd, rename) -> dict[str, torch.Tensor]:
    """kohya-ss layout of a peft state dict: lora_unet_<renamed module, underscored>.lora_down/lora_up/alpha."""
    out = {}
    for module in modules_of(lora_sd):
        stem = "lora_unet_" + rename(module).replace(".", "_")
        out[f"{stem}.lora_down.weight"] = lora_sd[f"{module}.lora_A.weight"]
        out[f"{stem}.lora_up.weight"] = lora_sd[f"{module}.lora_B.weight"]
        out[f"{stem}.alpha"] = torch.tensor(8.0)
    return out


def ldm_renamer(names, config):
    mapping = diffusers_to_ldm_unet_names(names, config["layers_per_block"], len(config["block_out_channels"]))
    return lambda module: mapping[module + ".weight"][len(LDM_PREFIX):-len(".weight")]


def attn_procs(lora_sd, scaling: dict[str, float]) -> dict[str, torch.Tensor]:
    """Old diffusers attention-processor names (no alphas: the scaling is folded into up)."""
    out = {}
    for module in modules_of(lora_sd):
        head, _, leaf = module.rpartition(".")
        if leaf in ("to_q", "to_k", "to_v") or module.endswith("to_out.0"):
            attn, proj = (module[:-len(".to_out.0")], "to_out") if module.endswith("to_out.0") else (head, leaf)
            stem = f"unet.{attn}.processor.{proj}_lora"
        else:
            stem = f"unet.{module}.lora"
        out[f"{stem}.down.weight"] = lora_sd[f"{module}.lora_A.weight"]
        out[f"{stem}.up.weight"] = lora_sd[f"{module}.lora_B.weight"] * scaling[module]
    return out


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora_sd15")
    config = tiny_sd15_config()
    build(UNet2DConditionModel, config).save_pretrained(root / "teacher")
    model = build(UNet2DConditionModel, config, SD15_TARGETS)
    lora_sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    lora_config = model.peft_config["default"].to_dict()
    files = {}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        root / "pipeline", unet_lora_layers=lora_sd, unet_lora_adapter_metadata=lora_config,
        text_encoder_lora_layers={"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
                                  "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2)})
    files["diffusers"] = root / "pipeline" / "pytorch_lora_weights.safetensors"
    model.save_lora_adapter(root / "model")  # unprefixed keys, unprefixed metadata; read from the folder
    files["diffusers_model"] = root / "model"
    alphas = {f"transformer.{m}.alpha": torch.tensor(8.0) for m in modules_of(lora_sd)}
    files["peft_alpha"] = root / "peft_alpha.safetensors"  # no metadata, alpha tensors, transformer. prefix
    save_file({**{"transformer." + k: v for k, v in lora_sd.items()}, **alphas}, files["peft_alpha"])
    files["bin"] = root / "lora.bin"  # a weights_only torch pickle, Linear-shaped factors for the 1x1 convs
    squeezed = {k: v.flatten(1) if v.ndim == 4 and v.shape[2:] == (1, 1) else v for k, v in lora_sd.items()}
    torch.save({**squeezed, **{k.removeprefix("transformer."): v for k, v in alphas.items()}}, files["bin"])
    teacher_names = list(build(UNet2DConditionModel, config).state_dict())
    files["kohya"] = root / "kohya.safetensors"
    save_file({**kohya(lora_sd, lambda m: m), **TE_KOHYA}, files["kohya"])
    files["kohya_ldm"] = root / "kohya_ldm.safetensors"
    save_file(kohya(lora_sd, ldm_renamer(teacher_names, config)), files["kohya_ldm"])
    scaling = {m: 8 / lora_sd[f"{m}.lora_A.weight"].shape[0] for m in modules_of(lora_sd)}
    files["attn_procs"] = root / "attn_procs.safetensors"
    save_file(attn_procs(lora_sd, scaling), files["attn_procs"])
    return {"root": root, "teacher": root / "teacher", "files": files, "lora_sd": lora_sd, "config": config,
            "truth": fused(model), "truth_half": fused(model, 0.5),
            "targets": {m + ".weight" for m in modules_of(lora_sd)}}


def assert_merged(student: LoraStudentSource, truth: dict[str, torch.Tensor], targets: set[str], exact_untouched=True):
    assert set(student.names()) == set(truth)
    for name, expected in truth.items():
        got = student.tensor(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if name in targets:
            assert (got - expected).norm() <= 1e-6 * expected.norm(), name
        elif exact_untouched:
            assert torch.equal(got, expected), name


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers_model", "peft_alpha", "bin", "attn_procs", "kohya",
                                 "kohya_ldm"])
def test_merge_matches_peft_fuse(sd15, fmt):
    with open_lora_student(sd15["teacher"], sd15["files"][fmt]) as student:
        assert len(student.lora) == len(sd15["targets"])
        assert len(student.lora.ignored) == {"kohya": 3, "diffusers": 2}.get(fmt, 0)
        assert_merged(student, sd15["truth"], sd15["targets"])


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_merge_matches_diffusers_loader(sd15, fmt):
    """A fresh teacher, the file loaded by diffusers (lora_state_dict + load_lora_adapter) and fused.

    Not kohya_ldm: diffusers' own loader fails on SD1.x LDM names with block ids >= 10 (it matches
    ``input_blocks_1`` as a substring of ``input_blocks_10``); wadi_analysis.lora_student works around that.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    unet = UNet2DConditionModel.from_pretrained(sd15["teacher"])
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(sd15["files"][fmt]), unet_config=unet.config, return_lora_metadata=True)
    unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, metadata=metadata)
    unet.fuse_lora()
    unet.unload_lora()
    with open_lora_student(sd15["teacher"], sd15["files"][fmt]) as student:
        assert_merged(student, unet.state_dict(), sd15["targets"])


def test_half_precision_base(sd15):
    """An fp16 base: merged in float32, returned in fp16."""
    with open_checkpoint(sd15["teacher"]) as teacher:
        half = TensorDictSource({n: teacher.tensor(n).half() for n in teacher.names()})
    student = LoraStudentSource(half, sd15["files"]["kohya"])
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    module = student.lora.modules[name]
    expected = (half.tensor(name).float() + 4 * module.up.float() @ module.down.float() / 2).half()
    assert student.tensor(name).dtype == torch.float16 and torch.equal(student.tensor(name), expected)
    assert torch.equal(student.tensor("conv_in.weight"), half.tensor("conv_in.weight"))


def test_scale(sd15):
    with open_lora_student(sd15["teacher"], sd15["files"]["diffusers"], scale=0.5) as student:
        assert_merged(student, sd15["truth_half"], sd15["targets"])


@pytest.fixture(scope="module")
def tables(sd15):
    out = {}
    for fmt in ("diffusers", "peft_alpha", "bin", "kohya", "kohya_ldm"):
        with open_lora_student(sd15["teacher"], sd15["files"][fmt]) as student:
            out[fmt] = compare(sd15["teacher"], student, workers=2)
    return out


def test_compare_marks_touched_layers(sd15, tables):
    result = tables["diffusers"]
    teacher = open_checkpoint(sd15["teacher"])
    matrices = [n for n in teacher.names() if len(teacher.info(n).shape) >= 2]
    teacher.close()
    layers = result.layers.set_index("name")
    assert sorted(layers.index) == sorted(matrices)
    assert set(layers.index[layers["status"] != "identical"]) == sd15["targets"]
    assert (layers.loc[sorted(sd15["targets"]), "status"] == "ok").all()
    assert (layers.loc[sorted(sd15["targets"]), "direction_change_mean"] > 0).all()
    assert result.summary["n_identical"] == len(matrices) - len(sd15["targets"])
    assert "LoRA (diffusers/peft" in result.summary["student"]["format"]


@pytest.mark.parametrize("fmt", ["peft_alpha", "bin", "kohya", "kohya_ldm"])
def test_formats_give_identical_tables(tables, fmt):
    pd.testing.assert_frame_equal(tables[fmt].layers, tables["diffusers"].layers)


def test_scale_zero_is_the_teacher(sd15):
    with open_lora_student(sd15["teacher"], sd15["files"]["kohya"], scale=0) as student:
        result = compare(sd15["teacher"], student, workers=2)
    assert (result.layers["status"] == "identical").all()
    assert result.summary["n_identical"] == result.summary["n_layers"]


def test_sdxl_like_kohya_sgm_names(tmp_path):
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    teacher = build(UNet2DConditionModel, SDXL_CONFIG)
    model = build(UNet2DConditionModel, SDXL_CONFIG, SDXL_TARGETS)
    lora_sd = get_peft_model_state_dict(model)
    assert {"conv_in", "time_embedding.linear_1", "add_embedding.linear_2"} <= set(modules_of(lora_sd))
    te = {k.replace("lora_te_", p): v.clone() for p in ("lora_te1_", "lora_te2_") for k, v in TE_KOHYA.items()}
    save_file({**kohya(lora_sd, ldm_renamer(list(teacher.state_dict()), SDXL_CONFIG)), **te},
              tmp_path / "sdxl.safetensors")
    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    with open_lora_student(tmp_path / "teacher.safetensors", tmp_path / "sdxl.safetensors") as student:
        assert student.lora.format == "kohya" and len(student.lora.ignored) == 6
        assert_merged(student, fused(model), {m + ".weight" for m in modules_of(lora_sd)})


def test_pixart_transformer_prefix(tmp_path):
    from diffusers import PixArtTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                  cross_attention_dim=16, caption_channels=24, sample_size=8, norm_type="ada_norm_single",
                  norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000)
    teacher = build(PixArtTransformer2DModel, config)
    model = build(PixArtTransformer2DModel, config, ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj"])
    lora_sd = get_peft_model_state_dict(model)
    save_file({"transformer." + k: v for k, v in lora_sd.items()}, tmp_path / "pixart_lora.safetensors",
              metadata={"lora_adapter_metadata": json.dumps(model.peft_config["default"].to_dict(), default=list)})
    base = TensorDictSource({k: v.clone() for k, v in teacher.state_dict().items()})
    student = LoraStudentSource(base, tmp_path / "pixart_lora.safetensors")
    assert student.lora.format == "diffusers/peft"
    assert "pos_embed.proj.weight" in student.lora.modules  # a 2x2 patch-embedding conv
    assert_merged(student, fused(model), {m + ".weight" for m in modules_of(lora_sd)})


def _one_line_error(teacher, lora_path, match: str):
    with pytest.raises(CheckpointError, match=match) as info:
        open_lora_student(teacher, lora_path)
    assert "\n" not in str(info.value)
    return str(info.value)


PROJ_IN = "unet.down_blocks.0.attentions.0.proj_in"
MOVED_PROJ_IN = "unet.down_blocks.0.attentions.7.proj_in"  # a block this U-Net does not have


# Writers of bad LoRA files: each takes (sd15, tmp_path) and returns the path to open.
def peft_file(name, extra=None, without=()):
    """The sd15 LoRA under ``unet.`` names, ``without`` keys left out and ``extra`` keys added (or replaced)."""
    def write(sd15, tmp_path):
        lora = {"unet." + k: v for k, v in sd15["lora_sd"].items() if "unet." + k not in without}
        extras = extra(sd15) if callable(extra) else extra or {}
        save_file({**lora, **extras}, tmp_path / name)
        return tmp_path / name
    return write


def moved_proj_in(sd15):
    """proj_in's factors under the name of a block that does not exist."""
    return {f"{MOVED_PROJ_IN}.lora_{f}.weight": sd15["lora_sd"][f"{PROJ_IN.removeprefix('unet.')}.lora_{f}.weight"]
            for f in "AB"}


def tensors_file(name, tensors):
    def write(sd15, tmp_path):
        save_file(tensors, tmp_path / name)
        return tmp_path / name
    return write


def bytes_file(name, data: bytes):
    def write(sd15, tmp_path):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return write


@pytest.mark.parametrize("write, match, details", [
    (peft_file("bad.safetensors", without={f"{PROJ_IN}.lora_{f}.weight" for f in "AB"}, extra=moved_proj_in),
     "match no weight of the base",
     ["down_blocks.0.attentions.7.proj_in", "closest base weight: 'down_blocks.0.attentions."]),
    # A kohya name that diffusers renames to no weight of this base (SDXL's label_emb on an SD1.5 U-Net).
    (tensors_file("sdxl_only.safetensors", {"lora_unet_label_emb_0_0.lora_down.weight": torch.ones(2, 8),
                                            "lora_unet_label_emb_0_0.lora_up.weight": torch.ones(8, 2)}),
     "1 of 1 LoRA modules",
     ["'lora_unet_label_emb_0_0.lora_down.weight' -> 'add_embedding.linear_1.weight'"]),
], ids=["moved-module", "kohya-name-not-in-base"])
def test_unmatched_keys_are_an_error(sd15, tmp_path, write, match, details):
    message = _one_line_error(sd15["teacher"], write(sd15, tmp_path), match)
    for detail in details:
        assert detail in message, detail


@pytest.mark.parametrize("write, match", [
    (bytes_file("garbage.safetensors", bytes(range(256)) * 8), "not a safetensors file"),
    (bytes_file("text.safetensors", b"hello, this is not a LoRA"), "safetensors"),
    (lambda sd15, tmp_path: tmp_path / "missing.safetensors", "cannot read"),
    (lambda sd15, tmp_path: sd15["teacher"] / "diffusion_pytorch_model.safetensors", "is not a LoRA weight"),
    (tensors_file("te_only.safetensors", TE_KOHYA), "3 text-encoder keys ignored"),
    (peft_file("dora.safetensors", extra={f"{PROJ_IN}.lora_magnitude_vector": torch.ones(32)}),
     "DoRA LoRAs are not supported yet"),
    (peft_file("bias.safetensors", extra={f"{PROJ_IN}.lora_B.bias": torch.ones(32)}), "bias terms"),
    (peft_file("half.safetensors", without={f"{PROJ_IN}.lora_B.weight"}), "has no lora_B weight"),
    (peft_file("shape.safetensors", extra={f"{PROJ_IN}.lora_B.weight": torch.ones(48, 2, 1, 1)}),
     "rows but the base weight is"),
    (tensors_file("loha.safetensors", {"lora_unet_conv_in.hada_w1_a": torch.ones(4, 2)}), "LoHa"),
], ids=["garbage", "text", "missing", "base-weights", "text-encoder-only", "dora", "bias", "half-pair",
        "wrong-shape", "loha"])
def test_bad_files_are_errors(sd15, tmp_path, write, match):
    _one_line_error(sd15["teacher"], write(sd15, tmp_path), match)


def test_read_lora_alone(sd15):
    weights = read_lora(sd15["files"]["kohya"])
    module = weights.modules["down_blocks.0.attentions.0.proj_in.weight"]
    assert (module.rank, module.alpha, module.scaling) == (2, 8.0, 4.0)
    assert weights.format == "kohya" and len(weights) == len(sd15["targets"])
    # LDM names, including the up-sampler of a level without attention (output_blocks.2.1.conv) and
    # two-digit block ids, all land on the right diffusers weights.
    ldm = read_lora(sd15["files"]["kohya_ldm"])
    assert set(ldm.modules) == sd15["targets"] and "up_blocks.0.upsamplers.0.conv.weight" in ldm.modules
    keys = {name: module.key for name, module in ldm.modules.items()}
    assert keys["up_blocks.0.upsamplers.0.conv.weight"] == "lora_unet_output_blocks_2_1_conv.lora_down.weight"
    assert keys["up_blocks.3.resnets.2.conv1.weight"] == "lora_unet_output_blocks_11_0_in_layers_2.lora_down.weight"


def test_cli_student_lora(tmp_path):
    """`compare TEACHER --student-lora FILE` goes through the same engine; misuse is one error line."""
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict
    from typer.testing import CliRunner

    from wadi_analysis.cli import app

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sd15_config())
    unet.save_pretrained(tmp_path / "teacher")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
    state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, tmp_path / "lora.safetensors")
    runner = CliRunner()
    result = runner.invoke(app, ["compare", str(tmp_path / "teacher"), "--student-lora", str(tmp_path / "lora.safetensors"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_layers"] - summary["n_identical"] == 2 * 2 * 16  # to_q, to_v of attn1/attn2 in 16 blocks
    both = runner.invoke(app, ["compare", str(tmp_path / "teacher"), str(tmp_path / "teacher"),
                               "--student-lora", str(tmp_path / "lora.safetensors")])
    assert both.exit_code == 2 and both.stderr.startswith("error: give either")
