"""Analytic truth: rows scaled by known factors and rotated by known angles."""

import math

import pytest
import torch

from wadi_analysis import compare
from wadi_analysis.decompose import RowNorms, angle_degrees, direction_change, layer_statistics, row_norms
from wadi_analysis.examples import plant


def planted(shape, angles_deg, scales, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=generator, dtype=dtype)
    angles = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    student = plant(teacher, angles, torch.tensor(scales, dtype=torch.float64), generator)
    return teacher, student


def truth(angles_deg, scales):
    angles = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    scales = torch.tensor(scales, dtype=torch.float64)
    direction = 100 * (1 - torch.cos(angles))
    norm = 100 * (scales - 1).abs()
    return {"direction_change_mean": direction.mean().item(), "direction_change_std": direction.std(correction=0).item(),
            "norm_change_mean": norm.mean().item(), "norm_change_std": norm.std(correction=0).item(),
            "angle_deg_mean": float(sum(angles_deg) / len(angles_deg)), "direction_change_max": direction.max().item()}


CASES = {
    "linear": ((6, 10), [0.0, 1e-3, 0.5, 5.0, 45.0, 120.0], [1.0, 1.0 + 1e-6, 0.9, 1.1, 1.0, 2.0]),
    "conv2d": ((4, 3, 3, 3), [2.0, 3.0, 7.5, 30.0], [1.01, 0.99, 1.0, 1.5]),
    "conv1d": ((5, 4, 3), [0.1, 0.2, 0.3, 0.4, 89.0], [1.0, 1.0, 1.0, 1.0, 1.0]),
    "odd_width": ((3, 7), [10.0, 20.0, 170.0], [0.5, 1.0, 3.0]),
}


@pytest.mark.parametrize("case", CASES)
def test_layer_statistics_equal_the_truth(case):
    shape, angles, scales = CASES[case]
    teacher, student = planted(shape, angles, scales)
    layers = compare({"w.weight": teacher}, {"w.weight": student}, precision="float64").layers
    row = layers.iloc[0]
    for key, expected in truth(angles, scales).items():
        assert row[key] == pytest.approx(expected, rel=1e-6, abs=1e-9), key
    assert row["rows"] == shape[0]
    assert row["kind"] == ("linear" if len(shape) == 2 else "conv")


def test_tiny_rotations_keep_relative_precision():
    # 1 - cos(1e-5 rad) = 5e-11: computing cos first would lose every digit; the stable formula does not.
    teacher, student = planted((4, 64), [math.degrees(1e-5)] * 4, [1.0] * 4)
    norms = row_norms(teacher, student, torch.float64)
    expected = 100 * (1 - math.cos(1e-5))
    assert torch.allclose(direction_change(norms), torch.full((4,), expected, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(angle_degrees(norms), torch.full((4,), math.degrees(1e-5), dtype=torch.float64), rtol=1e-6)


def test_float32_half_inputs_are_accurate():
    teacher, student = planted((64, 300), [1.0] * 64, [1.001] * 64, dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        exact = row_norms(teacher.to(dtype).double(), student.to(dtype).double(), torch.float64)
        fast = row_norms(teacher.to(dtype), student.to(dtype), torch.float32, block_elements=1000)
        assert torch.allclose(direction_change(fast), direction_change(exact), rtol=1e-3)


def test_half_precision_arithmetic_is_refused():
    with pytest.raises(ValueError, match="never in half"):
        row_norms(torch.ones(2, 2), torch.ones(2, 2), torch.float16)


def test_zero_and_nonfinite_rows_are_excluded_and_counted():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [float("nan"), 1.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, 2.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    stats = layer_statistics(row_norms(teacher, student, torch.float64))
    assert stats["zero_norm_rows"] == 1 and stats["nonfinite_rows"] == 1 and stats["valid_rows"] == 2
    # Valid rows: a 90-degree turn with doubled norm, and an unchanged row.
    assert stats["direction_change_mean"] == pytest.approx(50.0)
    assert stats["norm_change_mean"] == pytest.approx(50.0)
    assert stats["angle_deg_max"] == pytest.approx(90.0)


def test_identical_rows():
    w = torch.randn(3, 5, dtype=torch.float64)
    stats = layer_statistics(row_norms(w, w.clone(), torch.float64))
    assert stats["identical"] and stats["direction_change_mean"] == 0 and stats["frobenius_change"] == 0


def test_frobenius_change():
    teacher = torch.randn(8, 8, dtype=torch.float64)
    student = teacher + 0.1 * torch.randn(8, 8, dtype=torch.float64)
    stats = layer_statistics(row_norms(teacher, student, torch.float64))
    assert stats["frobenius_change"] == pytest.approx(100 * ((student - teacher).norm() / teacher.norm()).item())


def test_row_norm_dataclass_is_float64():
    norms = row_norms(torch.ones(2, 3, dtype=torch.float16), torch.ones(2, 3, dtype=torch.float16))
    assert isinstance(norms, RowNorms) and norms.teacher.dtype == torch.float64
