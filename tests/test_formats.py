"""Every checkpoint format, on either side, gives the same per-layer table."""

import pandas as pd
import pytest
import torch

from wadi_analysis import compare, open_checkpoint

STAT_COLUMNS = ["name", "kind", "block", "role", "shape", "rows", "norm_change_mean", "norm_change_std",
                "direction_change_mean", "direction_change_std", "angle_deg_mean", "frobenius_change"]
FORMATS = ["diffusers_folder", "sharded_index", "sharded_folder", "fp16_variant_folder", "pipeline_folder", "single",
           "fp16_single", "bf16_single", "bin", "prefixed_pt", "ldm_single", "ldm_ckpt"]


@pytest.fixture(scope="module")
def reference(formats):
    table = compare(formats["teacher"]["single"], formats["student"]["single"]).layers
    return table[STAT_COLUMNS].sort_values("name").reset_index(drop=True)


def table(teacher, student, **kwargs) -> pd.DataFrame:
    result = compare(teacher, student, **kwargs)
    assert not result.summary["missing_in_teacher"] and not result.summary["missing_in_student"]
    return result.layers[STAT_COLUMNS].sort_values("name").reset_index(drop=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_teacher_format(formats, reference, fmt):
    pd.testing.assert_frame_equal(table(formats["teacher"][fmt], formats["student"]["single"]), reference)


@pytest.mark.parametrize("fmt", FORMATS)
def test_student_format(formats, reference, fmt):
    pd.testing.assert_frame_equal(table(formats["teacher"]["single"], formats["student"][fmt]), reference)


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_format_both_sides(formats, reference, fmt):
    pd.testing.assert_frame_equal(table(formats["teacher"][fmt], formats["student"][fmt]), reference)


def test_reference_has_every_weight_and_the_planted_change(reference, tiny_pair):
    assert len(reference) == sum(v.ndim >= 2 for v in tiny_pair[0].values())
    # Planted: ~2.5 % direction change vs ~0.2 % norm change (bf16 rounding included).
    assert reference["direction_change_mean"].mean() > 5 * reference["norm_change_mean"].mean()


def test_ldm_layout_maps_without_leftovers(formats, tiny_pair):
    with open_checkpoint(formats["teacher"]["ldm_single"]) as source:
        assert set(source.names()) == set(tiny_pair[0])
        assert source.mapping.unmapped == []
        assert len(source.mapping.ignored) == 2 + len(tiny_pair[0])  # VAE + text encoder keys + EMA copy
        # The same, through the interface every source has: stored keys and the layout.
        assert source.key_mapping is source.mapping and source.key_mapping.layout == "ldm"
        assert len(source.raw_source) == len(source) + len(source.mapping.ignored)
        name = next(iter(tiny_pair[0]))
        assert source.raw_name(name).startswith("model.diffusion_model.")
        assert torch.equal(source.raw_source.tensor(source.raw_name(name)), source.tensor(name))


def test_unrenamed_sources_are_their_own_raw_source(tiny_pair):
    from wadi_analysis.checkpoint import TensorDictSource

    source = TensorDictSource(tiny_pair[0])
    assert source.raw_source is source and source.key_mapping.layout == "as stored"
    assert all(source.raw_name(n) == n for n in source.names()) and not source.key_mapping.ignored


def test_ldm_ema_ignored_unless_asked(formats):
    plain = compare(formats["teacher"]["ldm_single"], formats["teacher"]["single"]).summary
    assert plain["norm_change_mean"] == 0 and plain["direction_change_mean"] == 0
    ema = compare(formats["teacher"]["ldm_single"], formats["teacher"]["single"], ema="teacher").summary
    # The EMA copy was written as 2x the weights: norms halve from teacher to student, directions stay.
    assert ema["norm_change_mean"] == pytest.approx(50.0, abs=1e-4)
    assert ema["direction_change_mean"] == pytest.approx(0.0, abs=1e-4)


def test_half_precision_sources_really_are_half(formats):
    with open_checkpoint(formats["teacher"]["fp16_variant_folder"]) as source:
        assert {str(source.info(n).dtype) for n in source.names()} == {"torch.float16"}
    with open_checkpoint(formats["teacher"]["bf16_single"]) as source:
        assert {str(source.info(n).dtype) for n in source.names()} == {"torch.bfloat16"}


def test_float64_precision_agrees(formats, reference):
    precise = table(formats["teacher"]["single"], formats["student"]["single"], precision="float64")
    pd.testing.assert_frame_equal(precise, reference, rtol=1e-4)
