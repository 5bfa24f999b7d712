"""`wadi-distill flow-teacher`: a rectified-flow teacher of the SD3 family in the embedded VAE's latents,
written as a StableDiffusion3Pipeline that plain diffusers loads with no extra arguments; its training
conditioning is the pipeline's own, its noise levels the scheduler's, and the distiller samples it as the
pipeline does."""

import json

import pytest
import torch

from wadi_analysis.errors import InvalidValue
from wadi_distill.embedded.flow_teacher_training import (T5_TOKENS, flow_scheduler, flow_teacher_config,
                                                         sd3_conditioning, shifted, train_flow_teacher)
from wadi_distill.embedded.tokenizer import write_caption_t5_tokenizer
from wadi_distill.embedded.vae_training import train_vae, vae_config

TINY_FLOW = dict(steps=2, batch_size=4, image_size=8, width=16, heads=2, layers=2, text_hidden=8, shift=3.0)


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    vae = train_vae(vae_config(steps=2, batch_size=4, image_size=8, channels="8,8,8"), root / "vae",
                    log=lambda line: None)
    return train_flow_teacher(flow_teacher_config(vae=vae, **TINY_FLOW), root / "teacher", log=lambda line: None)


def test_flow_teacher_is_a_complete_sd3_pipeline_plain_diffusers_runs(flow_teacher):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(flow_teacher)  # no extra arguments: every component ships
    assert pipe.text_encoder_3 is not None and pipe.vae.config.shift_factor == 0.0
    assert pipe.transformer.config.sample_size == 2 and pipe.scheduler.config.shift == 3.0
    image = pipe("a photo of a bag", num_inference_steps=2).images[0]
    assert image.size == (8, 8)
    info = json.loads((flow_teacher / "wadi_flow_teacher.json").read_text())
    assert info["command"].startswith("wadi-distill flow-teacher --image-size 8 --steps 2 --batch-size 4")
    assert info["vae"]["command"].startswith("wadi-distill vae")


def test_training_conditioning_is_the_pipelines_encode_prompt(flow_teacher):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(flow_teacher)
    prompts = ["a photo of a bag", "", "an image of a sandal"]
    theirs, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False)
    clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                              return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        ours, our_pooled = sd3_conditioning([pipe.text_encoder, pipe.text_encoder_2], clip_ids,
                                            pipe.text_encoder_3(t5_ids)[0])
    assert ours.shape == (3, pipe.tokenizer_max_length + T5_TOKENS, 2 * 8)
    # float32 rounding of a batched T5, which differs by CPU (1.3e-5 absolute, 3.6e-5 relative seen on one);
    # a wrong conditioning differs in the first digit
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our_pooled, pooled, rtol=0, atol=1e-6)


def test_training_noise_levels_are_the_schedulers():
    """The shift applied to training σ is the scheduler's (its 1000 training levels)."""
    scheduler = flow_scheduler(3.0)
    unshifted = torch.arange(1000, 0, -1) / 1000
    torch.testing.assert_close(scheduler.sigmas.float(), shifted(unshifted, 3.0), rtol=1e-5, atol=1e-6)


def test_the_distiller_samples_the_flow_teacher_as_its_pipeline_does(flow_teacher):
    """Teacher rows of `evaluate` (N-step Euler on the trailing timesteps 999, 666, 332 of the 1000 levels:
    σ 1, 0.667, 0.333 before the shift) equal the pipeline run on those levels."""
    from diffusers import StableDiffusion3Pipeline

    from wadi_distill.sampling import ddim
    from wadi_distill.teacher import load_teacher

    teacher = load_teacher(flow_teacher)
    assert teacher.family == "sd3" and teacher.latent_channels == 4
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a bag", "a sandal"]
    ours = ddim(teacher, teacher.denoiser, noise, teacher.encode(prompts), teacher.encode([""]), 3, 1.5)
    pipe = StableDiffusion3Pipeline.from_pretrained(flow_teacher)
    theirs = pipe(prompts, latents=noise.clone(), output_type="latent", sigmas=[1.0, 0.667, 0.333],
                  guidance_scale=1.5).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_caption_t5_tokenizer_knows_the_caption_words(tmp_path):
    tokenizer = write_caption_t5_tokenizer(tmp_path, ["a photo of a t-shirt", "an image of a bag", ""])
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of a bag").input_ids)
    assert tokens == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a", "\u2581bag", "</s>"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("a dragon").input_ids) == ["\u2581a", "<unk>", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)


@pytest.mark.parametrize("options, message", [
    (dict(width=10, heads=3), "multiple of --heads"),
    (dict(image_size=12, patch_size=2), "multiple of 4 x --patch-size"),
    (dict(text_hidden=7), "even integer"),
    (dict(shift=0.0), "--shift must be a number > 0"),
    (dict(steps=0), "--steps must be an integer >= 1"),
    (dict(device="tpu"), "--device must be cpu, cuda"),
])
def test_bad_options_are_refused_before_anything_is_read(options, message, tmp_path):
    with pytest.raises(InvalidValue, match=message):
        train_flow_teacher(flow_teacher_config(**options), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flow_teacher_command_refuses_bad_input_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    result = CliRunner().invoke(app, ["flow-teacher", "--out", str(tmp_path / "t"), "--width", "10", "--heads", "3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --width 10 must be a multiple of --heads 3"]
    assert not (tmp_path / "t").exists()


def test_the_recipe_runs_on_the_flow_teacher_with_its_family_presets(flow_teacher):
    from wadi_distill.config import EMBEDDED_DEFAULTS, PAPER_OBJECTIVE, load_config
    from wadi_distill.experiments.recipe import teacher_options

    assert teacher_options("") == {}
    config = load_config(**teacher_options(str(flow_teacher)))
    assert config.teacher == str(flow_teacher)
    assert (config.generator_preset, config.fake_preset) == ("sd3-generator", "sd3-fake")
    # the sweep's candidates are options over the published objective on the embedded defaults
    assert (config.batch_size, config.generator_rank) == (EMBEDDED_DEFAULTS["batch_size"],
                                                          PAPER_OBJECTIVE["generator_rank"])
    assert (config.regression_weight, config.vsd.guidance_real) == (0.0, PAPER_OBJECTIVE["vsd"]["guidance_real"])
    # the sweep's own settings are not overridden by the embedded run defaults
    assert not {"steps", "validate_every", "checkpoint_every", "out"} & set(teacher_options(str(flow_teacher)))
    assert len(config.validation_prompts) == 10
