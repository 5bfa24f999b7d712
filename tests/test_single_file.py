"""Single-file teachers: an original (LDM-layout) SD checkpoint read with diffusers' ``from_single_file``
against a local pipeline folder that holds only configs, tokenizer and scheduler (nothing downloads).

The single file is written from the tiny SD pipeline with the independent diffusers -> LDM converters of
``ldm_layout.py`` (U-Net, VAE, CLIP text encoder), so loading it must give back the very same weights."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.support.ldm_layout import clip_to_ldm_state_dict, to_ldm_state_dict, vae_to_ldm_state_dict
from tests.support.runs import sd_teacher_with_prompts
from wadi_distill.teacher import load_teacher


def ldm_single_file_state(folder) -> dict[str, torch.Tensor]:
    """U-Net, VAE and text encoder of the pipeline at ``folder`` under the original SD names."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    return {**to_ldm_state_dict(unet.state_dict(), unet.config.layers_per_block, len(unet.config.block_out_channels)),
            **vae_to_ldm_state_dict(vae.state_dict(), len(vae.config.block_out_channels)),
            **clip_to_ldm_state_dict(text_encoder.state_dict())}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(pipeline folder, prompts, single file, .ckpt of the same, config-only folder, LDM state)."""
    root = tmp_path_factory.mktemp("single")
    folder, prompts = sd_teacher_with_prompts(root)
    state = {k: v.contiguous() for k, v in ldm_single_file_state(folder).items()}
    save_file(state, root / "tiny-v1.safetensors")
    torch.save({"state_dict": state, "global_step": 1}, root / "tiny-v1.ckpt")
    configs = root / "configs"  # what --teacher-config needs at least: no weights
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder, prompts, root / "tiny-v1.safetensors", root / "tiny-v1.ckpt", configs, state


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_single_file_teacher_equals_the_pipeline(single, suffix):
    folder, _, safetensors_file, ckpt_file, configs, _ = single
    teacher = load_teacher(safetensors_file if suffix == "safetensors" else ckpt_file, config=configs)
    reference = load_teacher(folder)
    for part in ("unet", "vae", "text_encoder"):
        loaded, expected = getattr(teacher.pipeline, part).state_dict(), getattr(reference.pipeline, part).state_dict()
        assert loaded.keys() == expected.keys(), part
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), part
    assert teacher.denoiser is teacher.pipeline.unet and teacher.family == "unet"
    assert torch.equal(teacher.alphas_cumprod, reference.alphas_cumprod)
    assert teacher.prediction_type == reference.prediction_type
    assert torch.equal(teacher.encode(["a photo of a bag"]).hidden_states,
                       reference.encode(["a photo of a bag"]).hidden_states)


def test_cli_run_export_and_sample_from_a_single_file_teacher(single, tmp_path):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    _, prompts, file, _, configs, _ = single
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--teacher", str(file), "--teacher-config", str(configs), "--prompts",
                                 str(prompts), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "1",
                                 "--generator-rank", "2", "--fake-rank", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["teacher_config"] == str(configs)
    exported = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    sampled = runner.invoke(app, ["sample", str(tmp_path / "export"), "-p", "a bag", "--n", "1",
                                  "--out", str(tmp_path / "images")])
    assert sampled.exit_code == 0, sampled.output
    assert (tmp_path / "images" / "grid.png").is_file()


@pytest.fixture(scope="module")
def teacher_paths(single, tmp_path_factory):
    """Named paths for the --teacher arguments: the good inputs, and broken or mislabelled single files."""
    folder, _, file, _, configs, state = single
    root = tmp_path_factory.mktemp("bad_single")
    paths = {"folder": folder, "file": file, "configs": configs, "unet_folder": folder / "unet",
             "plain_unet": root / "diffusers_unet.safetensors",  # a single file, but diffusers names: not SD's
             "incomplete": root / "incomplete.safetensors", "no_vae": root / "no_vae.safetensors",
             "truncated": root / "truncated.safetensors"}
    shutil.copyfile(folder / "unet" / "diffusion_pytorch_model.safetensors", paths["plain_unet"])
    save_file({k: v for i, (k, v) in enumerate(state.items()) if i % 5 or not k.startswith("model.")},
              paths["incomplete"])
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, paths["no_vae"])
    paths["truncated"].write_bytes(file.read_bytes()[:5000])
    return paths


@pytest.mark.parametrize("expected, teacher", [  # the error's text; --teacher arguments (names of teacher_paths)
    ("--teacher-config", ["file"]),
    ("not an original single-file", ["plain_unet", "--teacher-config", "configs"]),
    ("an incomplete checkpoint", ["incomplete", "--teacher-config", "configs"]),
    ("AutoencoderKL", ["no_vae", "--teacher-config", "configs"]),
    ("truncated", ["truncated", "--teacher-config", "configs"]),
    ("model_index.json missing", ["file", "--teacher-config", "unet_folder"]),
    ("for single-file teachers", ["folder", "--teacher-config", "configs"]),
], ids=["no-teacher-config", "diffusers-names", "incomplete", "no-vae", "truncated", "config-without-model-index",
        "config-for-a-pipeline-folder"])
def test_cli_bad_single_file_teachers_are_one_error_line(single, teacher_paths, tmp_path, expected, teacher):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    prompts = single[1]
    teacher = [a if a.startswith("--") else str(teacher_paths[a]) for a in teacher]
    result = CliRunner().invoke(app, ["run", "--teacher", *teacher, "--prompts", str(prompts),
                                      "--out", str(tmp_path / "bad"), "--quiet"])
    assert result.exit_code == 2 and result.stderr.startswith("error: "), (expected, result.output)
    assert result.stderr.count("\n") == 1 and expected in result.stderr, (expected, result.stderr)
    assert not (tmp_path / "bad").exists()
