"""The training loop on a tiny SD pipeline: outputs, exact resume, caching, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import config_for, sd_teacher_with_prompts
from wadi_distill.config import load_config
from wadi_distill.training.loop import TrainingError, train


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return sd_teacher_with_prompts(tmp_path_factory.mktemp("train"))


def test_run_writes_everything(pipeline, tmp_path):
    import math

    summary = train(config_for(pipeline, tmp_path / "run"))
    run = tmp_path / "run"
    assert summary["steps"] == 4 and summary["skipped"] == 0
    assert json.loads((run / "config.json").read_text())["steps"] == 4
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,generator_loss") and len(rows) == 5
    assert all(math.isfinite(float(r.split(",")[1])) for r in rows[1:])  # neither NaN nor infinite
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert (run / "samples" / "step-0000004.png").stat().st_size > 0
    assert (run / "generator_adapter.safetensors").is_file()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(config_for(pipeline, tmp_path / "run"))
    assert train(config_for(pipeline, tmp_path / "other", steps=1))["cache_hit"]  # embeddings computed once


def test_resume_is_exact(pipeline, tmp_path):
    train(config_for(pipeline, tmp_path / "straight"))
    train(config_for(pipeline, tmp_path / "split", steps=2))
    train(config_for(pipeline, tmp_path / "split"), resume="latest")
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "generator.safetensors")
    split = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / "generator.safetensors")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def _train_with_blank_prompts(pipeline, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    train(config_for(pipeline, tmp_path / "r", prompts=str(tmp_path / "empty.txt")))


def _train_with_a_plan_for_other_modules(pipeline, tmp_path):
    (tmp_path / "plan.json").write_text('{"format": "wadi-lorad-plan", "targets": {"no.such.module": 4}}')
    train(config_for(pipeline, tmp_path / "r2", plan=str(tmp_path / "plan.json")))


@pytest.mark.parametrize("attempt, error, match", [
    (lambda pipeline, tmp_path: load_config(nonsense=3), ValueError, "unknown option"),
    (_train_with_blank_prompts, ValueError, "no prompts"),
    (_train_with_a_plan_for_other_modules, TrainingError, "do not fit"),
], ids=["unknown-option", "blank-prompts", "plan-for-other-modules"])
def test_bad_config(pipeline, tmp_path, attempt, error, match):
    with pytest.raises(error, match=match):
        attempt(pipeline, tmp_path)


def _cli_run_toml(tmp_path):
    """A one-step run configuration with a [vsd] table, for `wadi-distill run --config`."""
    (tmp_path / "run.toml").write_text(f'steps = 1\nbatch_size = 1\ngenerator_rank = 2\nfake_rank = 2\n'
                                       f'cache_dir = "{tmp_path / "cache"}"\n[vsd]\nguidance_real = 2.0\n')
    return tmp_path / "run.toml"


def test_cli_run_and_export(pipeline, tmp_path):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    folder, prompts = pipeline
    toml = _cli_run_toml(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--teacher", str(folder), "--prompts", str(prompts), "--out",
                                 str(tmp_path / "r"), "--config", str(toml)])
    assert result.exit_code == 0, result.output
    resolved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert resolved["steps"] == 1 and resolved["vsd"]["guidance_real"] == 2.0
    exported = runner.invoke(app, ["export", str(tmp_path / "r"), "--out", str(tmp_path / "e")])
    assert exported.exit_code == 0, exported.output


@pytest.mark.parametrize("args", [
    lambda folder, prompts, tmp: ["--teacher", str(tmp), "--prompts", str(prompts)],
    lambda folder, prompts, tmp: ["--teacher", str(folder), "--prompts", str(tmp / "empty.txt")],
    lambda folder, prompts, tmp: ["--teacher", str(folder), "--prompts", str(prompts), "--adapter", "nope"],
], ids=["not-a-teacher", "empty-prompts", "unknown-adapter"])
def test_cli_bad_input(pipeline, tmp_path, args):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    folder, prompts = pipeline
    toml = _cli_run_toml(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    bad = CliRunner().invoke(app, ["run", *args(folder, prompts, tmp_path), "--out", str(tmp_path / "bad"),
                                   "--config", str(toml)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.output
    assert not (tmp_path / "bad").exists()


def _single_threaded_env():
    """Child processes: one torch thread each (tests share 2 cores; more threads only contend)."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _write_toml(path, **values):
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resume_after_sigkill_is_exact(pipeline, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    folder, prompts = pipeline
    toml = _write_toml(tmp_path / "run.toml", steps=6, batch_size=1, generator_rank=2, fake_rank=2,
                       checkpoint_every=1, keep_checkpoints=10, validate_every=100,
                       cache_dir=str(prompts.parent / "embedding-cache"))
    base = [sys.executable, "-m", "wadi_distill.cli", "run", "--teacher", str(folder), "--prompts", str(prompts),
            "--config", str(toml)]
    env = _single_threaded_env()
    subprocess.run(base + ["--out", str(tmp_path / "straight")], check=True, capture_output=True, env=env)
    victim = subprocess.Popen(base + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoints" / "step-0000003").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = subprocess.run(base + ["--out", str(tmp_path / "killed"), "--resume", "latest"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    for role in ("generator", "fake"):
        straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000006" / f"{role}.safetensors")
        resumed = load_file(tmp_path / "killed" / "checkpoints" / "step-0000006" / f"{role}.safetensors")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), role


def test_two_processes_keep_identical_adapters(pipeline, tmp_path):
    import subprocess
    import sys

    folder, prompts = pipeline
    toml = _write_toml(tmp_path / "run.toml", steps=3, batch_size=1, generator_rank=2, fake_rank=2,
                       checkpoint_every=2, validate_every=100, record_digests=True,
                       cache_dir=str(prompts.parent / "embedding-cache"))
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "wadi_distill.cli", "run", "--teacher", str(folder),
         "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--config", str(toml)],
        capture_output=True, text=True, timeout=600, env=_single_threaded_env())
    assert launched.returncode == 0, launched.stderr[-3000:]
    ranks = [(tmp_path / "run" / f"adapter-digests-rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[0]) == 3 and ranks[0] == ranks[1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step-0000002").iterdir()) == [
        "fake.safetensors", "generator.safetensors", "optimizers.pt", "rng-0.pt", "rng-1.pt", "state.json"]


