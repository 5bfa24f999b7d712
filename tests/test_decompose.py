"""Analytic truth: rows scaled by known factors and rotated by known angles."""

import math

import pytest
import torch

from wadi_analysis import compare
from wadi_analysis.decompose import (ROUNDING_ULPS, RowNorms, angle_degrees, direction_change, layer_statistics,
                                    norm_rounding_level, radial_part, relative_norm_change, row_norms,
                                    rows, tangential_part, unit_roundoff)
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


# ---------------------------------------------------------------------------- the first-order split
def first_order(angles_rad, scales):
    """Analytic radial and tangential parts (%) of rows scaled by s after a turn by theta: s cos - 1, s sin."""
    angles, scales = torch.tensor(angles_rad, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64)
    return 100 * (scales * torch.cos(angles) - 1), 100 * scales * torch.sin(angles)


def planted_rad(shape, angles_rad, scales, seed=0, dtype=torch.float64):
    return planted(shape, [math.degrees(a) for a in angles_rad], scales, seed, dtype)


def test_pure_rotations_split_into_cos_minus_one_and_sin():
    angles = [1e-6, 1e-3, 0.1, 0.5, 1.0, 2.0, 3.0]
    teacher, student = planted_rad((7, 40), angles, [1.0] * 7)
    norms = row_norms(teacher, student, torch.float64)
    radial, tangential = first_order(angles, [1.0] * 7)
    assert torch.allclose(radial_part(norms), radial, rtol=1e-6, atol=1e-12)  # (cos - 1) * 100, signed
    assert torch.allclose(tangential_part(norms), tangential, rtol=1e-6, atol=1e-12)  # sin * 100
    assert torch.allclose(relative_norm_change(norms), torch.zeros(7, dtype=torch.float64), atol=1e-11)


@pytest.mark.parametrize("angle", [1e-4, 0.05, 0.7, 2.5])
def test_rotation_share_of_a_pure_rotation(angle):
    teacher, student = planted_rad((5, 24), [angle] * 5, [1.0] * 5)
    stats = layer_statistics(row_norms(teacher, student, torch.float64))
    expected = math.sin(angle) ** 2 / ((1 - math.cos(angle)) ** 2 + math.sin(angle) ** 2)
    assert stats["rotation_share"] == pytest.approx(100 * expected, rel=1e-6)
    assert stats["radial_change_mean"] == pytest.approx(100 * (1 - math.cos(angle)), rel=1e-6)
    assert stats["tangential_change_mean"] == pytest.approx(100 * math.sin(angle), rel=1e-6)
    assert stats["tangential_change_std"] == pytest.approx(0, abs=1e-6 * 100 * math.sin(angle))


def test_pure_scalings_are_all_radial():
    scales = [0.5, 0.9, 1 + 1e-6, 1.1, 2.0, 3.0]
    teacher, student = planted_rad((6, 30), [0.0] * 6, scales)
    norms = row_norms(teacher, student, torch.float64)
    radial, _ = first_order([0.0] * 6, scales)
    assert torch.allclose(radial_part(norms), radial, rtol=1e-6, atol=1e-12)  # (s - 1) * 100
    assert tangential_part(norms).abs().max() < 1e-10
    stats = layer_statistics(norms)
    assert stats["rotation_share"] == pytest.approx(0, abs=1e-12)
    assert stats["radial_change_mean"] == pytest.approx(stats["norm_change_mean"], rel=1e-9)


