"""Export and sample for every kind of generator (LoRaD, LoRA, DoRA, full fine-tuning), on a tiny SD teacher:
the merged model loads in plain diffusers and computes what the unmerged run computes."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import assert_close, config_for, reference_one_step, sd_teacher_with_prompts, x0_from_epsilon
from wadi_distill.training.loop import train

METHODS = ["lorad", "lora", "dora", "full"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return sd_teacher_with_prompts(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module", params=METHODS)
def run(request, pipeline, tmp_path_factory):
    """A finished 2-step run of each method (learning rates high enough that the generator moves)."""
    config = config_for(pipeline, tmp_path_factory.mktemp(request.param) / "run", steps=2, adapter=request.param,
                        generator_lr=1e-3 if request.param == "full" else 1e-2)
    train(config)
    return config


def test_export_loads_in_plain_diffusers_and_matches_the_run(run, pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    from wadi_distill.teacher import load_teacher
    from wadi_distill.export import export_run

    paths = export_run(run.out, tmp_path / "export")
    exported = UNet2DConditionModel.from_pretrained(paths["model"]).eval()  # no project code involved
    teacher, noise, conditioning, unmerged = reference_one_step(run)
    with torch.no_grad():
        epsilon = exported(noise, torch.full((2,), teacher.num_timesteps - 1), conditioning.hidden_states).sample
    assert_close(x0_from_epsilon(teacher, noise, epsilon), unmerged)
    merged = exported.state_dict()
    original = load_teacher(pipeline[0], text=False).denoiser.state_dict()
    assert merged.keys() == original.keys()
    assert any(not torch.equal(merged[k], original[k]) for k in merged)  # the generator trained
    single = load_file(paths["single_file"])
    assert single.keys() == merged.keys() and all(torch.equal(single[k], merged[k]) for k in merged)
    assert ("adapter" in paths) == (run.adapter != "full")  # full fine-tuning has no adapter to ship
    assert (paths["pipeline"] / "model_index.json").is_file() and paths["model"] == paths["pipeline"] / "unet"


def test_sample_from_run_and_from_export_agree(run, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    runner = CliRunner()
    exported = runner.invoke(app, ["export", run.out, "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    for source in (run.out, str(tmp_path / "export")):
        result = runner.invoke(app, ["sample", source, "-p", "a photo of a bag", "--n", "2",
                                     "--out", str(tmp_path / ("images-export" if source != run.out else "images-run"))])
        assert result.exit_code == 0, result.output
    grids = [np.asarray(Image.open(tmp_path / f"images-{s}" / "grid.png")).astype(int) for s in ("run", "export")]
    assert grids[0].shape == (32, 2 * 32, 3)
    assert np.abs(grids[0] - grids[1]).max() <= 1  # merged vs unmerged: equal up to rounding


@pytest.mark.parametrize("run", ["lora", "dora"], indirect=True)  # LoRaD and full runs write no LoRA file
def test_lora_files_load_in_plain_diffusers(run, pipeline):
    """A LoRA/DoRA run's adapter file is a diffusers LoRA file: ``load_lora_weights`` gives the run's generator."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline[0], safety_checker=None)
    pipe.load_lora_weights(f"{run.out}/generator_adapter.safetensors")
    teacher, noise, conditioning, unmerged = reference_one_step(run)
    with torch.no_grad():
        epsilon = pipe.unet(noise, torch.full((2,), teacher.num_timesteps - 1), conditioning.hidden_states).sample
    assert_close(x0_from_epsilon(teacher, noise, epsilon), unmerged)


@pytest.mark.parametrize("run", ["lorad", "lora", "dora"], indirect=True)  # full runs write a model
def test_adapter_files_refuse_other_base_weights(run, tmp_path):
    from tests.support.pipelines import tiny_sd_pipeline
    from wadi_distill import adapters
    from wadi_distill.teacher import load_denoiser
    from wadi_distill.lorad import AdapterFileError

    other = load_denoiser(tiny_sd_pipeline(tmp_path / "other", seed=1))
    with pytest.raises(AdapterFileError, match="other base weights"):
        adapters.load_adapter(other, f"{run.out}/generator_adapter.safetensors")


@pytest.mark.parametrize("command", [
    lambda run: ["export", str(run), "--out", str(run / "e")],
    lambda run: ["sample", str(run), "-p", "x", "--out", str(run / "s")],
], ids=["export", "sample"])
def test_export_of_an_unfinished_run_is_one_error_line(pipeline, tmp_path, command):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    config_for(pipeline, tmp_path / "run", adapter="lora").write(tmp_path / "config.json")
    (tmp_path / "checkpoints").mkdir()
    runner = CliRunner()
    result = runner.invoke(app, command(tmp_path))
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "generator_adapter.safetensors" in result.stderr


def test_sample_from_a_folder_that_is_no_run_is_one_error_line(pipeline, tmp_path):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    config_for(pipeline, tmp_path / "run", adapter="lora").write(tmp_path / "config.json")
    (tmp_path / "checkpoints").mkdir()
    runner = CliRunner()
    bad = runner.invoke(app, ["sample", str(tmp_path / "checkpoints"), "-p", "x", "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and "neither a run folder" in bad.stderr
