"""DoRA with frozen magnitude (``--adapter dora-frozen``, the paper's extra arm): only the direction part
trains; the magnitudes stay bit-identical to their start, through training, the adapter file and export."""

import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import config_for, sd_teacher_with_prompts
from wadi_distill import adapters
from wadi_distill.distill import FAKE, GENERATOR, attach_roles
from wadi_distill.teacher import load_teacher
from wadi_distill.training.loop import train

MAGNITUDE = "lora_magnitude_vector"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return sd_teacher_with_prompts(tmp_path_factory.mktemp("dora-frozen"))


@pytest.fixture(scope="module")
def run(pipeline, tmp_path_factory):
    config = config_for(pipeline, tmp_path_factory.mktemp("run") / "run", steps=3, adapter="dora-frozen",
                        generator_lr=1e-2)
    return config, train(config)


def _start(config):
    """The roles as training attaches them, before any step."""
    teacher = load_teacher(config.teacher, config=config.teacher_config)
    roles, counts = attach_roles(teacher, config)
    return teacher, roles, counts


def test_magnitudes_are_frozen_and_not_trained(pipeline, tmp_path):
    config = config_for(pipeline, tmp_path / "r", adapter="dora-frozen")
    _, roles, counts = _start(config)
    model = roles.base
    for role in (GENERATOR, FAKE, None, GENERATOR):  # peft's own switch would make them trainable again
        adapters.activate(model, role)
        magnitudes = adapters.frozen_magnitudes(model, GENERATOR)
        assert magnitudes and not any(p.requires_grad for p in magnitudes)
    trained = {id(p) for p in roles.parameters(GENERATOR)}
    assert trained and not trained & {id(p) for p in adapters.frozen_magnitudes(model, GENERATOR)}
    assert not any(MAGNITUDE in n for n in roles.named_parameters(GENERATOR))
    # the same ranks as LoRA (lora_ranks_at_equal_budget): the trainable count is LoRA's, DoRA's less m
    lora = _start(config_for(pipeline, tmp_path / "l", adapter="lora"))[2]
    dora = _start(config_for(pipeline, tmp_path / "d", adapter="dora"))[2]
    size = sum(p.numel() for p in adapters.frozen_magnitudes(model, GENERATOR))
    assert counts[GENERATOR] == lora[GENERATOR] == dora[GENERATOR] - size
    assert counts[GENERATOR] == sum(p.numel() for p in roles.parameters(GENERATOR))


def test_training_moves_the_direction_not_the_magnitude(run):
    config, summary = run
    assert summary["steps"] == 3 and summary["skipped"] == 0
    _, roles, _ = _start(config)
    start = {n: p.detach().clone() for n, p in roles.base.named_parameters() if f".{GENERATOR}." in n}
    saved = load_file(f"{config.out}/generator_adapter.safetensors")
    magnitudes = {k: v for k, v in saved.items() if MAGNITUDE in k}
    assert magnitudes and len(magnitudes) == len([n for n in start if MAGNITUDE in n])
    for key, value in magnitudes.items():  # bit-identical to the start: the teacher's row norms
        name = key.removeprefix("unet.") + f".{GENERATOR}.weight"  # the file keeps peft's saved names
        assert torch.equal(value, start[name]), key
    ups = {k: v for k, v in saved.items() if ".lora_B." in k}
    assert ups and any(v.abs().max() > 0 for v in ups.values())  # B started at 0: the direction moved
    checkpoint = load_file(f"{config.out}/checkpoints/step-0000003/generator.safetensors")
    assert checkpoint and not any(MAGNITUDE in k for k in checkpoint)  # not optimiser state either
    assert adapters.describe_adapter(f"{config.out}/generator_adapter.safetensors")["method"] == "dora-frozen"


def test_file_reloads_frozen_and_export_keeps_the_row_norms(run, tmp_path):
    from wadi_distill.export import export_run

    config, _ = run
    teacher = load_teacher(config.teacher, text=False)
    name = adapters.load_adapter(teacher.denoiser, f"{config.out}/generator_adapter.safetensors")
    adapters.activate(teacher.denoiser, name)
    assert adapters.frozen_magnitudes(teacher.denoiser, name)
    assert not any(p.requires_grad for p in adapters.frozen_magnitudes(teacher.denoiser, name))
    assert not any(MAGNITUDE in n for n, p in teacher.denoiser.named_parameters()
                   if any(p is q for q in adapters.adapter_parameters(teacher.denoiser, name)))

    from diffusers import UNet2DConditionModel

    merged = UNet2DConditionModel.from_pretrained(export_run(config.out, tmp_path / "export")["model"]).state_dict()
    original = load_teacher(config.teacher, text=False).denoiser.state_dict()
    targets = adapters._peft_targets(teacher.denoiser, name)
    moved = 0
    for target in targets:
        before, after = original[f"{target}.weight"].flatten(1), merged[f"{target}.weight"].flatten(1)
        assert torch.allclose(after.norm(dim=1), before.norm(dim=1), rtol=1e-5, atol=0), target  # rows keep norms
        moved += not torch.equal(after, before)
    assert moved  # ... and turned


def test_compare_sees_directions_move_and_norms_kept(run, tmp_path):
    from wadi_analysis.compare import compare
    from wadi_distill.export import export_run

    config, _ = run
    export_run(config.out, tmp_path / "export")
    summary = compare(config.teacher, tmp_path / "export", component="unet").summary
    assert summary["norm_change_mean"] < 1e-4 < summary["direction_change_mean"]  # % units, as for LoRaD students
