"""SANA under two CPU processes (gloo, real ``accelerate launch``): FSDP2 shards the tiny real SanaPipeline's
transformer (its SanaTransformerBlocks, patch embedding and modulated norm, then the root) half and half; both
processes keep identical adapters, which train as under plain data parallelism (DDP); the frozen base comes out
the teacher bit for bit; and the sharded run's export is a one-step SanaPipeline that plain diffusers runs to
``sample`` of that run."""

import csv
import json
import math

import pytest
import torch

from tests.support.pipelines import tiny_sana_pipeline
from tests.support.tensors import relative_difference
from tests.support.two_process import check_fsdp2_matches_ddp

PROMPTS = ["a photo of a bag", "a photo of a shirt"]
SANA_PRESETS = 'generator_preset = "sana-generator"\nfake_preset = "sana-fake"\n'
SIZE = 32  # pixels: 16 latents x the DC-AE's factor 2


@pytest.mark.slow
def test_fsdp2_on_the_sana_teacher_shards_trains_like_ddp_and_exports(tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SanaPipeline

    from wadi_distill.export import export_run
    from wadi_distill.runs import load_one_step
    from wadi_distill.sampling import initial_noise, one_step_sample

    teacher = tiny_sana_pipeline(tmp_path / "pipe", flow_shift=3.0)
    # shares half and half, adapter digests equal on both ranks, FSDP2 == DDP on both roles (CFG pairs included:
    # the default [vsd] guidance, so the unconditional "" with its one-token mask goes through the shards too)
    check_fsdp2_matches_ddp(teacher, tmp_path, PROMPTS, SANA_PRESETS)
    fsdp = tmp_path / "fsdp"
    with open(fsdp / "metrics.csv") as metrics:
        rows = list(csv.DictReader(metrics))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["generator_loss"])) and math.isfinite(float(r["fake_loss"])) for r in rows)
    for rank in (0, 1):  # the whole base, gathered from the shards at the end, is the teacher bit for bit
        start, end = (line.split()[1] for line in (fsdp / f"base-digests-rank{rank}.txt").read_text().splitlines())
        assert start == end

    export = export_run(fsdp, tmp_path / "export")["pipeline"]
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    assert isinstance(pipe, SanaPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    run_model = load_one_step(fsdp)
    noise = initial_noise(run_model.teacher, len(PROMPTS), seed=0)
    with torch.no_grad():
        ours = one_step_sample(run_model.teacher, run_model.generator.eval(), noise,
                               run_model.teacher.encode(PROMPTS), run_model.vsd)
        theirs = pipe(PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                      output_type="latent").images
        plain = SanaPipeline.from_pretrained(teacher, local_files_only=True).transformer.eval()
        untrained = one_step_sample(run_model.teacher, plain, noise, run_model.teacher.encode(PROMPTS), run_model.vsd)
    assert relative_difference(theirs, ours) < 1e-5
    assert relative_difference(untrained, ours) > 1e-3  # the sharded training is what the export carries
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["pipeline"] == "SanaPipeline" and info["sigma_max"] == 1.0
