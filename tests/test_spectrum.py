"""Residual spectra (exact, from Gram eigenvalues) and the LoRaD fit, against analytic truth."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from wadi_analysis import compare
from wadi_analysis.cli import app
from wadi_analysis.spectrum import gram_eigenvalues, lorad_fit, pair_rotation_angles, residual_spectra
from wadi_distill.lorad import rotate_rows


def svd_energy_top(residual: torch.Tensor, fraction: float) -> float:
    singular = torch.linalg.svdvals(residual.reshape(residual.shape[0], -1).double())
    k = max(1, math.ceil(fraction * singular.numel()))
    return 100 * (singular[:k].square().sum() / singular.square().sum()).item()


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (8, 3, 3, 3), (16, 16)])
def test_energies_equal_a_full_svd(shape):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(shape, generator=generator)
    student = teacher + 0.1 * torch.randn(shape, generator=generator) @ torch.eye(shape[-1]) \
        if len(shape) == 2 else teacher + 0.1 * torch.randn(shape, generator=generator)
    figures = residual_spectra(teacher, student, fractions=(0.1, 0.3, 0.5))
    for fraction in (0.1, 0.3, 0.5):
        assert figures[f"residual_energy_top{round(100 * fraction)}"] == pytest.approx(
            svd_energy_top(student - teacher, fraction), abs=1e-6)
    singular = torch.linalg.svdvals((student - teacher).reshape(shape[0], -1).double())
    assert torch.allclose(gram_eigenvalues((student - teacher).reshape(shape[0], -1)), singular.square(), rtol=1e-9,
                          atol=1e-9 * singular[0].item() ** 2)


@pytest.mark.parametrize("rank", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_planted_low_rank_residual(rank, dtype):
    generator = torch.Generator().manual_seed(rank)
    teacher = torch.randn(20, 30, generator=generator, dtype=torch.float64)
    left, _ = torch.linalg.qr(torch.randn(20, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(30, rank, generator=generator, dtype=torch.float64))
    singular = torch.arange(rank, 0, -1, dtype=torch.float64)  # rank, ..., 2, 1
    student = teacher + left @ torch.diag(singular) @ right.T
    assert residual_spectra(teacher.to(dtype), student.to(dtype))["residual_rank"] == rank  # stored in dtype
    figures = residual_spectra(teacher, student)
    energy = singular.square()
    share = torch.cumsum(energy, 0) / energy.sum()
    for level in (90, 93, 95):
        assert figures[f"residual_rank_{level}"] == int((share < level / 100 - 1e-12).sum()) + 1
    assert figures["residual_energy_top30"] == pytest.approx(100 * share[math.ceil(0.3 * 20) - 1].item()
                                                             if rank > 6 else 100.0)


def test_pure_pair_rotation_is_fully_expressed_by_lorad():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 11, generator=generator, dtype=torch.float64)  # odd width: last column fixed
    theta = (torch.randn(6, 2, generator=generator, dtype=torch.float64)
             @ torch.randn(2, 5, generator=generator, dtype=torch.float64)).clamp(-3, 3)
    student = rotate_rows(teacher, theta)  # the adapter's own rotation
    assert torch.allclose(pair_rotation_angles(teacher, student), theta, atol=1e-12)
    fit = lorad_fit(teacher, student)
    assert fit["lorad_fit"] == pytest.approx(100.0, abs=1e-9)
    assert fit["angle_field_rank_90"] <= 2


def test_norm_changes_are_not_expressible_by_rotation():
    teacher = torch.randn(5, 8, dtype=torch.float64)
    assert lorad_fit(teacher, 1.1 * teacher)["lorad_fit"] == pytest.approx(0.0, abs=1e-9)
    mixed = teacher.clone()
    mixed[:, 0] = -mixed[:, 0]  # flips the first column: part rotation, no pair-norm change
    assert 0 < lorad_fit(teacher, mixed)["lorad_fit"] <= 100


def test_identical_layers_have_no_spectrum():
    teacher = torch.randn(4, 6)
    figures = residual_spectra(teacher, teacher.clone())
    assert math.isnan(figures["residual_energy_top30"]) and figures["residual_rank"] == 0


def test_compare_spectrum_columns_and_summary(tmp_path):
    generator = torch.Generator().manual_seed(0)
    teacher = {f"l{i}.weight": torch.randn(16, 24, generator=generator) for i in range(3)}
    student = {k: v + 0.01 * torch.randn(16, 2, generator=generator) @ torch.randn(2, 24, generator=generator)
               for k, v in teacher.items()}
    from safetensors.torch import save_file

    save_file(teacher, tmp_path / "t.safetensors")
    save_file(student, tmp_path / "s.safetensors")
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors"),
                                      "--spectrum", "--lorad-fit", "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["residual_energy_top30_mean"] == pytest.approx(100.0, abs=1e-3)  # rank 2 of 16
    layers = compare(teacher, student, spectrum=True).layers
    assert set(layers["residual_rank_90"]) <= {1, 2} and set(layers["residual_rank"]) == {2}
    assert "lorad_fit_mean" in summary and "residual_rank_90" in layers.columns
