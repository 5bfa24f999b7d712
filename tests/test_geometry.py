"""LoRaD's geometry has one definition: the analysis measures exactly what the adapter does."""

import math

import pytest
import torch
from torch import nn

from wadi_analysis.examples import tiny_sd15_config
from wadi_analysis.geometry import angle_field_shape, cost_per_rank, paired_columns, row_width
from wadi_analysis.spectrum import lorad_fit, pair_rotation_angles
from wadi_distill import adapters, lorad
from wadi_distill.lorad import rotate_rows


@pytest.mark.parametrize("shape", [(6, 10), (6, 11), (5, 3, 3, 3), (4, 5, 1, 1), (3, 7, 1, 3)])
def test_the_analysis_measures_the_adapters_rotation(shape):
    """pair_rotation_angles(W, rotate_rows(W, theta)) is theta, for angles all over (-pi, pi)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    rows, pairs = angle_field_shape(shape)
    spread = torch.linspace(-math.pi + 1e-6, math.pi - 1e-6, rows * pairs, dtype=torch.float64)
    theta = spread[torch.randperm(rows * pairs, generator=generator)].reshape(rows, pairs)  # the whole circle
    rotated = rotate_rows(weight, theta)
    assert torch.allclose(pair_rotation_angles(weight, rotated), theta, rtol=0, atol=1e-12)
    assert lorad_fit(weight, rotated)["lorad_fit"] == pytest.approx(100.0, abs=1e-9)  # a rotation, nothing else


def test_pairs_are_adjacent_columns_and_an_odd_width_leaves_the_last():
    weight_rows = torch.arange(14.0).reshape(2, 7)
    even, odd, unpaired = paired_columns(weight_rows)
    assert even.tolist() == [[0, 2, 4], [7, 9, 11]] and odd.tolist() == [[1, 3, 5], [8, 10, 12]]
    assert unpaired.tolist() == [[6], [13]]
    assert paired_columns(weight_rows[:, :6])[2].shape == (2, 0)
    assert row_width((4, 3, 3, 3)) == 27 and angle_field_shape((4, 3, 3, 3)) == (4, 13)


@pytest.mark.parametrize("make_layer", [lambda: nn.Linear(7, 5), lambda: nn.Linear(8, 3), lambda: nn.Conv2d(3, 4, 3),
                                        lambda: nn.Conv2d(5, 2, 1)], ids=["linear-odd", "linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("rank", [1, 3])
def test_cost_per_rank_is_what_the_adapter_trains(make_layer, rank):
    layer = make_layer()
    model = nn.Sequential(layer)
    assert lorad.add_adapter(model, "a", {"0": rank}) == rank * cost_per_rank(layer.weight.shape)


def test_cost_on_a_real_model():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**tiny_sd15_config())
    targets = lorad.resolve_spec(model, lorad.TargetSpec(patterns=["*"], kinds=("linear", "conv"), rank=2))
    assert lorad.add_adapter(model, "a", targets) == adapters.lorad_parameters(model, targets)
