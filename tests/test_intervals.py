import numpy as np
import pytest

from wadi_analysis.errors import InvalidValue
from wadi_distill.evaluation.intervals import (NOT_DISTINGUISHABLE, bootstrap_interval, flattened_at,
                                               ordering)


def test_constant_scores_give_a_zero_width_interval():
    interval = bootstrap_interval([3.5] * 5)
    assert interval["mean"] == interval["low"] == interval["high"] == 3.5


def test_interval_is_deterministic_and_contains_the_mean():
    values = [1.0, 2.0, 4.0, 8.0, 3.0]
    first, second = bootstrap_interval(values), bootstrap_interval(values)
    assert first == second
    assert first["low"] < first["mean"] < first["high"]
    assert first["low"] >= min(values) and first["high"] <= max(values)


def test_coverage_on_normal_samples_is_roughly_nominal():
    # percentile bootstrap with n=20 undercovers a little; 200 trials, fixed seed: expect ~0.90-0.95
    rng = np.random.default_rng(1)
    covered = [
        (iv := bootstrap_interval(rng.normal(0.0, 1.0, 20), n_boot=1000, rng_seed=t))["low"] <= 0.0 <= iv["high"]
        for t in range(200)
    ]
    assert 0.85 <= np.mean(covered) <= 0.99


def test_bad_scores_are_user_errors():
    with pytest.raises(InvalidValue):
        bootstrap_interval([])
    with pytest.raises(InvalidValue):
        bootstrap_interval([1.0, float("nan")])


def test_ordering_only_where_intervals_separate():
    low, high = {"low": 1.0, "high": 2.0}, {"low": 3.0, "high": 4.0}
    overlapping = {"low": 1.5, "high": 3.5}
    assert ordering("lora", low, "dora", high) == "lora < dora"
    assert ordering("lora", high, "dora", low) == "dora < lora"
    assert ordering("lora", low, "dora", overlapping) == NOT_DISTINGUISHABLE


def test_flattened_at_finds_the_plateau():
    curve = [100.0, 50.0, 30.0, 29.9, 29.85, 29.84]
    assert flattened_at(curve, window=2, threshold=0.01) == 4
    assert flattened_at([100.0, 50.0, 25.0], window=1, threshold=0.01) is None
