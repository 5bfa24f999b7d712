"""Swap hybrids: analytically known results, loadable files, the student's key layout kept."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.support.ldm_layout import to_ldm_state_dict
from wadi_analysis import compare
from wadi_analysis.cli import app
from wadi_analysis.examples import plant, tiny_sd15_config
from wadi_analysis.swap import hybrid_rows


def test_hybrid_rows_analytic():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 3, 3, 3, generator=generator, dtype=torch.float64)
    angles = torch.linspace(0.1, 1.0, 6, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    student = plant(teacher, angles, scales, generator)
    # Norm from teacher, direction from student: the rotation without the rescaling.
    norm_from_teacher = hybrid_rows(teacher, student)
    direction = torch.nn.functional.cosine_similarity(norm_from_teacher.reshape(6, -1), student.reshape(6, -1))
    assert torch.allclose(direction, torch.ones(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(norm_from_teacher.reshape(6, -1).norm(dim=1), teacher.reshape(6, -1).norm(dim=1))
    # Direction from teacher, norm from student: the teacher rescaled by the planted factors.
    assert torch.allclose(hybrid_rows(student, teacher), teacher * scales.view(6, 1, 1, 1), atol=1e-12)


@pytest.fixture()
def planted_folders(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**tiny_sd15_config())
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    student = {}
    for name, weight in teacher.items():
        if weight.ndim < 2:
            student[name] = weight + 0.01
            continue
        student[name] = plant(weight, torch.full((weight.shape[0],), 0.2, dtype=torch.float64),
                              torch.full((weight.shape[0],), 1.5, dtype=torch.float64), generator)
    model.save_pretrained(tmp_path / "teacher")
    model.load_state_dict(student)
    model.save_pretrained(tmp_path / "student")
    return tmp_path, teacher, student


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_swap_cli_hybrids_have_the_known_changes(planted_folders):
    root, teacher, student = planted_folders
    from diffusers import UNet2DConditionModel

    result = run("swap", root / "teacher", root / "student", "--norm-from", "teacher", "--out", root / "norm_t")
    assert result.exit_code == 0, result.output
    hybrid = UNet2DConditionModel.from_pretrained(root / "norm_t")  # a loadable diffusers folder
    summary = compare(teacher, hybrid.state_dict()).summary
    assert summary["norm_change_mean"] == pytest.approx(0.0, abs=1e-4)
    assert summary["angle_deg_mean"] == pytest.approx(float(torch.rad2deg(torch.tensor(0.2))), rel=1e-4)
    # 1-D tensors come from the student untouched.
    assert torch.equal(hybrid.state_dict()["conv_in.bias"], student["conv_in.bias"])

    result = run("swap", root / "teacher", root / "student", "--norm-from", "student", "--direction-from", "teacher",
                 "--out", root / "dir_t.safetensors")
    assert result.exit_code == 0, result.output
    model = UNet2DConditionModel.from_pretrained(root / "teacher")
    model.load_state_dict(load_file(root / "dir_t.safetensors"), strict=True)
    summary = compare(teacher, load_file(root / "dir_t.safetensors")).summary
    assert summary["direction_change_mean"] == pytest.approx(0.0, abs=1e-4)
    assert summary["norm_change_mean"] == pytest.approx(50.0, rel=1e-5)


def test_swap_keeps_an_ldm_students_layout_and_dtype(planted_folders):
    root, teacher, student = planted_folders
    config = tiny_sd15_config()
    ldm = to_ldm_state_dict({k: v.half() for k, v in student.items()}, config["layers_per_block"],
                            len(config["block_out_channels"]))
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.ones(2, 2, 3, 3, dtype=torch.float16)
    save_file(ldm, root / "student_ldm.safetensors")
    result = run("swap", root / "teacher", root / "student_ldm.safetensors", "--out", root / "hybrid.safetensors")
    assert result.exit_code == 0, result.output
    hybrid = load_file(root / "hybrid.safetensors")
    assert set(hybrid) == set(ldm) and all(v.dtype == torch.float16 for v in hybrid.values())
    assert torch.equal(hybrid["first_stage_model.decoder.conv_in.weight"], ldm["first_stage_model.decoder.conv_in.weight"])
    summary = compare(root / "teacher", root / "hybrid.safetensors").summary
    assert summary["norm_change_mean"] < 0.1 and summary["angle_deg_mean"] > 10


def test_swap_bad_input(planted_folders):
    root, _, _ = planted_folders
    result = run("swap", root / "teacher", root / "missing", "--out", root / "x")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and not (root / "x").exists()
    save_file({"other.weight": torch.ones(2, 2)}, root / "other.safetensors")
    result = run("swap", root / "teacher", root / "other.safetensors", "--out", root / "y.safetensors")
    assert result.exit_code == 2 and "nothing to swap" in result.stderr and not (root / "y.safetensors").exists()
