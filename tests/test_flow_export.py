"""The export of a run on a rectified-flow teacher (tiny real SD3 pipeline, shift 3) as a complete one-step
``StableDiffusion3Pipeline``: plain diffusers loads it and its one step (a ``FlowMatchEulerDiscreteScheduler``
from sigma_max to 0) equals ``wadi-distill sample`` of the run and of the export; what cannot be exported is
refused with one line; the teacher's own multi-step DDIM is the flow's Euler sampler."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.support.pipelines import tiny_sd3_pipeline
from tests.support.tensors import relative_difference
from wadi_analysis.errors import UserError
from wadi_distill.cli import app
from wadi_distill.config import load_config
from wadi_distill.export import export_run
from wadi_distill.training.loop import train

PROMPTS = ["a photo of a bag", "a photo of a shirt"]
COUNT = 2  # images per prompt
SHIFT = 3.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run folder, teacher folder, the export moved away from where it was written)."""
    root = tmp_path_factory.mktemp("flow-export")
    teacher = tiny_sd3_pipeline(root / "pipe", shift=SHIFT)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = load_config(teacher=str(teacher), prompts=str(root / "prompts.txt"), out=str(root / "run"), steps=2,
                         batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(root / "cache"),
                         generator_lr=1e-2, checkpoint_every=2, validate_every=100,
                         generator_preset="sd3-generator", fake_preset="sd3-fake")
    train(config, progress=False)
    export_run(config.out, root / "export")
    moved = tmp_path_factory.mktemp("moved") / "one-step"
    shutil.move(root / "export", moved)
    return Path(config.out), teacher, moved


def sample_pngs(source: Path, out: Path, *args: str) -> np.ndarray:
    """``wadi-distill sample``'s images (N, H, W, 3) uint8 as int, in prompt-major order."""
    result = CliRunner().invoke(app, ["sample", str(source), *sum((["-p", p] for p in PROMPTS), []),
                                      "--n", str(COUNT), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))]).astype(int)


def pipeline_inputs(export: Path):
    """(prompts, the initial latents ``sample`` uses): the same x_T for both."""
    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise

    prompts = [p for p in PROMPTS for _ in range(COUNT)]
    return prompts, initial_noise(load_export(export).teacher, len(prompts), seed=0)


@torch.no_grad()
def project_latents(source: Path, noise: torch.Tensor, prompts: list[str], guidance: float = 1.0) -> torch.Tensor:
    from wadi_distill.runs import load_one_step
    from wadi_distill.sampling import one_step_sample

    model = load_one_step(source)
    return one_step_sample(model.teacher, model.generator.eval(), noise, model.teacher.encode(prompts), model.vsd,
                           guidance)


def one_step_call(**extra) -> dict:
    return {"num_inference_steps": 1, "guidance_scale": 0.0, **extra}


