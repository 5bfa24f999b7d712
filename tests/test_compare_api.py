"""The Python API does what the commands do: ``compare(teacher, student_lora=FILE)`` is ``wadi-analyze compare
TEACHER --student-lora FILE``, and the library raises the errors the commands print."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from wadi_analysis import compare, open_checkpoint, open_lora_student
from wadi_analysis.cli import app
from wadi_analysis.errors import UserError
from wadi_analysis.examples import tiny_sd15_config
from wadi_analysis.report import read_layers, report_comparison

import peft  # noqa: E402  (a test dependency, as in test_lora_student)


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    """A tiny SD1.5-layout teacher folder and a peft LoRA file (to_q, to_v; alpha != rank; B != 0)."""
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sd15_config())
    unet.save_pretrained(root / "teacher")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
    save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
              root / "lora.safetensors")
    return root / "teacher", root / "lora.safetensors"


def test_student_lora_in_python_is_the_commands_result(lora_pair, tmp_path):
    teacher, lora = lora_pair
    result = compare(teacher, student_lora=lora, lora_scale=0.5, spectrum=True)
    out = tmp_path / "cli"
    command = CliRunner().invoke(app, ["compare", str(teacher), "--student-lora", str(lora), "--lora-scale", "0.5",
                                       "--spectrum", "--out", str(out), "--json"])
    assert command.exit_code == 0, command.output
    printed = json.loads(command.stdout)
    assert printed.pop("command") == (f"wadi-analyze compare {teacher} --out {out} --student-lora {lora} "
                                      f"--lora-scale 0.5 --spectrum --json")  # no STUDENT: none recorded
    assert printed == json.loads(json.dumps(result.summary))
    pd.testing.assert_frame_equal(read_layers(out / "layers.csv"), result.layers, check_dtype=False, rtol=1e-12)
    assert result.summary["n_layers"] - result.summary["n_identical"] == 2 * 2 * 16  # to_q, to_v of attn1/attn2


def test_student_lora_equals_the_explicit_lora_student(lora_pair):
    teacher, lora = lora_pair
    with open_lora_student(teacher, lora, 0.5) as student:
        reference = compare(teacher, student)
    with open_checkpoint(teacher) as opened:
        result = compare(opened, student_lora=lora, lora_scale=0.5)
        assert opened.tensor(opened.names()[0]).numel()  # the caller's source is left open
    pd.testing.assert_frame_equal(result.layers, reference.layers)
    assert result.summary["student"] == reference.summary["student"]


def test_student_or_student_lora(lora_pair):
    teacher, lora = lora_pair
    for arguments in ({}, {"student": teacher, "student_lora": lora}):
        with pytest.raises(ValueError, match="give either") as raised:
            compare(teacher, **arguments)
        assert isinstance(raised.value, UserError)


def test_library_errors_carry_the_commands_messages(tmp_path):
    from wadi_analysis.plan import make_plan
    from wadi_analysis.swap import swap

    with pytest.raises(UserError, match=r"is not a comparison folder \(layers.csv missing\)"):
        make_plan(tmp_path, tmp_path / "plan.json", budget=0.1)
    with pytest.raises(UserError, match=r"is not a comparison folder \(layers.csv missing\)"):
        report_comparison(tmp_path)
    (tmp_path / "layers.csv").write_text('name,kind\n"unclosed\n')
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UserError, match=f"cannot build the report from {tmp_path}: "):
        report_comparison(tmp_path)
    save_file({"a.weight": torch.ones(2, 2)}, tmp_path / "a.safetensors")
    save_file({"b.weight": torch.ones(2, 2)}, tmp_path / "b.safetensors")
    (tmp_path / "student").mkdir()
    save_file({"b.weight": torch.ones(2, 2)}, tmp_path / "student" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "student" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="nothing to swap"):
        swap(tmp_path / "a.safetensors", tmp_path / "student", tmp_path / "hybrid")
    assert not (tmp_path / "hybrid").exists()  # the folder it created is gone again


FIRST_ORDER_COLUMNS = ["radial_change_mean", "radial_change_std", "radial_change_max", "tangential_change_mean",
                       "tangential_change_std", "tangential_change_max", "rotation_share", "angle_to_norm_ratio",
                       "norm_rounding_level"]
FIRST_ORDER_SUMMARY = [f"{key}{suffix}" for suffix in ("", "_weighted") for key in (
    "radial_change_mean", "radial_change_std", "tangential_change_mean", "tangential_change_std",
    "rotation_share_mean", "angle_to_norm_mean_ratio", "angle_to_norm_std_ratio", "direction_to_norm_mean_ratio")]


def test_first_order_columns_reach_csv_and_json(tmp_path):
    from wadi_analysis.compare import read_comparison
    from wadi_analysis.examples import planted_student

    generator = torch.Generator().manual_seed(0)
    teacher = {"down_blocks.0.attn1.to_q.weight": torch.randn(12, 16, generator=generator),
               "mid_block.resnets.0.conv1.weight": torch.randn(8, 4, 3, 3, generator=generator)}
    result = compare(teacher, planted_student(teacher)[0])
    result.write(tmp_path)
    layers, summary = read_comparison(tmp_path, "the test")
    assert set(FIRST_ORDER_COLUMNS) <= set(layers.columns)
    assert set(FIRST_ORDER_SUMMARY) | {"norms_preserved_at_rounding", "top_rotation_layers"} <= set(summary)
    assert summary == json.loads(json.dumps(result.summary))
    assert (layers["rotation_share"].between(0, 100)).all() and (layers["angle_to_norm_ratio"] > 0).all()
    # The first-order ratio is the angle in radians over the relative norm change, per layer and all-layer.
    expected = layers["angle_deg_mean"].map(math.radians) / (layers["norm_change_mean"] / 100)
    pd.testing.assert_series_equal(layers["angle_to_norm_ratio"], expected, check_names=False, rtol=1e-12)
    assert summary["angle_to_norm_mean_ratio"] == pytest.approx(
        math.radians(summary["angle_deg_mean"]) / (summary["norm_change_mean"] / 100), rel=1e-12)
    layers.loc[0, "rotation_share"] = 150.0  # no comparison writes a share above 100 %
    layers.to_csv(tmp_path / "layers.csv", index=False)
    with pytest.raises(UserError, match="'rotation_share' holds 150.0"):
        read_comparison(tmp_path, "the test")