@pytest.mark.parametrize("options", [dict(mixed_precision="bf16"), dict(gradient_checkpointing=True)])
def test_precision_and_checkpointing_options(pipeline, tmp_path, options):
    import math

    summary = train(config_for(pipeline, tmp_path / "run", steps=2, **options), progress=True)
    assert summary["steps"] == 2 and summary["skipped"] == 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(r.split(",")[1])) for r in rows)


def test_sdxl_teacher_trains(tmp_path):
    from tests.support.pipelines import tiny_sdxl_pipeline
    from wadi_distill.teacher import load_teacher

    folder = tiny_sdxl_pipeline(tmp_path / "sdxl")
    teacher = load_teacher(folder)
    conditioning = teacher.encode(["a photo of a bag", ""])
    assert teacher.family == "sdxl" and conditioning.hidden_states.shape == (2, 77, 64)
    assert conditioning.extra["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    (tmp_path / "prompts.txt").write_text("a photo of a bag\na photo of a shirt\n")
    config = load_config(teacher=str(folder), prompts=str(tmp_path / "prompts.txt"), out=str(tmp_path / "run"),
                         steps=2, batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(tmp_path / "cache"))
    summary = train(config)
    assert summary["steps"] == 2 and summary["skipped"] == 0


def test_pixart_teacher_trains(tmp_path):
    from tests.support.pipelines import tiny_pixart_pipeline
    from wadi_distill.teacher import load_teacher

    folder = tiny_pixart_pipeline(tmp_path / "pixart")
    teacher = load_teacher(folder)
    conditioning = teacher.encode(["a photo of a bag", ""])
    assert teacher.family == "pixart" and conditioning.hidden_states.shape[-1] == 32
    assert "encoder_attention_mask" in conditioning.extra
    (tmp_path / "prompts.txt").write_text("a photo of a bag\na photo of a shirt\n")
    config = load_config(teacher=str(folder), prompts=str(tmp_path / "prompts.txt"), out=str(tmp_path / "run"),
                         steps=2, batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(tmp_path / "cache"),
                         generator_preset="pixart-generator", fake_preset="pixart-fake")
    summary = train(config)
    assert summary["steps"] == 2 and summary["skipped"] == 0
    assert summary["trainable"]["generator"] > summary["trainable"]["fake"] > 0


def test_ema_of_the_generator_adapter(pipeline, tmp_path):
    from wadi_distill.export import export_run

    train(config_for(pipeline, tmp_path / "straight", ema_decay=0.5, generator_lr=1e-2))
    train(config_for(pipeline, tmp_path / "split", steps=2, ema_decay=0.5, generator_lr=1e-2))
    train(config_for(pipeline, tmp_path / "split", ema_decay=0.5, generator_lr=1e-2), resume="latest")
    for run in ("straight", "split"):
        assert (tmp_path / run / "checkpoints" / "step-0000004" / "generator_ema.safetensors").is_file()
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "generator_ema.safetensors")
    split = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / "generator_ema.safetensors")
    assert all(torch.equal(straight[k], split[k]) for k in straight)  # EMA resumes exactly too
    raw = load_file(tmp_path / "straight" / "generator_adapter.safetensors")
    averaged = load_file(tmp_path / "straight" / "generator_adapter_ema.safetensors")
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    assert export_run(tmp_path / "straight", tmp_path / "export", ema=True)["model"].is_dir()


