"""A rectified-flow teacher (tiny real SD3 pipeline): loading, prompt encoding, the flow prediction in eps units,
and a few distillation steps through the training loop."""

import pytest
import torch

from tests.support.pipelines import tiny_sd3_pipeline
from wadi_distill import vsd
from wadi_distill.config import load_config
from wadi_distill.teacher import load_teacher
from wadi_distill.training.loop import train


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", shift=3.0)


def test_the_tiny_sd3_pipeline_loads_and_samples(sd3_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, local_files_only=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.vae.config.latent_channels == 16
    images = pipe("a photo of a bag", num_inference_steps=2, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.fixture(scope="module")
def teacher(sd3_folder):
    return load_teacher(sd3_folder)


def test_flow_teacher_schedule_is_the_shifted_sigmas(teacher):
    assert teacher.family == "sd3" and teacher.prediction_type == "flow" and teacher.component == "transformer"
    assert teacher.num_timesteps == 1000 and teacher.latent_channels == 16
    assert teacher.sigmas[-1].item() == pytest.approx(1.0)  # the generator starts from pure noise
    assert torch.all(teacher.sigmas[1:] > teacher.sigmas[:-1])
    unshifted = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(teacher.sigmas, vsd.shifted_sigma(unshifted, 3.0), atol=1e-6)
    assert torch.allclose(teacher.alphas_cumprod, vsd.flow_alpha_bar(teacher.sigmas))
    assert teacher.alphas_cumprod[-1].item() == 0
    # The loss levels the loop draws (uniform timestep indices, distill.py) are sigma drawn with the shift:
    # their median is shifted_sigma(0.5) = 0.75, not 0.5.
    drawn = teacher.sigmas[torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0))]
    assert drawn.median().item() == pytest.approx(0.75, abs=0.02)


def test_flow_teacher_encodes_through_the_pipeline_with_pooled_embeddings(teacher):
    conditioning = teacher.encode(["a photo of a bag", "a photo of a shirt"])
    embeds, _, pooled, _ = teacher.pipeline.encode_prompt(["a photo of a bag", "a photo of a shirt"], None, None,
                                                          do_classifier_free_guidance=False, device="cpu")
    assert torch.equal(conditioning.hidden_states, embeds)
    assert torch.equal(conditioning.extra["pooled_projections"], pooled) and pooled.shape == (2, 64)


def test_flow_teacher_epsilon_is_the_velocity_mapped_to_eps(teacher):
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, 16, 8, 8, generator=generator) for _ in range(2))
    timesteps = torch.tensor([300, 900])
    sigma = teacher.sigmas[timesteps].float().view(2, 1, 1, 1)
    noisy_vp = vsd.add_noise(x0, noise, teacher.alpha_bar(timesteps, x0))
    conditioning = teacher.encode(["a photo of a bag", ""])
    eps = teacher.epsilon(teacher.denoiser, noisy_vp, timesteps, conditioning)
    noisy = vsd.flow_add_noise(x0, noise, sigma)  # what the SD3 scheduler would feed the transformer
    with torch.no_grad():
        velocity = teacher.denoiser(hidden_states=noisy, timestep=1000 * sigma.flatten(),
                                    encoder_hidden_states=conditioning.hidden_states,
                                    pooled_projections=conditioning.extra["pooled_projections"],
                                    return_dict=False)[0]
    assert torch.allclose(eps, vsd.flow_epsilon(velocity, noisy, sigma), atol=1e-5)


def test_a_few_distillation_steps_on_the_flow_teacher(sd3_folder, tmp_path):
    (tmp_path / "prompts.txt").write_text("a photo of a bag\na photo of a shirt\n")
    config = load_config(teacher=str(sd3_folder), prompts=str(tmp_path / "prompts.txt"), out=str(tmp_path / "run"),
                         steps=2, batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(tmp_path / "cache"),
                         generator_preset="sd3-generator", fake_preset="sd3-fake")
    summary = train(config)
    assert summary["steps"] == 2 and summary["skipped"] == 0
    assert summary["trainable"]["generator"] > summary["trainable"]["fake"] > 0


def test_wadi_distill_run_on_the_flow_teacher(sd3_folder, tmp_path):
    import csv
    import json
    import math

    from typer.testing import CliRunner

    from wadi_distill.cli import app

    (tmp_path / "prompts.txt").write_text("a photo of a bag\na photo of a shirt\n")
    (tmp_path / "run.toml").write_text(
        f'steps = 3\nbatch_size = 2\ngenerator_rank = 2\nfake_rank = 2\ncache_dir = "{tmp_path / "cache"}"\n'
        'generator_preset = "sd3-generator"\nfake_preset = "sd3-fake"\n')
    result = CliRunner().invoke(app, ["run", "--teacher", str(sd3_folder), "--prompts", str(tmp_path / "prompts.txt"),
                                      "--out", str(tmp_path / "r"), "--config", str(tmp_path / "run.toml")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "r" / "metrics.csv") as metrics:
        rows = list(csv.DictReader(metrics))
    assert len(rows) == 3
    assert all(math.isfinite(float(row["generator_loss"])) and math.isfinite(float(row["fake_loss"])) for row in rows)
    # Its one-step export is a StableDiffusion3Pipeline with a one-step FlowMatchEulerDiscreteScheduler
    # (tests/test_flow_export.py checks that plain diffusers reproduces `sample`).
    exported = CliRunner().invoke(app, ["export", str(tmp_path / "r"), "--out", str(tmp_path / "one-step")])
    assert exported.exit_code == 0, exported.output
    index = json.loads((tmp_path / "one-step" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]


@pytest.mark.slow
def test_fsdp2_on_the_sd3_teacher_shards_and_trains_like_ddp(sd3_folder, tmp_path):
    """Two CPU processes: FSDP2 shards the SD3 base half and half; adapters identical on both processes and
    trained as under plain data parallelism (CFG pairs included: the default [vsd] guidance)."""
    from tests.support.two_process import check_fsdp2_matches_ddp

    check_fsdp2_matches_ddp(sd3_folder, tmp_path, ["a photo of a bag", "a photo of a shirt"],
                            'generator_preset = "sd3-generator"\nfake_preset = "sd3-fake"\n')
