"""`wadi-distill reproduce` end to end at smoke size: every experiment runs and lands in the report."""

import re

import pandas as pd

from wadi_analysis.report.html import esc
from wadi_distill.experiments.report import CAPTIONS
from wadi_distill.experiments.reproduce import Settings, reproduce

# Every figure the smoke run must show (two ranks + the published placement give the rank figure).
EXPECTED_FIGURES = ["convergence", "fig1a", "fig1b", "ranks"]


def test_reproduce_smoke(tmp_path):
    settings = Settings(steps=6, validate_every=3, curve_per_class=4, final_per_class=4, seeds=(0, 1), ranks=(4, 16),
                        teacher_steps=(1, 2),
                        swap_students=("full", "lorad-published"))
    out = reproduce(tmp_path / "reproduction", settings, log=lambda line: None)
    results = pd.read_csv(out / "results.csv")
    models = set(results["model"])
    assert {"full", "lorad-published", "lorad-plan", "lora", "dora", "lorad-r4", "lorad-conv-r8"} <= models
    assert {f"{student}: {label}" for student in ("full", "lorad-published") for label in
            ("teacher norms + student directions", "student norms + teacher directions")} <= models
    assert "real vs real (floor)" in models
    swaps = results[results["experiment"] == "swap"]
    assert sorted(swaps.loc[swaps["student"] == "full", "seed"]) == [0, 0, 1, 1]  # both hybrids, every seed
    for student in results.loc[results["experiment"] == "students", "model"].unique():
        assert sorted(results.loc[results["model"] == student, "seed"]) == [0, 1], student  # every arm, every seed
    budgets = results.drop_duplicates("model").set_index("model")["trainable"]
    # equal trainable budget (within 5 %) for the placement comparison
    for name in ("lorad-plan", "lora", "dora"):
        assert abs(budgets[name] / budgets["lorad-published"] - 1) < 0.05, name
    curves = pd.read_csv(out / "curves.csv")
    assert sorted(curves.loc[(curves["student"] == "lora") & (curves["seed"] == 0), "step"]) == [3, 6]
    analysis = pd.read_csv(out / "analysis.csv").set_index("model")
    # LoRaD students only rotate rows: their norm change is ~0, so direction/norm is large
    assert analysis.loc["lorad-published", "norm_change_mean"] < 1e-4
    assert analysis.loc["full", "norm_change_mean"] > analysis.loc["lorad-published", "norm_change_mean"]
    html = (out / "report.html").read_text()
    assert "lorad-plan" in html and "<script" not in html
    for name in EXPECTED_FIGURES:  # each figure embedded as a PNG under its caption, and written beside
        embedded = f'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="{re.escape(esc(CAPTIONS[name]))}">'
        assert re.search(embedded, html), name
        assert (out / f"{name}.png").stat().st_size > 0, name
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF") and (out / "summary.csv").is_file()
    assert not (out / "cache").exists()
    intervals = pd.read_csv(out / "intervals.csv").set_index("model")
    assert set(results.loc[results["experiment"].isin(["students", "swap"]), "model"]) == set(intervals.index)
    assert (intervals["n"] == 2).all()  # over both seeds
    assert "Orderings (stated only where the intervals separate)" in html
    assert (intervals["low"] <= intervals["mean"]).all() and (intervals["mean"] <= intervals["high"]).all()
    convergence = pd.read_csv(out / "convergence.csv")
    assert len(convergence) == len(results[results["experiment"] == "students"])  # one row per arm and seed
