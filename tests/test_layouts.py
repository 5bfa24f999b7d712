"""Other layouts end to end: SD2/SDXL U-Nets in LDM naming, PixArt pipelines, bounded memory."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from tests.support.ldm_layout import to_ldm_state_dict
from wadi_analysis import compare, open_checkpoint
from wadi_analysis.examples import planted_student

TINY = dict(norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8, sample_size=16, layers_per_block=2)
UNET_LAYOUTS = {
    "sd2": dict(TINY, block_out_channels=(16, 16, 32, 32), use_linear_projection=True,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(TINY, block_out_channels=(32, 64, 64), use_linear_projection=True,
                 transformer_layers_per_block=(1, 2, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
def test_ldm_single_file_against_diffusers_folder(layout, tmp_path):
    from diffusers import UNet2DConditionModel

    config = UNET_LAYOUTS[layout]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config)
    teacher = {k: v.clone() for k, v in model.state_dict().items()}  # load_state_dict below writes in place
    student, _ = planted_student(teacher, seed=2)
    ldm = to_ldm_state_dict(teacher, config["layers_per_block"], len(config["block_out_channels"]))
    save_file(ldm, tmp_path / "teacher_ldm.safetensors")
    model.load_state_dict(student)
    model.save_pretrained(tmp_path / "student")
    result = compare(tmp_path / "teacher_ldm.safetensors", tmp_path / "student")
    assert not result.summary["missing_in_teacher"] and not result.summary["missing_in_student"]
    in_memory = compare(teacher, student).layers
    by_name = lambda frame: frame.sort_values("name").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(by_name(result.layers), by_name(in_memory))
    with open_checkpoint(tmp_path / "teacher_ldm.safetensors") as source:
        assert source.mapping.layout == "ldm" and not source.mapping.unmapped


def test_pixart_pipeline_picks_the_transformer(tmp_path):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, caption_channels=24, sample_size=8,
                                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                     attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000)
    teacher = {k: v.clone() for k, v in model.state_dict().items()}  # load_state_dict below writes in place
    student, _ = planted_student(teacher, seed=3)
    for name, state in (("teacher", teacher), ("student", student)):
        model.load_state_dict(state)
        model.save_pretrained(tmp_path / name / "transformer")
        (tmp_path / name / "model_index.json").write_text(json.dumps(
            {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    layers = compare(tmp_path / "teacher", tmp_path / "student").layers.set_index("name")
    assert (layers["group"] != "other").all()
    assert layers.loc["transformer_blocks.1.attn2.to_k.weight", "role"] == "attn2.to_k"
    assert layers.loc["scale_shift_table", "kind"] == "param"
    explicit = compare(tmp_path / "teacher", tmp_path / "student", component="transformer").layers.set_index("name")
    pd.testing.assert_frame_equal(layers, explicit)


PEAK_RSS_SCRIPT = """
import sys
import torch, pandas, diffusers
from wadi_analysis import compare

def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak resident set size (VmHWM) to the current one, after the imports
before = status("VmRSS")
if sys.argv[1] == "compare":
    compare(sys.argv[2], sys.argv[3], workers=2)
else:
    from safetensors.torch import load_file
    tensors = [load_file(sys.argv[2]), load_file(sys.argv[3])]
    total = sum(float(t.sum()) for group in tensors for t in group.values())  # touch every page
print(status("VmHWM") - before)
"""


def test_memory_stays_at_about_one_layer(tmp_path):
    # Two 256 MB files of 32 layers each: reading everything costs 512 MB; compare keeps about two
    # 8 MB layers per worker in memory. /proc figures are in KiB.
    generator = torch.Generator().manual_seed(0)
    for name in ("t", "s"):
        save_file({f"layer{i}.weight": torch.randn(1024, 2048, generator=generator) for i in range(32)},
                  tmp_path / f"{name}.safetensors")
    growth = {}
    for mode in ("compare", "load_all"):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, mode, tmp_path / "t.safetensors",
                              tmp_path / "s.safetensors"], capture_output=True, text=True, check=True)
        growth[mode] = int(out.stdout.split()[-1]) / 1024
    assert growth["load_all"] > 450, growth  # the measurement itself works
    assert growth["compare"] < 100, growth
