"""Placement plans: within budget, driven by the findings, and readable by the distiller."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wadi_analysis import compare
from wadi_analysis.cli import app
from wadi_analysis.examples import plant, tiny_sd15_config
from wadi_analysis.plan import plan_cost, plan_from_findings, preset_plan
from wadi_distill import adapters, lorad


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """A tiny SD1.5-layout pair where only the cross-attention projections rotate (strongly)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("plan")
    torch.manual_seed(0)
    model = UNet2DConditionModel(**tiny_sd15_config())
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    student = {}
    for name, weight in teacher.items():
        angle = 0.3 if ".attn2." in name else 0.001
        student[name] = weight if weight.ndim < 2 else plant(
            weight, torch.full((weight.shape[0],), angle, dtype=torch.float64),
            torch.ones(weight.shape[0], dtype=torch.float64), generator)
    model.save_pretrained(root / "teacher")
    model.load_state_dict(student)
    model.save_pretrained(root / "student")
    result = compare(root / "teacher", root / "student", spectrum=True, fit=True)
    result.write(root / "cmp")
    return root, result


def test_plan_respects_the_budget_and_follows_the_findings(comparison):
    _, result = comparison
    budget, step = 20_000, 4
    targets, table = plan_from_findings(result.layers, budget, rank_multiple=step)
    assert 0 < plan_cost(result.layers, targets) <= budget
    assert all(".attn2." in module for module in targets)  # the layers that actually rotate come first
    assert (table["planned_rank"] == 0).any()  # the budget binds: some layers are left out
    planned = table[table["planned_rank"] > 0]
    assert dict(zip(planned["module"], planned["planned_rank"])) == targets
    assert (planned["planned_rank"] % step == 0).all() and (planned["planned_rank"] <= planned["needed_rank"]).all()
    assert (table["needed_rank"] <= table[["out", "pairs"]].min(axis=1)).all()  # never above the angle field's rank


def test_plan_takes_layers_in_density_order(comparison):
    """Importance per parameter decides; each layer gets its needed rank while it fits, else the largest
    multiple of the rank step that does, and planning stops at the first layer that gets no step at all."""
    _, result = comparison
    budget, step = 20_000, 4
    targets, table = plan_from_findings(result.layers, budget, rank_multiple=step)
    density = table["importance"] / (table["needed_rank"] * table["cost_per_rank"])
    assert np.allclose(table["density"], density) and table["density"].is_monotonic_decreasing
    assert list(table["module"][: len(targets)]) == list(targets)  # the planned layers are the densest
    spent = 0
    for row in table.itertuples():
        affordable = (budget - spent) // row.cost_per_rank // step * step
        if row.planned_rank == 0:
            assert row.importance <= 0 or affordable == 0, row.module
            break
        fits = spent + row.needed_rank * row.cost_per_rank <= budget
        assert row.planned_rank == (row.needed_rank if fits else affordable), row.module
        spent += row.planned_rank * row.cost_per_rank
    assert spent == plan_cost(result.layers, targets)
    cut = table[(table["planned_rank"] > 0) & (table["planned_rank"] < table["needed_rank"])]
    assert len(cut) == 1  # here one layer no longer fits and is cut to what is left of the budget


def test_plan_cli_writes_a_plan_the_distiller_reads(comparison):
    root, _ = comparison
    result = CliRunner().invoke(app, ["plan", str(root / "cmp"), "--budget", "0.01", "--out", str(root / "plan.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((root / "plan.json").read_text())
    assert plan["format"] == "wadi-lorad-plan" and plan["trainable_params"] <= plan["budget_params"]
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(root / "teacher")
    targets = lorad.read_plan(root / "plan.json")
    count = adapters.attach(model, "lorad", targets, "gen")
    assert count == plan["trainable_params"]


def test_preset_plan_matches_the_distillers_preset(comparison):
    root, result = comparison
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(root / "teacher")
    for preset in ("sd-unet-generator", "sd-unet-fake"):
        assert preset_plan(result.layers, preset) == lorad.resolve_preset(model, preset)
    out = CliRunner().invoke(app, ["plan", str(root / "cmp"), "--preset", "sd-unet-generator",
                                   "--out", str(root / "preset.json")])
    assert out.exit_code == 0, out.output
    assert lorad.read_plan(root / "preset.json") == lorad.resolve_preset(model, "sd-unet-generator")


def test_plan_bad_input(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and not (tmp_path / "p.json").exists()
