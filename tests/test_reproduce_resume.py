"""A reproduction stores each finished piece (results/*.json) and a later call resumes from them: an
interrupted run keeps what it finished, a second call retrains nothing stored with the same settings."""

import json
from dataclasses import replace

import pandas as pd
import pytest

from wadi_distill import embedded
from wadi_distill.experiments.reproduce import Settings, reproduce
from wadi_distill.experiments.results_store import ResultStore, settings_tag

TINY = Settings(steps=2, validate_every=2, batch_size=2, curve_per_class=2, final_per_class=2, seeds=(0,),
                ranks=(16,), teacher_steps=(1,), swap_students=("lora",))


def test_a_piece_is_reused_only_with_the_same_settings_and_teacher(tmp_path, monkeypatch):
    tag = settings_tag(TINY, embedded.teacher_path())
    store = ResultStore(tmp_path, tag)
    store.save("lora-seed0", {"row": {"frechet_distance": 1.5}})
    assert store.load("lora-seed0") == {"row": {"frechet_distance": 1.5}}
    assert store.load("dora-seed0") is None
    # more seeds reuse the seeds trained; any other setting does not
    assert settings_tag(replace(TINY, seeds=(0, 1, 2)), embedded.teacher_path()) == tag
    assert ResultStore(tmp_path, settings_tag(replace(TINY, steps=3), embedded.teacher_path())).load("lora-seed0") is None
    assert ResultStore(tmp_path, tag, resume=False).load("lora-seed0") is None
    other_teacher = tmp_path / "teacher"
    (other_teacher / "unet").mkdir(parents=True)
    (other_teacher / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert ResultStore(tmp_path, settings_tag(TINY, other_teacher)).load("lora-seed0") is None
    from wadi_distill import config

    monkeypatch.setitem(config.EMBEDDED_DEFAULTS, "fake_rank", 8)  # a run default every arm starts from
    assert ResultStore(tmp_path, settings_tag(TINY, embedded.teacher_path())).load("lora-seed0") is None
    monkeypatch.undo()
    # what the reproduction pins (the paper's objective) does not follow `run`'s defaults
    from wadi_distill.experiments.reproduce import PAPER_OBJECTIVE

    pinned = settings_tag(TINY, embedded.teacher_path(), PAPER_OBJECTIVE)
    monkeypatch.setitem(config.EMBEDDED_DEFAULTS, "regression_weight", 0.25)  # other pinned defaults
    monkeypatch.setitem(config.EMBEDDED_DEFAULTS, "generator_rank", 8)
    monkeypatch.setitem(config.EMBEDDED_DEFAULTS, "vsd", {"guidance_real": 3.0})
    assert settings_tag(TINY, embedded.teacher_path(), PAPER_OBJECTIVE) == pinned
    assert settings_tag(TINY, embedded.teacher_path()) != tag
    monkeypatch.undo()
    assert "teacher" not in tag["run_options"] and "cache_dir" not in tag["run_options"]  # contents, not paths
    store.path("lora-seed0").write_text('{"tag": ')  # damaged: retrained, not an error
    assert store.load("lora-seed0") is None


def test_an_interrupted_reproduction_resumes_without_retraining(tmp_path, monkeypatch):
    from wadi_distill.experiments import report

    def failing(out):
        raise RuntimeError("interrupted while writing the report")

    monkeypatch.setattr(report, "write_reproduction_report", failing)
    out = tmp_path / "reproduction"
    with pytest.raises(RuntimeError, match="interrupted"):
        reproduce(out, TINY, log=lambda line: None)
    arms = ["full", "lorad-published", "lorad-plan", "lora", "dora", "dora-frozen", "lorad-conv-r8"]
    # the finished pieces and what they need stay; the rest of what the call added is gone
    assert sorted(p.stem for p in (out / "results").glob("*.json")) == sorted(["teacher"] + [f"{a}-seed0" for a in arms])
    assert sorted(p.name for p in out.iterdir()) == ["compare", "plan.json", "results"]
    stored = {a: json.loads((out / "results" / f"{a}-seed0.json").read_text())["content"] for a in arms}
    assert [s["model"] for s in stored["lora"]["swaps"]] == ["lora: teacher norms + student directions",
                                                              "lora: student norms + teacher directions"]
    assert stored["dora"]["swaps"] == [] and stored["full"]["analysis"]["model"] == "full"

    monkeypatch.undo()
    lines = []
    reproduce(out, TINY, log=lines.append)
    assert sum("stored result reused" in line for line in lines) == len(arms)
    assert "teacher rows reused" in lines[0]
    assert not (out / "runs").exists()  # nothing trained again
    results = pd.read_csv(out / "results.csv")
    students = results[results["experiment"] == "students"].set_index("model")
    for arm in arms:
        assert students.loc[arm, "frechet_distance"] == pytest.approx(stored[arm]["row"]["frechet_distance"], rel=1e-12)
    assert list(results.loc[results["experiment"] == "swap", "student"]) == ["lora", "lora"]
    assert (out / "report.html").is_file()

    # --no-resume retrains: the runs are back
    reproduce(out, TINY, log=lambda line: None, resume=False)
    assert (out / "runs" / "lora-seed0" / "export").is_dir()


def test_every_arm_trains_the_papers_objective_whatever_run_defaults_to(tmp_path):
    """`run`'s embedded defaults add the regression term and guidance 2.5; the reproduction's arms do not."""
    from wadi_distill.config import load_config
    from wadi_distill.experiments.reproduce import student_config, student_overrides

    default = load_config()
    assert default.regression_weight > 0 and default.vsd.guidance_real != 1.5  # the defaults differ ...
    settings = replace(TINY, extra={"vsd": {"guidance_fake": 1.0}})
    for name, overrides in student_overrides(settings).items():
        config = student_config(name, overrides, 3, tmp_path, settings)
        assert (config.regression_weight, config.vsd.guidance_real, config.vsd.guidance_fake) == (0.0, 1.5, 1.0), name
        assert (config.seed, config.steps, config.batch_size) == (3, TINY.steps, TINY.batch_size)
        assert config.out == str(tmp_path / "runs" / f"{name}-seed3")
    assert student_config("full", student_overrides(settings)["full"], 0, tmp_path, settings).generator_lr == \
        TINY.full_lr  # ... and each arm's own options still win
