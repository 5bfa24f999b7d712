"""Teachers from real (tiny) diffusers pipeline folders: schedule, parametrisation, conditioning."""

import pytest
import torch

from tests.support.pipelines import tiny_sd_pipeline
from wadi_analysis import CheckpointError
from wadi_distill.teacher import Conditioning, load_teacher


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def test_sd_teacher(sd_folder):
    from diffusers import DDPMScheduler

    teacher = load_teacher(sd_folder)
    assert teacher.family == "unet" and teacher.prediction_type == "epsilon" and teacher.num_timesteps == 1000
    reference = DDPMScheduler.from_pretrained(sd_folder / "scheduler").alphas_cumprod
    assert torch.allclose(teacher.alphas_cumprod.float(), reference)
    assert teacher.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)  # SD's a_T
    conditioning = teacher.encode(["a photo of a sneaker", ""])
    assert conditioning.hidden_states.shape == (2, 77, 64)
    assert not torch.equal(conditioning.hidden_states[0], conditioning.hidden_states[1])
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([999, 10])
    direct = teacher.denoiser(x, t, conditioning.hidden_states).sample
    assert torch.equal(teacher.epsilon(teacher.denoiser, x, t, conditioning), direct)
    assert all(not p.requires_grad for p in teacher.denoiser.parameters())


def test_conditioning_batch_helpers():
    c = Conditioning(torch.arange(6.0).view(3, 2), {"added_cond_kwargs": {"text_embeds": torch.ones(3, 1), "x": None}})
    both = Conditioning.cat([c, c.select(torch.tensor([0]))])
    assert len(both) == 4 and both.extra["added_cond_kwargs"]["text_embeds"].shape == (4, 1)
    assert len(c.select(torch.tensor([0])).repeat_to(5)) == 5


def test_v_prediction_teacher_gives_epsilon(tmp_path):
    folder = tiny_sd_pipeline(tmp_path / "v", prediction_type="v_prediction")
    teacher = load_teacher(folder)
    assert teacher.prediction_type == "v_prediction"
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    conditioning = teacher.encode(["x"])
    v = teacher.denoiser(x, t, conditioning.hidden_states).sample
    a = teacher.alpha_bar(t, x)
    assert torch.allclose(teacher.epsilon(teacher.denoiser, x, t, conditioning), a.sqrt() * v + (1 - a).sqrt() * x)


def test_not_a_pipeline(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_teacher(tmp_path)
