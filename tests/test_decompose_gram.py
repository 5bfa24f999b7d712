"""The one-pass Gram route of row_norms against float64 sums, on the rows it treats apart."""

import pytest
import torch

from wadi_analysis.decompose import RowNorms, layer_statistics, row_norms


def direct(teacher, student):
    """Every figure summed directly in float64 (the definitions, no identities)."""
    t, s = teacher.double().flatten(1), student.double().flatten(1)
    d = s - t
    radial = (d * t).sum(1) / t.norm(dim=1)
    tangential = (d - (radial / t.norm(dim=1)).unsqueeze(1) * t).norm(dim=1)
    return RowNorms(t.norm(dim=1), s.norm(dim=1), d.norm(dim=1), radial, tangential)


def close(fast, exact, rtol):
    for field in ("teacher", "student", "difference", "radial", "tangential"):
        a, b = getattr(fast, field), getattr(exact, field)
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item() * 1e-3, equal_nan=True), field


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_shrunk_and_zeroed_student_rows_are_summed_directly(dtype):
    # Rows scaled by 1e-4 (||s||^2 = ||t||^2 + 2 d.t + ||d||^2 cancels to 1e-8 of its terms) and a zeroed
    # row: their student norms must be their own sums, not rounding of the identity.
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(7, 33, generator=generator)
    scales = torch.tensor([1.0, 1e-4, 0.0, 1.01, 0.5, 1e-2, 2.0]).unsqueeze(1)
    student = (teacher * scales + 1e-3 * torch.randn(7, 33, generator=generator) * (scales != 0)).to(dtype)
    teacher = teacher.to(dtype)
    fast = row_norms(teacher, student, torch.float32, block_elements=70)  # two rows a block, and a short last one
    exact = direct(teacher, student)
    assert fast.student[2] == 0
    close(fast, exact, rtol=1e-5)
    stats = layer_statistics(fast)
    assert stats["zero_norm_rows"] == 1 and stats["valid_rows"] == 6


@pytest.mark.parametrize("block_elements", [1, 64, 1 << 16])
def test_block_size_changes_nothing_but_rounding(block_elements):
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(13, 4, 3, 3, generator=generator).half()
    student = (teacher.float() * 1.001 + 0.01 * torch.randn(13, 4, 3, 3, generator=generator)).half()
    close(row_norms(teacher, student, torch.float32, block_elements=block_elements), direct(teacher, student), 1e-5)


def test_nonfinite_rows_stay_nonfinite_and_counted():
    teacher = torch.ones(3, 4)
    student = torch.tensor([[1.0, 1, 1, 2], [float("inf"), 1, 1, 1], [float("nan"), 1, 1, 1]])
    norms = row_norms(teacher, student)
    assert torch.isfinite(norms.student[0]) and norms.student[1] == float("inf")
    assert layer_statistics(norms)["nonfinite_rows"] == 2
