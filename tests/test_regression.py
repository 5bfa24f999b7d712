"""DMD's regression term beside VSD (wadi_distill/regression.py) on a tiny SD teacher: the pairs are the
teacher's own DDIM samples, the term trains the generator towards them, and a run with it resumes exactly."""

import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import config_for, sd_teacher_with_prompts
from wadi_distill import regression
from wadi_distill.distill import GENERATOR, attach_roles
from wadi_distill.sampling import ddim
from wadi_distill.teacher import load_teacher
from wadi_distill.training.loop import train
from wadi_distill.vsd import VSDConfig


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return sd_teacher_with_prompts(tmp_path_factory.mktemp("regression"))


@pytest.fixture(scope="module")
def teacher(pipeline):
    return load_teacher(str(pipeline[0]))


def test_pairs_are_the_teachers_ddim_samples_from_their_noise(teacher, monkeypatch):
    monkeypatch.setattr(regression, "PAIR_CHUNK", 3)  # several chunks: each pair keeps its own noise and prompt
    prompts = teacher.encode(["a photo of a bag", "a photo of a shirt", "a photo of a sneaker"])
    null = teacher.encode([""])
    pairs = regression.teacher_pairs(teacher, prompts, null, 7, steps=3, guidance=2.0, seed=5)
    assert len(pairs) == 7 and pairs.target.shape == pairs.noise.shape
    assert set(pairs.prompt_index.tolist()) <= {0, 1, 2} and len(set(pairs.prompt_index.tolist())) > 1
    for i in (0, 4, 6):
        alone = ddim(teacher, teacher.denoiser, pairs.noise[i:i + 1], prompts.select(pairs.prompt_index[i:i + 1]),
                     null, 3, 2.0)
        assert torch.allclose(alone, pairs.target[i:i + 1], rtol=1e-4, atol=1e-4)  # batch size changes the float sums
    again = regression.teacher_pairs(teacher, prompts, null, 7, steps=3, guidance=2.0, seed=5)
    assert torch.equal(again.target, pairs.target)  # made again bit for bit on resume
    other = regression.teacher_pairs(teacher, prompts, null, 7, steps=3, guidance=2.0, seed=6)
    assert not torch.equal(other.noise, pairs.noise)


def test_a_run_makes_no_more_pairs_than_it_can_draw():
    from wadi_distill.config import load_config
    from wadi_distill.regression import pair_count

    assert pair_count(load_config(steps=1000, batch_size=16)) == 2048
    assert pair_count(load_config(steps=2, batch_size=3)) == 6
    assert pair_count(load_config(steps=100, batch_size=16, regression_pairs=64)) == 64


def test_share_covers_the_count():
    assert [regression.share(2048, p) for p in (1, 2, 3)] == [2048, 1024, 683]
    assert regression.share(5, 8) == 1


def test_the_loss_is_zero_at_the_target_and_its_gradient_reaches_only_the_generator(pipeline, teacher, tmp_path):
    config = config_for(pipeline, tmp_path / "r")
    roles, _ = attach_roles(teacher, config)
    prompts, null = teacher.encode(["a photo of a bag", "a photo of a shirt"]), teacher.encode([""])
    pairs = regression.teacher_pairs(teacher, prompts, null, 4, steps=2, guidance=1.5, seed=0)
    loss = regression.regression_batch_loss(teacher, roles.base, pairs, prompts, 3, VSDConfig(),
                                            torch.Generator().manual_seed(0))
    loss.backward()
    generator = roles.parameters(GENERATOR)
    assert loss.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator)
    trained = {id(p) for p in generator}
    assert all(p.grad is None for p in roles.base.parameters() if id(p) not in trained)  # base and fake untouched
    x0 = torch.randn(2, 4, 8, 8)
    assert regression.regression_loss(x0, x0.clone()).item() == 0.0
    assert regression.regression_loss(x0.half(), x0 + 1).dtype == torch.float32


def test_the_term_pulls_the_generator_towards_the_teachers_samples(pipeline, teacher, tmp_path):
    """The same run with and without the term: with it, the one-step samples end nearer the teacher's DDIM
    samples of the same noise (pairs made independently here, from another seed)."""
    def distance(run: str) -> float:
        from tests.support.runs import trained_generator

        config = config_for(pipeline, tmp_path / run)
        run_teacher, generator = trained_generator(config)
        prompts, null = run_teacher.encode(["a photo of a bag", "a photo of a sneaker"]), run_teacher.encode([""])
        check = regression.teacher_pairs(run_teacher, prompts, null, 16, steps=4, guidance=1.5, seed=99)
        with torch.no_grad():
            return regression.regression_batch_loss(run_teacher, generator, check, prompts, 64, VSDConfig(),
                                                    torch.Generator().manual_seed(1)).item()

    common = dict(steps=8, generator_lr=1e-2, regression_pairs=32, regression_teacher_steps=4, checkpoint_every=8,
                  validate_every=8)
    train(config_for(pipeline, tmp_path / "plain", **common))
    train(config_for(pipeline, tmp_path / "regressed", regression_weight=10.0, **common))
    assert distance("regressed") < 0.9 * distance("plain")


def test_a_run_with_the_term_resumes_exactly(pipeline, tmp_path):
    options = dict(regression_weight=1.0, regression_pairs=4, regression_teacher_steps=2)  # <= 2 steps x batch 2
    train(config_for(pipeline, tmp_path / "straight", **options))
    train(config_for(pipeline, tmp_path / "split", steps=2, **options))
    train(config_for(pipeline, tmp_path / "split", **options), resume="latest")
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "generator.safetensors")
    split = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / "generator.safetensors")
    assert straight.keys() == split.keys() and all(torch.equal(straight[n], split[n]) for n in straight)


def test_an_extended_run_makes_the_pairs_its_first_part_made(pipeline, tmp_path):
    """Pairs are capped at steps x batch (regression.pair_count), and the count is in each checkpoint's
    state.json: a 2-step run extended to 4 steps goes on with its 4 pairs, not the 6 a 4-step run makes."""
    import json

    options = dict(regression_weight=1.0, regression_pairs=6, regression_teacher_steps=2)
    train(config_for(pipeline, tmp_path / "straight", **options))
    train(config_for(pipeline, tmp_path / "split", steps=2, **options))
    train(config_for(pipeline, tmp_path / "split", **options), resume="latest")

    def recorded(run: str, step: int) -> int:
        state = tmp_path / run / "checkpoints" / f"step-{step:07d}" / "state.json"
        return json.loads(state.read_text())["regression_pairs"]
    assert (recorded("straight", 4), recorded("split", 2), recorded("split", 4)) == (6, 4, 4)
    from wadi_distill.distill import TrainingError
    from wadi_distill.training.checkpoint import read_regression_pairs

    state = tmp_path / "split" / "checkpoints" / "step-0000004" / "state.json"
    state.write_text(json.dumps({"step": 4, "regression_pairs": 10 ** 9}))  # tampered: refused, not made
    with pytest.raises(TrainingError, match="regression_pairs must be an integer from 1"):
        read_regression_pairs(state.parent, 6)


def test_fsdp_refuses_the_term_in_one_line():
    from types import SimpleNamespace

    from wadi_distill.config import load_config
    from wadi_distill.training.sharding import unsupported

    reason = unsupported(SimpleNamespace(fsdp_version=2), load_config(regression_weight=1.0), None)
    assert reason and "regression" in reason and "\n" not in reason
