"""A few WaDi iterations on one shared frozen base (tiny SD pipeline): what changes and what must not."""

import pytest
import torch

from tests.support.pipelines import tiny_sd_pipeline
from wadi_distill import adapters, lorad
from wadi_distill.teacher import Conditioning, load_teacher
from wadi_distill.distill import FAKE, GENERATOR, VSDConfig, drop_conditioning, fake_step, generator_step


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def teacher(pipeline_folder):
    return load_teacher(pipeline_folder)


def test_iterations_train_only_the_adapters(teacher):
    model = teacher.denoiser
    adapters.attach(model, "lorad", lorad.resolve_preset(model, "sd-unet-generator", rank=4), GENERATOR)
    adapters.attach(model, "lorad", lorad.resolve_preset(model, "sd-unet-fake", rank=2), FAKE, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in teacher.pipeline.text_encoder.named_parameters()}
    generator_params = lorad.adapter_parameters(model, GENERATOR)
    fake_params = lorad.adapter_parameters(model, FAKE)
    optimizers = {GENERATOR: torch.optim.AdamW(generator_params, lr=1e-3),
                  FAKE: torch.optim.AdamW(fake_params, lr=1e-2)}
    conditioning = teacher.encode(["a photo of a sneaker", "a photo of a bag"])
    null = teacher.encode([""])
    rng = torch.Generator().manual_seed(0)
    config = VSDConfig()
    for _ in range(3):
        optimizers[FAKE].zero_grad(set_to_none=True)
        loss, x0 = generator_step(teacher, model, conditioning, null, config, rng)
        optimizers[GENERATOR].zero_grad()
        loss.backward()
        assert all(p.grad is None for p in fake_params)
        optimizers[GENERATOR].step()
        fake_loss = fake_step(teacher, model, x0, conditioning, null, config, rng)
        optimizers[FAKE].zero_grad()
        fake_loss.backward()
        optimizers[FAKE].step()
        assert torch.isfinite(loss) and torch.isfinite(fake_loss)
        assert x0.shape == (2, 4, 16, 16)
    adapter_ids = {id(p) for p in generator_params + fake_params}
    for name, param in model.named_parameters():
        if id(param) in adapter_ids:
            if name.endswith(".A"):  # A starts at zero: any update shows
                assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name  # the teacher is bit-identical
    for name, param in teacher.pipeline.text_encoder.named_parameters():
        assert torch.equal(param, text_before[name])
    # Teacher role still gives the original network.
    adapters.activate(model, None)
    assert all(torch.equal(m.weight, m.parametrizations.weight.original)
               for _, m, _ in lorad.model.lorad_modules(model))


def test_alpha_T_options(pipeline_folder):
    from wadi_distill.distill import one_step

    # A teacher of its own: the module's shared one carries whatever adapters earlier tests attached.
    teacher = load_teacher(pipeline_folder)
    model = teacher.denoiser
    lorad.add_adapter(model, GENERATOR, {"conv_in": 1})
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = teacher.encode(["x"])
    own = one_step(teacher, model, noise, cond, VSDConfig())
    published = one_step(teacher, model, noise, cond, VSDConfig(alpha_T=0.0047))
    assert torch.allclose(own, published, rtol=1e-2, atol=1e-2)  # SD's schedule: a_T = 0.00468...
    assert not torch.equal(own, published)


def test_prompt_dropout_replaces_whole_conditioning():
    cond = Conditioning(torch.ones(4000, 2, 3), {"added_cond_kwargs": {"text_embeds": torch.ones(4000, 5)}})
    null = Conditioning(torch.zeros(1, 2, 3), {"added_cond_kwargs": {"text_embeds": torch.zeros(1, 5)}})
    dropped = drop_conditioning(cond, null, 0.1, torch.Generator().manual_seed(0))
    gone = dropped.hidden_states[:, 0, 0] == 0
    assert 0.08 < gone.float().mean().item() < 0.12
    assert torch.equal(gone, dropped.extra["added_cond_kwargs"]["text_embeds"][:, 0] == 0)


def test_prompt_dropout_per_batch_drops_the_whole_batch_together():
    """The published code's scope: one draw per batch, so a batch is all prompts or all null prompt."""
    cond, null = Conditioning(torch.ones(8, 2, 3)), Conditioning(torch.zeros(1, 2, 3))
    rng = torch.Generator().manual_seed(0)
    batches = [drop_conditioning(cond, null, 0.3, rng, scope="batch").hidden_states[:, 0, 0] == 0 for _ in range(400)]
    assert all(gone.all() or not gone.any() for gone in batches)
    assert 0.22 < sum(gone.all().item() for gone in batches) / 400 < 0.38
