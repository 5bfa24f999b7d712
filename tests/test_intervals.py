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
    # mean(30, 29.9) -> mean(29.85, 29.84): 0.35 % < 1 %; the windows before still improve by 25 % and more
    assert flattened_at(curve, window=2, threshold=0.01) == 5
    assert flattened_at([100.0, 50.0, 25.0], window=1, threshold=0.01) is None
    assert flattened_at([3.0, 3.0, 3.0], window=2, threshold=0.01) is None  # index 3 needs four points


def test_flattening_reads_window_means_of_the_recorded_curves():
    """On reports/recipe's two 5,000-iteration curves (300-sample FD every 100 iterations): the default run,
    flat from iteration 100, flattens at the earliest index (step 600); the run that kept improving (FD 3.3
    at step 100 to 1.7 at 5,000) is not stopped by its noise before step 1,400."""
    import pandas as pd

    from tests.support.two_process import REPO

    curves = pd.read_csv(REPO / "reports" / "recipe" / "curves.csv")

    def curve(name, seed=0):
        rows = curves[(curves["candidate"] == name) & (curves["seed"] == seed)]
        return rows.sort_values("step")["frechet_distance"].tolist()

    assert flattened_at(curve("defaults@5000"), window=3, threshold=0.02) == 5  # step 600
    improving = curve("generator-conv-r32+regression-1@5000")
    assert flattened_at(improving, window=3, threshold=0.02) == 13  # step 1,400
    assert min(improving[:7]) > 2.5 > 1.8 > min(improving)  # it had not flattened at step 700
