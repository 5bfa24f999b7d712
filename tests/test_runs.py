"""The run-folder module: it tells a teacher, a run and an export apart, loads the one-step model
without putting the student into the Teacher, and its RunLog closes what it opened."""

import pytest
import torch

from tests.support.runs import config_for, sd_teacher_with_prompts
from wadi_analysis.errors import UserError
from wadi_distill.export import export_run
from wadi_distill.runs import EXPORT, RUN, TEACHER, RunFolder, load_one_step, load_sampler, source_kind
from wadi_distill.training.loop import train
from wadi_distill.training.runlog import RunLog


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    pipeline = sd_teacher_with_prompts(root)
    config = config_for(pipeline, root / "run", steps=2, generator_lr=1e-2)
    train(config)
    export_run(config.out, root / "export")
    return pipeline[0], root / "run", root / "export"


def test_source_kinds(finished, tmp_path):
    teacher, run, export = finished
    assert [source_kind(p) for p in (teacher, run, export)] == [TEACHER, RUN, EXPORT]
    (tmp_path / "empty").mkdir()
    for bad, message in ((tmp_path / "empty", "neither a run folder"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(UserError, match=message):
            source_kind(bad)
    with pytest.raises(UserError, match="neither a run folder nor an exported one-step model"):
        load_one_step(teacher)


def test_run_folder_knows_its_files(finished):
    _, run, _ = finished
    folder = RunFolder(run)
    assert folder.read_config()["steps"] == 2
    assert [p.name for p in folder.checkpoints()] == ["step-0000002"]
    assert folder.generator(full=False).is_file() and folder.grid(2).is_file() and folder.metrics_file.is_file()


def test_an_export_samples_in_one_step_and_a_teacher_in_many(finished):
    """An export's merged generator differs from the teacher's denoiser, which loading the export leaves as it
    was (a self-contained export holds its own pipeline: tests/test_pipeline_export.py)."""
    teacher_folder, _, export = finished
    model = load_one_step(export)
    reference, _, _ = load_sampler(teacher_folder)
    changed = [n for n, w in model.generator.state_dict().items() if not torch.equal(w, reference.denoiser.state_dict()[n])]
    assert changed  # the generator did move away from the teacher
    again, _, _ = load_sampler(teacher_folder)
    assert all(torch.equal(w, again.denoiser.state_dict()[n]) for n, w in reference.denoiser.state_dict().items())
    _, network, vsd = load_sampler(export)
    assert vsd is not None and network is not None
    assert load_sampler(teacher_folder)[2] is None  # a teacher samples in many steps


def test_run_log_closes_its_files_when_training_raises(tmp_path):
    folder = RunFolder(tmp_path)
    log = RunLog(folder, total_steps=3, start_step=0, is_main=True, rank=0, progress=True, record_digests=True)
    with pytest.raises(RuntimeError, match="boom"):
        with log:
            assert not log.metrics.closed and not log.digests.closed
            raise RuntimeError("boom")
    assert log.metrics.closed and log.digests.closed
    assert folder.metrics_file.read_text().startswith("step,generator_loss,fake_loss")


def test_export_replaces_a_folder_of_the_user_only_with_overwrite(finished, tmp_path):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    _, run, _ = finished
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    refused = CliRunner().invoke(app, ["export", str(run), "--out", str(target)])
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    assert (target / "notes.txt").read_text() == "keep"
    done = CliRunner().invoke(app, ["export", str(run), "--out", str(target), "--overwrite"])
    assert done.exit_code == 0, done.output
    assert source_kind(target) == EXPORT and not (target / "notes.txt").exists()