def test_eight_bit_adamw_needs_bitsandbytes(pipeline, tmp_path):
    import importlib.util

    config = config_for(pipeline, tmp_path / "run", steps=1, optimizer="adamw8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(TrainingError, match="bitsandbytes"):
            train(config)
    else:
        assert train(config)["steps"] == 1


def test_full_fine_tuning_has_its_own_generator_copy(pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    from wadi_distill.teacher import load_teacher
    from wadi_distill.export import export_run

    teacher_weights = load_teacher(pipeline[0]).denoiser.state_dict()
    summary = train(config_for(pipeline, tmp_path / "full", steps=2, adapter="full", generator_lr=1e-3))
    assert summary["trainable"]["generator"] == sum(v.numel() for v in teacher_weights.values())
    train(config_for(pipeline, tmp_path / "split", steps=1, adapter="full", generator_lr=1e-3))
    train(config_for(pipeline, tmp_path / "split", steps=2, adapter="full", generator_lr=1e-3), resume="latest")
    straight = load_file(tmp_path / "full" / "checkpoints" / "step-0000002" / "generator.safetensors")
    resumed = load_file(tmp_path / "split" / "checkpoints" / "step-0000002" / "generator.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    exported = UNet2DConditionModel.from_pretrained(export_run(tmp_path / "full", tmp_path / "export")["model"])
    changed = [k for k, v in exported.state_dict().items() if not torch.equal(v, teacher_weights[k])]
    assert changed  # the generator trained; the teacher files on disk are untouched
    assert all(torch.equal(v, teacher_weights[k]) for k, v in load_teacher(pipeline[0]).denoiser.state_dict().items())


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_peft_baselines_train_on_the_shared_base(pipeline, tmp_path, adapter):
    summary = train(config_for(pipeline, tmp_path / adapter, steps=2, adapter=adapter))
    assert summary["steps"] == 2 and summary["skipped"] == 0
    assert summary["trainable"]["generator"] > summary["trainable"]["fake"] > 0


@pytest.fixture(scope="module")
def teacher_without_text_encoder(pipeline, tmp_path_factory):
    import shutil

    broken = tmp_path_factory.mktemp("broken") / "teacher"
    shutil.copytree(pipeline[0], broken)
    shutil.rmtree(broken / "text_encoder")
    return broken


@pytest.mark.parametrize("case", ["missing-text-encoder", "output-under-a-file"])
def test_cli_missing_teacher_parts_and_unwritable_output(pipeline, teacher_without_text_encoder, tmp_path, case):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    folder, prompts = pipeline
    (tmp_path / "blocker").write_text("a file where the run folder should go")
    teacher, out = {"missing-text-encoder": (teacher_without_text_encoder, tmp_path / "r1"),
                    "output-under-a-file": (folder, tmp_path / "blocker" / "run")}[case]
    result = CliRunner().invoke(app, ["run", "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(out),
                                      "--steps", "1", "--quiet"])
    assert result.exit_code == 2 and result.stderr.startswith("error: "), result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()


def _no_processes():
    """What ``_update`` asks of accelerate, for one process on the CPU."""
    from types import SimpleNamespace

    return SimpleNamespace(reduce=lambda tensor, reduction=None: tensor, num_processes=1, device=torch.device("cpu"))


def test_fp16_generator_gradients_with_loss_scaling_agree_with_fp32(pipeline, tmp_path):
    """The loop's update on an fp16-autocast generator step: with the loss scaler the gradients match fp32
    (cosine > 0.999, none flushed to zero); without it small ones underflow. CPU autocast stands in for
    the GPU's (accelerate does not autocast fp16 on the CPU; the loop enables its scalers only where it does)."""
    from wadi_distill.distill import FAKE, GENERATOR, attach_roles, generator_step
    from wadi_distill.teacher import load_teacher
    from wadi_distill.training.loop import STEPPED, _update

    config = config_for(pipeline, tmp_path / "run")
    teacher = load_teacher(config.teacher)
    roles, _ = attach_roles(teacher, config)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():  # generator and fake score away from the teacher: a VSD gradient to measure
        for role in (GENERATOR, FAKE):
            for parameter in roles.parameters(role):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=noise))
    parameters = roles.parameters(GENERATOR)
    conditioning, null = teacher.encode(["a photo of a bag", "a photo of a shirt"]), teacher.encode([""])

    def gradients(fp16: bool, scaler=None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss, _ = generator_step(teacher, roles.base, conditioning, null, config.vsd, torch.Generator().manual_seed(0))
        assert _update(loss, torch.optim.SGD(parameters, lr=0.0), parameters, _no_processes(), 1e9, scaler) == STEPPED
        return torch.cat([p.grad.flatten() for p in parameters]).double()

    reference = gradients(False)
    scaled = gradients(True, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    unscaled = gradients(True)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(scaled, reference, dim=0) > 0.999
    assert (scaled == 0).float().mean() < (unscaled == 0).float().mean()


def test_an_fp16_overflow_skips_the_step_and_lowers_the_scale():
    from wadi_distill.training.loop import OVERFLOW, STEPPED, _update

    layer = torch.nn.Linear(3, 1)
    before = layer.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    hook = layer.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss = layer(torch.ones(1, 3)).sum()
    assert _update(loss, torch.optim.SGD(layer.parameters(), lr=1.0), list(layer.parameters()), _no_processes(), 1.0,
                   scaler) == OVERFLOW
    assert torch.equal(layer.weight, before) and scaler.get_scale() == 2.0 ** 15
    hook.remove()
    loss = layer(torch.ones(1, 3)).sum()
    assert _update(loss, torch.optim.SGD(layer.parameters(), lr=1.0), list(layer.parameters()), _no_processes(), 1.0,
                   scaler) == STEPPED
    assert not torch.equal(layer.weight, before)


def test_fp16_loss_scalers_only_where_accelerate_autocasts_in_fp16(pipeline, tmp_path):
    from types import SimpleNamespace

    from wadi_distill.training.loop import loss_scalers

    config = config_for(pipeline, tmp_path / "run", mixed_precision="fp16")
    cpu = SimpleNamespace(native_amp=False, device=torch.device("cpu"))  # Accelerator(fp16, cpu=True) here
    assert not any(s.is_enabled() for s in loss_scalers(config, cpu).values())
    gpu = SimpleNamespace(native_amp=True, device=torch.device("cpu"))
    assert all(s.is_enabled() for s in loss_scalers(config, gpu).values())
    assert not any(s.is_enabled() for s in loss_scalers(config_for(pipeline, tmp_path / "r", mixed_precision="bf16"),
                                                        gpu).values())


def test_warm_up_raises_both_learning_rates_linearly_and_resumes_exactly(pipeline, tmp_path):
    from wadi_distill.training.loop import _warm_up

    config = config_for(pipeline, tmp_path / "w", warmup_steps=4, generator_lr=1e-3, fake_lr=1e-2)
    optimizers = {role: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0) for role in ("generator", "fake")}
    seen = []
    for step in range(6):
        _warm_up(optimizers, step, config)
        seen.append((optimizers["generator"].param_groups[0]["lr"], optimizers["fake"].param_groups[0]["lr"]))
    assert seen == [pytest.approx((1e-3 * f, 1e-2 * f)) for f in (0.25, 0.5, 0.75, 1, 1, 1)]
    train(config_for(pipeline, tmp_path / "straight", warmup_steps=3))
    train(config_for(pipeline, tmp_path / "split", warmup_steps=3, steps=2))
    train(config_for(pipeline, tmp_path / "split", warmup_steps=3), resume="latest")
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "generator.safetensors")
    split = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / "generator.safetensors")
    assert all(torch.equal(straight[name], split[name]) for name in straight)
