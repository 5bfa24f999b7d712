"""FSDP2: `accelerate launch --config_file configs/accelerate_fsdp2.yaml` on two CPU processes (gloo) shards
the tiny SD teacher's frozen base, trains like plain data parallelism, checkpoints, resumes and exports."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import assert_close, reference_one_step, sd_teacher_with_prompts, x0_from_epsilon
from wadi_distill.teacher import load_teacher
from wadi_distill.config import load_config
from wadi_distill.distill import attach_roles
from wadi_distill.training.loop import TrainingError, train

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate_fsdp2.yaml"


def _launch(launcher: list[str], run_args: list[str]) -> subprocess.CompletedProcess:
    import os

    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
                           "-m", "wadi_distill.cli", "run", "--quiet", *run_args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _shares(output: str) -> dict[int, float]:
    found = re.findall(r"fsdp2: process (\d)/2 holds ([\d,]+) of ([\d,]+) base weights", output)
    return {int(r): int(local.replace(",", "")) / int(full.replace(",", "")) for r, local, full in found}


def test_fsdp2_shards_the_base_trains_like_ddp_resumes_and_exports(tmp_path):
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    folder, prompts = sd_teacher_with_prompts(tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 3\nbatch_size = 1\ngenerator_rank = 2\nfake_rank = 2\ncheckpoint_every = 1\n"
                    "validate_every = 100\nrecord_digests = true\ngenerator_lr = 0.01\n"
                    f"cache_dir = {json.dumps(str(prompts.parent / 'embedding-cache'))}\n")
    common = ["--teacher", str(folder), "--prompts", str(prompts), "--config", str(toml)]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"

    first = _launch(["--config_file", str(FSDP_CONFIG)], common + ["--out", str(fsdp), "--steps", "2"])
    shares = _shares(first.stderr + first.stdout)
    assert sorted(shares) == [0, 1] and all(abs(s - 0.5) < 0.01 for s in shares.values()), shares  # really sharded
    _launch(["--config_file", str(FSDP_CONFIG)], common + ["--out", str(fsdp), "--resume", "latest"])
    _launch(["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
            common + ["--out", str(ddp)])

    rows = (fsdp / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2", "3"]
    assert all(math.isfinite(float(v)) for r in rows for v in r.split(",")[1:3])
    ranks = [(fsdp / f"adapter-digests-rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[0]) == 3 and ranks[0] == ranks[1]  # the adapters stay identical on both processes
    for r in (0, 1):  # the whole base (gathered from the shards at the end) is the teacher, bit for bit
        start, end = (line.split()[1] for line in (fsdp / f"base-digests-rank{r}.txt").read_text().splitlines())
        assert start == end
    assert sorted(p.name for p in (fsdp / "checkpoints" / "step-0000003").iterdir()) == [
        "fake.safetensors", "generator.safetensors", "optimizers.pt", "rng-0.pt", "rng-1.pt", "state.json"]
    assert (fsdp / "samples" / "step-0000003.png").is_file()  # validation needs every process's shards
    config = load_config(toml, teacher=str(folder), prompts=str(prompts), out=str(fsdp))
    roles, _ = attach_roles(load_teacher(str(folder)), config)  # the adapters as initialised
    for role in ("generator", "fake"):  # sharded or not, the same training (to float rounding)
        init = {k: v.detach() for k, v in roles.named_parameters(role).items()}
        sharded, whole = (load_file(run / "checkpoints" / "step-0000003" / f"{role}.safetensors") for run in (fsdp, ddp))
        assert sharded.keys() == whole.keys() == init.keys()
        flat = {name: torch.cat([d[k].flatten() for k in sorted(d)]) for name, d in
                (("init", init), ("sharded", sharded), ("whole", whole))}
        moved = (flat["whole"] - flat["init"]).norm()
        assert moved > 0.1 and (flat["sharded"] - flat["whole"]).norm() < 1e-3 * moved, role

    exported = CliRunner().invoke(app, ["export", str(fsdp), "--out", str(tmp_path / "export")])
    assert exported.exit_code == 0, exported.output
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(tmp_path / "export").eval()
    teacher, noise, conditioning, unmerged = reference_one_step(config)  # from the last checkpoint
    with torch.no_grad():
        epsilon = model(noise, torch.full((2,), teacher.num_timesteps - 1), conditioning.hidden_states).sample
    assert_close(x0_from_epsilon(teacher, noise, epsilon), unmerged)


def test_peft_adapters_start_alike_whatever_the_global_rng():
    """Every process must start from the same adapters (their gradients are averaged, not the weights):
    peft draws LoRA's A from the global RNG, which processes need not share."""
    from tests.conftest import build_unet
    from wadi_distill import adapters

    states = []
    for global_seed in (1, 2):
        model = build_unet()
        torch.manual_seed(global_seed)
        adapters.attach(model, "lora", {"down_blocks.0.attentions.0.proj_in": 2}, "generator", seed=7)
        states.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    assert states[0].keys() == states[1].keys() and states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("version, options, message", [
    ("1", {}, "use fsdp_version: 2"),
    ("2", {"adapter": "full"}, "--adapter full is not supported with FSDP"),
])
def test_fsdp_refusals_come_before_any_output(tmp_path, monkeypatch, version, options, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    (tmp_path / "prompts.txt").write_text("a\n")
    config = load_config(teacher=str(tmp_path / "missing"), prompts=str(tmp_path / "prompts.txt"),
                         out=str(tmp_path / "run"), **options)
    with pytest.raises(TrainingError, match=re.escape(message)):
        train(config)
    assert not (tmp_path / "run").exists()