def as_rgb(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB")) for image in images]).astype(int)


def test_plain_diffusers_one_step_equals_sample(exported, tmp_path):
    from diffusers import (AutoPipelineForText2Image, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                           StableDiffusion3Pipeline)

    run, teacher, export = exported
    prompts, noise = pipeline_inputs(export)
    away = teacher.with_name("pipe-away")
    teacher.rename(away)  # what the export reads must be its own
    try:
        ours = sample_pngs(export, tmp_path / "samples")
        plain = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
        auto = AutoPipelineForText2Image.from_pretrained(export, use_safetensors=True)
        expected = project_latents(export, noise, prompts)
    finally:
        away.rename(teacher)
    assert type(plain) is type(auto) is StableDiffusion3Pipeline
    assert isinstance(plain.scheduler, FlowMatchEulerDiscreteScheduler) and plain.scheduler.config.shift == SHIFT
    for pipe in (plain, auto):
        images = pipe(prompts, latents=noise.clone(), output_type="pil", **one_step_call()).images
        assert np.abs(as_rgb(images) - ours).max() <= 1
    latents = plain(prompts, latents=noise.clone(), output_type="latent", **one_step_call()).images
    assert relative_difference(latents, expected) < 1e-5
    # the run itself samples the same images (its adapter unmerged on the teacher)
    assert np.abs(sample_pngs(run, tmp_path / "from-run") - ours).max() <= 1
    assert relative_difference(project_latents(run, noise, prompts), expected) < 1e-4
    assert ours.std() > 5  # images, not a constant


def test_one_step_is_x_minus_the_velocity_at_sigma_max(exported):
    """The exported scheduler's one step: timestep 1000 sigma_max, sigmas [sigma_max, 0]; the generator's x0 is
    x - sigma_max v with the merged transformer's velocity, what the pipeline computes (to float rounding)."""
    from diffusers import DiffusionPipeline

    _, _, export = exported
    prompts, noise = pipeline_inputs(export)
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [1000.0] and pipe.scheduler.sigmas.tolist() == [1.0, 0.0]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    with torch.no_grad():
        velocity = pipe.transformer(hidden_states=noise, timestep=torch.full((len(prompts),), 1000.0),
                                    encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
    latents = pipe(prompts, latents=noise.clone(), output_type="latent", **one_step_call()).images
    assert relative_difference(latents, noise - velocity) < 1e-6
    assert relative_difference(project_latents(export, noise, prompts), latents) < 1e-6
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["prediction_type"] == "flow" and info["alpha_T"] == 0 and info["sigma_max"] == 1.0
    assert info["pipeline"] == "StableDiffusion3Pipeline" and info["scheduler"].startswith("FlowMatchEuler")


def test_the_flow_export_records_no_absolute_path_and_is_a_model_folder(exported, tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    run, teacher, export = exported
    forbidden = {str(tmp_path_factory.getbasetemp()), str(run), str(teacher)}
    for path in export.rglob("*"):
        if path.is_file():
            assert not [f for f in forbidden if f.encode() in path.read_bytes()], path
    root = SD3Transformer2DModel.from_pretrained(export).state_dict()
    inside = SD3Transformer2DModel.from_pretrained(export / "transformer").state_dict()
    assert root.keys() == inside.keys() and all(torch.equal(root[k], inside[k]) for k in root)


def test_sample_guidance_equals_the_pipelines(exported, tmp_path):
    """``sample --guidance 2.5`` is the SD3 pipeline's ``guidance_scale=2.5`` (against the empty prompt)."""
    from diffusers import DiffusionPipeline

    _, _, export = exported
    prompts, noise = pipeline_inputs(export)
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    guided = sample_pngs(export, tmp_path / "guided", "--guidance", "2.5")
    images = pipe(prompts, latents=noise.clone(), output_type="pil", **one_step_call(guidance_scale=2.5)).images
    assert np.abs(as_rgb(images) - guided).max() <= 1
    assert np.abs(guided - sample_pngs(export, tmp_path / "default")).max() > 1


def test_a_flow_run_with_its_own_alpha_T_is_refused(exported, tmp_path):
    """On a flow teacher the one step starts at sigma_max (a = 0): a [vsd] alpha_T of the run's own is no Euler step."""
    from tests.support.hostile import snapshot

    run, _, _ = exported
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vsd"]["alpha_T"] = 0.0047
    (copy / "config.json").write_text(json.dumps(config))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["export", str(copy), "--out", str(tmp_path / "export")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "alpha_T = 0.0047" in result.stderr and "flow teacher" in result.stderr
    assert snapshot(tmp_path) == before


def test_dynamic_shifting_is_refused(exported, tmp_path):
    """Resolution-dependent shifting (FLUX-style schedulers) has no one-step sigma independent of the size: the
    scheduler maker refuses it, and a run whose teacher has it is refused in one line, nothing written."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from wadi_distill.one_step_pipeline import one_step_flow_scheduler

    run, teacher, _ = exported
    dynamic = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(UserError, match="dynamic"):
        one_step_flow_scheduler(dynamic, 1.0)
    shutil.copytree(teacher, tmp_path / "pipe")
    scheduler_file = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "use_dynamic_shifting": True}))
    shutil.copytree(run, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "teacher": str(tmp_path / "pipe")}))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "dynamic" in result.stderr and not (tmp_path / "export").exists()


def test_only_options_that_move_the_one_step_are_switched_off(exported):
    """Inverted sigmas (or a terminal shift, Karras sigmas...) in the teacher's scheduler would move the one step
    off [1, 0]: the export's scheduler drops them and keeps the shift; its one step is still the generator's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from wadi_distill.one_step_pipeline import one_step_flow_scheduler

    config = dict(FlowMatchEulerDiscreteScheduler(shift=SHIFT, invert_sigmas=True).config)
    moved = FlowMatchEulerDiscreteScheduler.from_config(config)
    moved.set_timesteps(1)
    assert moved.sigmas.tolist() != [1.0, 0.0]
    scheduler = one_step_flow_scheduler(config, 1.0)
    scheduler.set_timesteps(1)
    assert scheduler.sigmas.tolist() == [1.0, 0.0] and scheduler.config.shift == SHIFT
    with pytest.raises(UserError, match="sigma_max = 0.5"):
        one_step_flow_scheduler(dict(FlowMatchEulerDiscreteScheduler(shift=SHIFT).config), 0.5)


def test_teacher_ddim_is_the_flow_pipelines_euler_sampler(exported):
    """``sampling.ddim`` on a flow teacher (a = 0 at sigma_max) equals the teacher's own pipeline run on the same
    sigmas: 1 step, and 2 steps with CFG (trailing timesteps 999, 499: sigmas 1 and 0.5 before the shift)."""
    from diffusers import StableDiffusion3Pipeline

    from wadi_distill.sampling import ddim, initial_noise
    from wadi_distill.teacher import load_teacher

    _, folder, _ = exported
    teacher = load_teacher(folder)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    noise = initial_noise(teacher, 2, seed=1)
    conditioning, null = teacher.encode(PROMPTS), teacher.encode([""])
    one = ddim(teacher, teacher.denoiser, noise, conditioning, null, steps=1)
    theirs = pipe(PROMPTS, latents=noise.clone(), output_type="latent", num_inference_steps=1,
                  guidance_scale=1.0).images
    assert torch.isfinite(one).all() and relative_difference(one, theirs) < 1e-5
    two = ddim(teacher, teacher.denoiser, noise, conditioning, null, steps=2, guidance_scale=2.0)
    theirs = pipe(PROMPTS, latents=noise.clone(), output_type="latent", sigmas=[1.0, 0.5], guidance_scale=2.0).images
    assert relative_difference(two, theirs) < 1e-4 and relative_difference(two, one) > 1e-2


def test_the_lora_of_a_flow_run_loads_in_plain_diffusers(exported, tmp_path):
    """``export --lora-rank`` on the SD3 run: the change as a peft LoRA file, which ``StableDiffusion3Pipeline``
    loads and fuses into the teacher; at full rank that is the exported merged transformer (to float rounding)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    run, teacher, _ = exported
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "export"), "--lora-rank", "64"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export" / "lora" / "lora_report.json").read_text())
    assert report["total_relative_error"] < 1e-5
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher, local_files_only=True)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(tmp_path / "export" / "lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "export" / "transformer").state_dict()
    loaded = pipe.transformer.state_dict()
    assert merged.keys() == loaded.keys()
    assert max((merged[k] - loaded[k]).abs().max().item() for k in merged) < 1e-5
    assert max((original[k] - loaded[k]).abs().max().item() for k in merged) > 1e-3  # the LoRA changed it


def test_an_a_T_of_zero_is_read_only_from_a_flow_export(exported, tmp_path):
    """a_T = 0 (a flow export's one step at sigma_max) is no a_T of an eps/v export: an info that records it with
    another parametrisation is refused in one line."""
    _, _, export = exported
    copy = tmp_path / "one-step"
    shutil.copytree(export, copy)
    info = json.loads((copy / "wadi_one_step.json").read_text())
    (copy / "wadi_one_step.json").write_text(json.dumps({**info, "prediction_type": "epsilon"}))
    result = CliRunner().invoke(app, ["sample", str(copy), "-p", "x", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "alpha_T" in result.stderr
    assert not (tmp_path / "s").exists()
