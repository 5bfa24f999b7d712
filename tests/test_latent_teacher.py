"""The latent-space teacher: `wadi-distill vae` (an AutoencoderKL and its measured scaling factor),
`wadi-distill teacher --vae` (a U-Net in that latent space), and the complete pipeline plain diffusers
loads and runs with no extra arguments."""

import json

import pytest
import torch

from wadi_analysis.errors import InvalidValue, UserError
from wadi_distill.embedded.teacher_training import teacher_config, train_teacher
from wadi_distill.embedded.vae_training import (first_stage_loss, measure_scaling_factor, train_vae, vae_config)

TINY_VAE = dict(steps=3, batch_size=4, image_size=8, channels="8,8,8")
TINY_UNET = dict(steps=2, batch_size=4, image_size=8, channels="16,32")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return train_vae(vae_config(**TINY_VAE), tmp_path_factory.mktemp("vae") / "vae", log=lambda line: None)


def test_vae_command_writes_an_autoencoder_with_its_measured_scaling_factor(tiny_vae):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae)
    info = json.loads((tiny_vae / "wadi_vae.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(info["scaling_factor"]) and info["scaling_factor"] > 0
    assert info["command"] == "wadi-distill vae --image-size 8 --channels 8,8,8 --steps 3 --batch-size 4"
    latents = vae.encode(torch.zeros(2, 1, 8, 8)).latent_dist.mean
    assert latents.shape == (2, 4, 2, 2)  # two halvings


def test_scaling_factor_is_one_over_the_latent_std():
    """SD's rule: scaled latents of the data have unit standard deviation."""
    from wadi_distill.embedded.vae_training import autoencoder

    vae = autoencoder(vae_config(**TINY_VAE)).eval()
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    scale = measure_scaling_factor(vae, images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    samples = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    assert (samples * scale).std().item() == pytest.approx(1.0, rel=1e-5)


def test_first_stage_loss_is_l1_plus_weighted_kl():
    from wadi_distill.embedded.vae_training import autoencoder

    vae = autoencoder(vae_config(**TINY_VAE))
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    without_kl = first_stage_loss(vae, images, 0.0, torch.Generator().manual_seed(0))
    with_kl = first_stage_loss(vae, images, 1.0, torch.Generator().manual_seed(0))
    kl = vae.encode(images).latent_dist.kl().mean()
    torch.testing.assert_close(with_kl - without_kl, kl, rtol=1e-4, atol=1e-4)


def test_latent_teacher_is_a_complete_pipeline_plain_diffusers_runs(tiny_vae, tmp_path):
    """`teacher --vae`: StableDiffusionPipeline.from_pretrained(path) with no extra arguments loads it, and
    every output type works at the default size and at another one."""
    from diffusers import StableDiffusionPipeline

    from wadi_distill.teacher import load_teacher

    out = train_teacher(teacher_config(vae=tiny_vae, **TINY_UNET), tmp_path / "teacher", log=lambda line: None)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.vae_scale_factor == 4 and pipe.unet.config.in_channels == 4
    images = pipe("a photo of a bag", num_inference_steps=2).images
    assert images[0].size == (8, 8)  # U-Net 2x2 latents x 4
    assert pipe("a bag", num_inference_steps=2, height=16, width=16, output_type="np").images.shape == (1, 16, 16, 1)
    teacher = load_teacher(out)
    assert (teacher.latent_channels, teacher.sample_size) == (4, 2)
    provenance = json.loads((out / "wadi_teacher.json").read_text())
    assert provenance["vae"]["scaling_factor"] == pipe.vae.config.scaling_factor
    assert "--vae" in provenance["command"]


@pytest.mark.parametrize("options, message", [
    (dict(channels="8,8"), "3 multiples of 8"),
    (dict(image_size=10), "multiple of 4"),
    (dict(kl_weight=-1.0), "--kl-weight"),
    (dict(channels="a"), "comma-separated"),
])
def test_vae_options_are_checked(options, message):
    with pytest.raises(InvalidValue, match=message):
        vae_config(**options)


def test_teacher_refuses_a_folder_that_is_not_an_autoencoder(tmp_path):
    (tmp_path / "notvae").mkdir()
    with pytest.raises(InvalidValue, match="not an AutoencoderKL folder"):
        train_teacher(teacher_config(vae=tmp_path / "notvae", **TINY_UNET), tmp_path / "t", log=lambda line: None)
    assert not (tmp_path / "t").exists()


def test_vae_command_keeps_a_users_folder(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine\n")
    with pytest.raises(UserError, match="--overwrite"):
        train_vae(vae_config(**TINY_VAE), user, log=lambda line: None)
    assert (user / "keep.txt").read_text() == "mine\n"
