"""Two CPU processes (gloo) through ``accelerate launch``: FSDP2 against plain data parallelism on one teacher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
FSDP_CONFIG = REPO / "configs" / "accelerate_fsdp2.yaml"
DDP = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(launcher: list[str], run_args: list[str]) -> str:
    """``wadi-distill run`` on two processes; its stdout and stderr."""
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
                           "-m", "wadi_distill.cli", "run", "--quiet", *run_args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def check_fsdp2_matches_ddp(teacher: Path, tmp_path: Path, prompts: list[str], settings: str) -> None:
    """A 2-step LoRaD run (``settings``: TOML lines, the presets) under FSDP2 and under DDP: the base is sharded
    half and half, the adapters stay identical on both processes, move, and agree between the two runs."""
    from safetensors.torch import load_file

    from wadi_distill.config import load_config
    from wadi_distill.distill import attach_roles
    from wadi_distill.teacher import load_teacher

    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 2\nbatch_size = 1\ngenerator_rank = 2\nfake_rank = 2\nvalidate_every = 100\n"
                    f"record_digests = true\ngenerator_lr = 0.01\ncache_dir = {json.dumps(str(tmp_path / 'cache'))}\n"
                    + settings)
    common = ["--teacher", str(teacher), "--prompts", str(tmp_path / "prompts.txt"), "--config", str(toml)]
    output = launch(["--config_file", str(FSDP_CONFIG)], common + ["--out", str(tmp_path / "fsdp")])
    shares = re.findall(r"fsdp2: process (\d)/2 holds ([\d,]+) of ([\d,]+) base weights", output)
    assert sorted(int(r) for r, _, _ in shares) == [0, 1]
    assert all(abs(int(a.replace(",", "")) / int(b.replace(",", "")) - 0.5) < 0.01 for _, a, b in shares)
    launch(DDP, common + ["--out", str(tmp_path / "ddp")])
    ranks = [(tmp_path / "fsdp" / f"adapter-digests-rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(ranks[0]) == 2 and ranks[0] == ranks[1]
    config = load_config(toml, teacher=str(teacher), prompts=str(tmp_path / "prompts.txt"), out=str(tmp_path / "x"))
    roles, _ = attach_roles(load_teacher(str(teacher)), config)  # the adapters as initialised
    for role in ("generator", "fake"):
        init = {k: v.detach() for k, v in roles.named_parameters(role).items()}
        sharded, whole = (load_file(tmp_path / run / "checkpoints" / "step-0000002" / f"{role}.safetensors")
                          for run in ("fsdp", "ddp"))
        assert sharded.keys() == whole.keys() == init.keys()
        flat = {name: torch.cat([d[k].flatten() for k in sorted(d)]) for name, d in
                (("init", init), ("sharded", sharded), ("whole", whole))}
        moved = (flat["whole"] - flat["init"]).norm()
        assert moved > 0.1 and (flat["sharded"] - flat["whole"]).norm() < 1e-3 * moved, role
