"""The reproduction's per-arm intervals and convergence rows on hand-made tables (no training)."""

import pandas as pd

from wadi_distill.experiments.reproduce import Settings, arm_intervals, convergence_rows


def test_arm_intervals_per_student_over_seeds():
    results = pd.DataFrame([
        {"experiment": "students", "model": "lora", "seed": s, "frechet_distance": v}
        for s, v in enumerate([5.0, 5.0, 5.0])] + [
        {"experiment": "students", "model": "full", "seed": s, "frechet_distance": v}
        for s, v in enumerate([1.0, 3.0, 2.0])] + [
        {"experiment": "teacher", "model": "teacher", "seed": 0, "frechet_distance": 9.0}])
    rows = {row["model"]: row for row in arm_intervals(results)}
    assert set(rows) == {"lora", "full"}
    assert rows["lora"]["low"] == rows["lora"]["high"] == 5.0 and rows["lora"]["n"] == 3
    assert rows["full"]["mean"] == 2.0 and rows["full"]["low"] < 2.0 < rows["full"]["high"]


def test_convergence_rows_state_the_step():
    curves = pd.DataFrame(
        [{"student": "lora", "seed": 0, "step": 10 * (i + 1), "frechet_distance": v}
         for i, v in enumerate([100.0, 50.0, 49.9, 49.8])] +
        [{"student": "lora", "seed": 1, "step": 10 * (i + 1), "frechet_distance": v}
         for i, v in enumerate([100.0, 50.0, 25.0])])
    rows = convergence_rows(curves, Settings(flat_window=1, flat_threshold=0.01))
    by_seed = {row["seed"]: row for row in rows}
    assert by_seed[0]["converged"] and by_seed[0]["converged_step"] == 30
    assert not by_seed[1]["converged"] and by_seed[1]["converged_step"] is None


def test_report_states_orderings_only_where_intervals_separate(tmp_path):
    from wadi_distill.experiments.report import interval_sections

    assert interval_sections(tmp_path) == ""  # a reproduction older than intervals.csv
    pd.DataFrame([{"model": "full", "mean": 2.0, "low": 1.0, "high": 3.0},
                  {"model": "lora", "mean": 5.0, "low": 4.0, "high": 6.0},
                  {"model": "dora", "mean": 5.5, "low": 4.5, "high": 6.5}]).to_csv(tmp_path / "intervals.csv", index=False)
    html = interval_sections(tmp_path)
    assert "full &lt; lora" in html or "full < lora" in html
    assert "full &lt; dora" in html or "full < dora" in html
    assert html.count("not distinguishable here") == 1  # lora vs dora overlap


def test_swap_hybrids_are_compared_with_their_own_student(tmp_path):
    from wadi_distill.experiments.report import interval_sections

    pd.DataFrame([{"experiment": "students", "model": "lora", "mean": 5.0, "low": 4.0, "high": 6.0},
                  {"experiment": "swap", "model": "lora: teacher norms + student directions",
                   "mean": 9.0, "low": 8.0, "high": 10.0}]).to_csv(tmp_path / "intervals.csv", index=False)
    html = interval_sections(tmp_path)
    assert "lora &lt; lora: teacher norms + student directions" in html


def test_convergence_rows_say_where_training_stopped_early():
    curves = pd.DataFrame(
        [{"student": "lora", "seed": 0, "step": 10 * (i + 1), "frechet_distance": v}
         for i, v in enumerate([100.0, 50.0, 49.9])] +
        [{"student": "lora", "seed": 1, "step": 10 * (i + 1), "frechet_distance": v}
         for i, v in enumerate([100.0, 50.0, 25.0, 12.0])])
    settings = Settings(steps=40, flat_window=1, flat_threshold=0.01)
    rows = {row["seed"]: row for row in convergence_rows(curves, settings, {("lora", 0): 30, ("lora", 1): 40})}
    assert rows[0]["stopped_early"] and rows[0]["stopped_step"] == 30 == rows[0]["converged_step"]
    assert not rows[1]["stopped_early"] and rows[1]["stopped_step"] is None and rows[1]["trained_steps"] == 40
    assert rows[1]["step_cap"] == 40 and not rows[1]["converged"]


def test_early_stop_reads_the_convergence_criterion():
    from wadi_distill.experiments.reproduce import curve_flattened
    from wadi_distill.evaluation.intervals import flattened_at

    settings = Settings(flat_window=2, flat_threshold=0.05)
    for curve in ([10.0, 9.0, 8.0, 7.9, 7.8], [10.0, 5.0, 2.0, 1.0], [3.0, 3.0, 3.0]):
        assert curve_flattened(curve, settings) == flattened_at(curve, 2, 0.05)
    assert curve_flattened([10.0, 9.0, 8.0, 7.9, 7.8, 7.8], settings) == 5  # (7.95 - 7.8) / 7.95 < 5 %
    assert curve_flattened([10.0, 9.0, 8.0, 7.9, 7.8], settings) is None  # (8.5 - 7.85) / 8.5 > 5 %
    assert curve_flattened([10.0, 5.0, 2.0, 1.0], settings) is None