def test_rotation_and_scaling_together():
    angles, scales = [0.02, 0.3, 1.2, 0.0, 0.6], [1.01, 0.8, 1.5, 1.2, 1.0]
    teacher, student = planted_rad((5, 3, 3, 3), angles, scales)
    norms = row_norms(teacher, student, torch.float64)
    radial, tangential = first_order(angles, scales)
    assert torch.allclose(radial_part(norms), radial, rtol=1e-6, atol=1e-12)
    assert torch.allclose(tangential_part(norms), tangential, rtol=1e-6, atol=1e-12)
    stats = layer_statistics(norms)
    energy = rows(teacher).norm(dim=1) ** 2  # the share is of ||W_s - W_t||^2: rows weigh by their norm^2
    assert stats["rotation_share"] == pytest.approx(100 * (energy * tangential ** 2).sum().item()
                                                    / (energy * (tangential ** 2 + radial ** 2)).sum().item(), rel=1e-6)
    norm_mean = 100 * sum(abs(s - 1) for s in scales) / len(scales)
    assert stats["angle_to_norm_ratio"] == pytest.approx(sum(angles) / len(angles) / (norm_mean / 100), rel=1e-6)


def test_float32_split_of_a_scaling_has_no_spurious_rotation():
    # sqrt(||d||^2 - radial^2) would leave ~sqrt(u) * ||d|| of "rotation" here; the direct residual does not.
    teacher, student = planted_rad((64, 2880), [0.0] * 64, [1.01] * 64, dtype=torch.float32)
    exact = row_norms(teacher.double(), student.double(), torch.float64)
    fast = row_norms(teacher, student, torch.float32, block_elements=10_000)
    assert torch.allclose(radial_part(fast), radial_part(exact), rtol=1e-5)
    assert (tangential_part(fast) - tangential_part(exact)).abs().max() < 1e-4 * 1.0  # percent; exact is rounding


def test_float32_norms_of_a_wide_rotation_measure_the_rounding_only():
    # Two float32 norms of 11520 elements each carry ~1e-7 relative summation error; the norm change is
    # taken from d.t and ||d|| instead, so a pure rotation measures no more than its storage rounding.
    teacher, student = planted_rad((16, 11520), [0.05] * 16, [1.0] * 16, dtype=torch.float32)
    exact = relative_norm_change(row_norms(teacher.double(), student.double(), torch.float64))
    fast = relative_norm_change(row_norms(teacher, student, torch.float32))
    assert (fast - exact).abs().max() < 1e-6  # percent: 1e-8 relative, a fraction of float32's u = 6e-8


# ---------------------------------------------------------------------------- rounding level
def test_rounding_level_formula():
    u32 = 2.0 ** -24
    assert norm_rounding_level(320, torch.float32, "float32") == pytest.approx(100 * ROUNDING_ULPS * u32)
    assert norm_rounding_level(320, "bfloat16", torch.float32) == pytest.approx(100 * ROUNDING_ULPS * 2 ** -8 / math.sqrt(320))
    assert norm_rounding_level(100, torch.float16, torch.float16) == pytest.approx(100 * ROUNDING_ULPS * 2 ** -11 / 10)
    assert norm_rounding_level(10, torch.float64, torch.float64) == pytest.approx(100 * ROUNDING_ULPS * u32)  # float32 floor
    assert math.isnan(unit_roundoff("int8")) and math.isnan(unit_roundoff("no_such_dtype"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lorad_rotation_is_at_rounding_and_a_real_rescaling_is_not(dtype):
    from wadi_distill.lorad.rotation import PairRotation

    generator = torch.Generator().manual_seed(1)
    teacher = (0.05 * torch.randn(96, 320, generator=generator)).to(dtype)
    angles = 0.1 * torch.randn(96, 160, generator=generator)
    lorad = PairRotation.apply(teacher.float(), angles).to(dtype)  # norms preserved up to rounding
    level = norm_rounding_level(320, dtype, dtype)
    stats = layer_statistics(row_norms(teacher, lorad), level)
    assert 0 < stats["norm_change_mean"] < level / 3
    assert math.isnan(stats["angle_to_norm_ratio"]) and stats["rotation_share"] > 99
    rescaled = (lorad.float() * 1.02).to(dtype)  # a 2 % norm change is a measurement in every dtype
    stats = layer_statistics(row_norms(teacher, rescaled), level)
    assert stats["norm_change_mean"] > 2 * level and stats["angle_to_norm_ratio"] > 0
