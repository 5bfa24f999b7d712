"""The VSD recipe sweep (`wadi-distill recipe`): its bookkeeping, and a smoke run on the embedded teacher."""

import json

import pandas as pd
import pytest

from wadi_analysis.errors import InvalidValue
from wadi_distill.config import merge_options as merged
from wadi_distill.experiments.recipe import (CANDIDATES, SweepSettings, run_label, stability, sweep,
                                             sweep_from_options, targets_met)


def test_candidate_options_merge_over_a_base_with_vsd_tables_key_by_key():
    base = {"fake_steps_per_generator_step": 2, "vsd": {"guidance_fake": 1.0}}
    assert merged(base, {"vsd": {"t_min": 200}}) == {"fake_steps_per_generator_step": 2,
                                                     "vsd": {"guidance_fake": 1.0, "t_min": 200}}
    assert merged(base, {"fake_steps_per_generator_step": 4})["fake_steps_per_generator_step"] == 4
    assert merged({}, {}) == {}


def test_every_candidate_is_a_valid_run_configuration():
    from wadi_distill.config import load_config

    for name, options in CANDIDATES.items():
        load_config(**options)  # raises on an unknown or out-of-range option


def test_a_row_is_named_by_its_base_candidate_and_any_budget_but_the_default():
    assert run_label("ema-0.99", SweepSettings()) == "ema-0.99"
    assert run_label("ema-0.99", SweepSettings(base="guidance-fake-1")) == "guidance-fake-1+ema-0.99"
    assert run_label("defaults", SweepSettings(steps=4000)) == "defaults@4000"
    assert run_label("regression-1", SweepSettings(steps=4000, base="generator-conv-r32")) == \
        "generator-conv-r32+regression-1@4000"


def test_stability_is_the_worst_late_point_over_the_final_one():
    points = [{"step": s, "frechet_distance": fd} for s, fd in [(100, 9.0), (500, 1.0), (700, 3.0), (1000, 2.0)]]
    assert stability(points, 1000) == pytest.approx(1.5)  # steps >= 600: 3.0 / 2.0


def test_targets_are_issue_13s():
    teacher = [{"steps": 25, "frechet_distance": 0.3, "recall": 0.8, "prompt_accuracy": 0.95},
               {"steps": 4, "frechet_distance": 0.9, "recall": 0.5, "prompt_accuracy": 0.95},
               {"steps": 1, "frechet_distance": 4.0, "recall": 0.1, "prompt_accuracy": 0.9},
               {"steps": 1, "frechet_distance": 2.0, "recall": 0.1, "prompt_accuracy": 0.9}]
    row = {"frechet_distance": 0.95, "recall": 0.5, "prompt_accuracy": 0.93, "stability": 1.2}
    assert targets_met(row, teacher) == {"fd_le_teacher_4_steps": False, "fd_le_half_best_single_step": True,
                                         "recall_ge_0.6x_teacher_25": True,
                                         "accuracy_ge_teacher_25_minus_0.02": True, "stable": True}


def test_targets_are_the_teachers_at_the_rows_guidance():
    teacher = [{"steps": 25, "guidance": 1.5, "frechet_distance": 0.3, "recall": 0.8, "prompt_accuracy": 0.95},
               {"steps": 4, "guidance": 1.5, "frechet_distance": 0.9, "recall": 0.5, "prompt_accuracy": 0.95},
               {"steps": 25, "guidance": 2.5, "frechet_distance": 0.7, "recall": 0.6, "prompt_accuracy": 0.99},
               {"steps": 4, "guidance": 2.5, "frechet_distance": 1.3, "recall": 0.3, "prompt_accuracy": 0.99},
               {"steps": 1, "guidance": 1.5, "frechet_distance": 2.6, "recall": 0.1, "prompt_accuracy": 0.9}]
    row = {"frechet_distance": 1.2, "recall": 0.37, "prompt_accuracy": 0.95, "stability": 1.2}
    at_15, at_25 = targets_met({**row, "guidance": 1.5}, teacher), targets_met({**row, "guidance": 2.5}, teacher)
    assert (at_15["fd_le_teacher_4_steps"], at_25["fd_le_teacher_4_steps"]) == (False, True)
    assert (at_15["recall_ge_0.6x_teacher_25"], at_25["recall_ge_0.6x_teacher_25"]) == (False, True)
    assert (at_15["accuracy_ge_teacher_25_minus_0.02"], at_25["accuracy_ge_teacher_25_minus_0.02"]) == (True, False)
    assert at_15["fd_le_half_best_single_step"] and at_25["fd_le_half_best_single_step"]  # best single step: any


def test_candidates_are_options_over_the_published_objective():
    """Rows keep their meaning when `run`'s defaults change: a candidate is trained over PAPER_OBJECTIVE."""
    from wadi_distill.config import EMBEDDED_DEFAULTS, PAPER_OBJECTIVE, load_config, merge_options

    paper = load_config(**PAPER_OBJECTIVE)
    assert (paper.regression_weight, paper.generator_preset, paper.generator_rank, paper.vsd.guidance_real) == \
        (0.0, "sd-unet-generator", 16, 1.5)
    default = load_config()
    assert (default.regression_weight, default.generator_rank, default.vsd.guidance_real) == \
        (EMBEDDED_DEFAULTS["regression_weight"], EMBEDDED_DEFAULTS["generator_rank"],
         EMBEDDED_DEFAULTS["vsd"]["guidance_real"])
    layered = merge_options(PAPER_OBJECTIVE, {"vsd": {"guidance_fake": 1.0}}, {"regression_weight": 1.0})
    assert layered["vsd"] == {"guidance_real": 1.5, "guidance_fake": 1.0} and layered["regression_weight"] == 1.0


def test_unknown_candidates_and_seeds_are_refused(tmp_path):
    with pytest.raises(InvalidValue, match="unknown candidate 'nope'"):
        sweep_from_options(tmp_path / "r", "defaults,nope", "0", 10, None)
    with pytest.raises(InvalidValue, match="--seeds"):
        sweep_from_options(tmp_path / "r", None, "zero", 10, None)
    with pytest.raises(InvalidValue, match="--base"):
        sweep_from_options(tmp_path / "r", None, "0", 10, "nope")
    assert not (tmp_path / "r").exists()


def test_a_tiny_sweep_writes_every_table_and_keeps_what_it_has(tmp_path, monkeypatch):
    from wadi_distill.experiments import reproduce

    # candidates are compared at one budget: a curve that "flattened" does not end a sweep's run early
    monkeypatch.setattr(reproduce, "curve_flattened", lambda values, settings: 1)
    settings = SweepSettings(steps=2, validate_every=1, curve_per_class=2, final_per_class=2,
                             candidates=("defaults", "dropout-per-batch"), single_step_guidance=(1.0,))
    out = sweep(tmp_path / "recipe", settings, log=lambda line: None)
    table, curves = pd.read_csv(out / "table.csv"), pd.read_csv(out / "curves.csv")
    assert table["candidate"].tolist() == ["defaults@2", "dropout-per-batch@2"]  # not the default budget
    assert table["steps"].tolist() == [2, 2]
    assert json.loads(table["options"][1]) == {"vsd": {"prompt_dropout_scope": "batch"}}
    assert set(curves["step"]) == {1, 2} and (out / "curves.png").is_file() and (out / "teacher.csv").is_file()
    assert "| defaults@2 | 1 |" in (out / "table.md").read_text()
    teacher = pd.read_csv(out / "teacher.csv")
    # the single steps, then 25 and 4 steps at the candidates' real-score guidance (the published 1.5 here)
    assert teacher["model"].tolist() == ["teacher 1 step, cfg 1.0", "teacher 25 steps, cfg 1.5", "teacher 4 steps, cfg 1.5"]
    before = (out / "table.csv").read_text()
    sweep(out, settings, log=lambda line: None)  # nothing new to run: the table is kept as it was
    assert (out / "table.csv").read_text() == before


def test_a_base_candidate_runs_under_another_and_an_ema_run_is_scored_by_its_average(tmp_path):
    settings = SweepSettings(steps=2, validate_every=2, curve_per_class=2, final_per_class=2,
                             candidates=("ema-0.99",), single_step_guidance=(1.0,), base="guidance-fake-1")
    out = sweep(tmp_path / "recipe", settings, log=lambda line: None)
    table = pd.read_csv(out / "table.csv")
    assert table["candidate"].tolist() == ["guidance-fake-1+ema-0.99@2"]
    assert json.loads(table["options"][0]) == {"vsd": {"guidance_fake": 1.0}, "ema_decay": 0.99}
    run = out / "runs" / "guidance-fake-1+ema-0.99@2-seed0"
    exported = (run / "export" / "generator_adapter.safetensors").read_bytes()
    assert exported == (run / "generator_adapter_ema.safetensors").read_bytes()
    assert exported != (run / "generator_adapter.safetensors").read_bytes()
