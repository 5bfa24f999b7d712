"""A SANA teacher (tiny real SanaPipeline: Gemma2 text encoder, DC-AE, the DPM-Solver flow scheduler SANA ships):
loading, prompts through its ``encode_prompt`` with the complex human instruction and the attention mask, the
velocity at 1000 sigma, the teacher's DDIM equal to the pipeline's Euler sampler, the LoRaD presets on its layers,
a few VSD steps, and the export as a one-step SanaPipeline equal to ``sample``."""

import inspect
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.support.pipelines import tiny_sana_pipeline
from tests.support.tensors import relative_difference
from wadi_distill import vsd
from wadi_distill.config import load_config
from wadi_distill.sampling import ddim, initial_noise
from wadi_distill.teacher import load_teacher
from wadi_distill.training.loop import train

PROMPTS = ["a photo of a bag", "a photo of a shirt"]
SIZE = 32  # pixels: 16 latents x the DC-AE's factor 2


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    return tiny_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipe", flow_shift=3.0)


@pytest.fixture(scope="module")
def teacher(sana_folder):
    return load_teacher(sana_folder)


@pytest.fixture(scope="module")
def pipe(sana_folder):
    from diffusers import SanaPipeline

    return SanaPipeline.from_pretrained(sana_folder, local_files_only=True)


def instruction(pipe) -> list[str]:
    return inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default


def euler_pipe(pipe):
    """The same SanaPipeline with the FlowMatchEulerDiscreteScheduler of the teacher's sigmas (shift = flow_shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=pipe.scheduler.config.flow_shift)
    return SanaPipeline(**{**pipe.components, "scheduler": scheduler})


def test_the_sana_teacher_loads_with_its_geometry_and_shifted_sigmas(teacher, pipe):
    assert teacher.family == "sana" and teacher.prediction_type == "flow" and teacher.component == "transformer"
    assert teacher.latent_channels == 8 and teacher.sample_size == 16 and teacher.guidance is None
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.use_flow_sigmas
    unshifted = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(teacher.sigmas, vsd.shifted_sigma(unshifted, 3.0), atol=1e-9)
    assert teacher.sigmas[-1].item() == 1.0 and teacher.alphas_cumprod[-1].item() == 0
    # the shipped DPM-Solver's own flow sigmas are these: its 4-step schedule lies on them
    pipe.scheduler.set_timesteps(4)
    unshifted = 1 - torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)  # 0 ... 1 - 1/N
    assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), vsd.shifted_sigma(unshifted, 3.0).flip(0)[:-1],
                          atol=1e-6)


def test_sana_prompts_go_through_encode_prompt_with_the_instruction_and_mask(teacher, pipe):
    conditioning = teacher.encode([PROMPTS[0], "", PROMPTS[1]])
    with torch.no_grad():
        embeds, mask, null, null_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                           complex_human_instruction=instruction(pipe))
    assert embeds.shape == (2, 300, 32) and mask.shape == (2, 300)
    assert torch.equal(conditioning.hidden_states[[0, 2]], embeds)
    assert torch.equal(conditioning.extra["encoder_attention_mask"][[0, 2]], mask)
    # "" is what the pipeline guides against: its negative prompt, encoded without the instruction
    assert torch.equal(conditioning.hidden_states[1], null[0])
    assert torch.equal(conditioning.extra["encoder_attention_mask"][1], null_mask[0]) and null_mask[0].sum() == 1
    with torch.no_grad():
        plain, _, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert not torch.equal(plain, embeds)  # the instruction is part of the conditioning
    assert torch.equal(teacher.unconditional(2).hidden_states[1], null[0])


def test_sana_velocity_is_the_transformer_at_1000_sigma_with_the_mask(teacher, pipe):
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, 8, 16, 16, generator=generator) for _ in range(2))
    timesteps = torch.tensor([300, 900])
    sigma = teacher.sigmas[timesteps].float().view(2, 1, 1, 1)
    conditioning = teacher.encode(PROMPTS)
    embeds, mask = conditioning.hidden_states, conditioning.extra["encoder_attention_mask"]
    with torch.no_grad():
        ours = teacher.network_output(teacher.denoiser, vsd.add_noise(x0, noise, teacher.alpha_bar(timesteps, x0)),
                                      timesteps, conditioning)

        def velocity(attention_mask):
            return pipe.transformer(vsd.flow_add_noise(x0, noise, sigma), encoder_hidden_states=embeds,
                                    encoder_attention_mask=attention_mask, timestep=1000 * sigma.flatten(),
                                    return_dict=False)[0]

        theirs = velocity(mask)
        assert ours.shape == (2, 8, 16, 16) and relative_difference(ours, theirs) < 1e-5
        assert relative_difference(velocity(torch.ones_like(mask)), theirs) > 1e-3  # the mask is read


def test_sana_teacher_ddim_is_the_pipelines_euler_sampler(teacher, pipe):
    """Trailing DDIM at timesteps 999, 499 is SanaPipeline's Euler on sigmas (1, 0.5) shifted; guided by 2 against
    the pipeline's negative prompt as the pipeline guides."""
    euler = euler_pipe(pipe)
    noise = initial_noise(teacher, 2, seed=1)
    conditioning, null = teacher.encode(PROMPTS), teacher.encode([""])
    for steps, guidance in ((1, 1.0), (2, 1.0), (2, 2.0)):
        ours = ddim(teacher, teacher.denoiser, noise, conditioning, null, steps=steps, guidance_scale=guidance)
        theirs = euler(PROMPTS, latents=noise, sigmas=[1.0, 0.5][:steps], guidance_scale=guidance, height=SIZE,
                       width=SIZE, output_type="latent").images
        assert relative_difference(ours, theirs) < 1e-5


def test_the_shipped_dpm_solver_cannot_run_one_step_from_sigma_max(pipe):
    """Why the export changes the scheduler: DPM-Solver's flow sigmas start at shift(1 - 1/N) at timestep 999."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    assert scheduler.sigmas[0].item() == pytest.approx(3 * 0.999 / (1 + 2 * 0.999)) and scheduler.sigmas[0] < 1
    assert scheduler.timesteps.tolist() == [999]


def test_the_sana_presets_adapt_the_blocks_linear_and_pointwise_layers(teacher):
    from wadi_distill.lorad.targets import resolve_preset

    generator = resolve_preset(teacher.denoiser, "sana-generator")
    fake = resolve_preset(teacher.denoiser, "sana-fake")
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point"}
    expected = {f"transformer_blocks.{b}.{name}" for b in (0, 1) for name in per_block}
    assert set(generator) == expected and set(fake) == expected  # SANA's blocks hold attention and GLUMBConv only
    assert generator[next(iter(expected))] == 128 and fake[next(iter(expected))] == 32


@pytest.fixture(scope="module")
def sana_run(sana_folder, tmp_path_factory):
    """A 3-step LoRaD run with the sana presets."""
    root = tmp_path_factory.mktemp("sana-run")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = load_config(teacher=str(sana_folder), prompts=str(root / "prompts.txt"), out=str(root / "run"),
                         steps=3, batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(root / "cache"),
                         generator_preset="sana-generator", fake_preset="sana-fake", generator_lr=1e-2,
                         validate_every=100)
    return root / "run", train(config, progress=False)


def test_a_few_vsd_steps_on_the_sana_teacher(sana_run):
    import csv
    import math

    run, summary = sana_run
    assert summary["steps"] == 3 and summary["skipped"] == 0
    assert summary["trainable"]["generator"] >= summary["trainable"]["fake"] > 0
    with open(run / "metrics.csv") as metrics:
        rows = list(csv.DictReader(metrics))
    assert len(rows) == 3 and all(math.isfinite(float(r["generator_loss"])) and math.isfinite(float(r["fake_loss"]))
                                  for r in rows)


def sample_pngs(source, out, *args):
    from PIL import Image

    from wadi_distill.cli import app

    result = CliRunner().invoke(app, ["sample", str(source), *sum((["-p", p] for p in PROMPTS), []), "--n", "1",
                                      "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))]).astype(int)


def test_the_sana_export_is_a_one_step_sana_pipeline_equal_to_sample(sana_run, tmp_path):
    """``export`` writes a SanaPipeline with a FlowMatchEulerDiscreteScheduler (shift = the teacher's flow_shift)
    whose one step (sigmas [1, 0]) reproduces ``sample`` of the run and of the export, guided (CFG against the
    pipeline's negative prompt) or not."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SanaPipeline

    from wadi_distill.export import export_run
    from wadi_distill.runs import load_one_step
    from wadi_distill.sampling import one_step_sample

    run, _ = sana_run
    export = export_run(run, tmp_path / "export")["pipeline"]
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["pipeline"] == "SanaPipeline" and info["prediction_type"] == "flow" and info["sigma_max"] == 1.0
    assert info["one_step_call"] == "pipe(prompt, num_inference_steps=1, guidance_scale=0.0)"
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    assert isinstance(pipe, SanaPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0
    model = load_one_step(export)
    noise = initial_noise(model.teacher, len(PROMPTS), seed=0)
    with torch.no_grad():
        ours = one_step_sample(model.teacher, model.generator.eval(), noise, model.teacher.encode(PROMPTS), model.vsd)
        theirs = pipe(PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                      output_type="latent").images
    assert relative_difference(theirs, ours) < 1e-5
    pngs = sample_pngs(export, tmp_path / "samples")
    images = pipe(PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                  output_type="np").images
    assert np.abs((images * 255).round().astype(int) - pngs).max() <= 1 and pngs.std() > 5
    assert np.abs(sample_pngs(run, tmp_path / "from-run") - pngs).max() <= 1
    guided = sample_pngs(export, tmp_path / "guided", "--guidance", "2.5")
    images = pipe(PROMPTS, latents=noise, num_inference_steps=1, guidance_scale=2.5, height=SIZE, width=SIZE,
                  output_type="np").images
    assert np.abs((images * 255).round().astype(int) - guided).max() <= 1 and np.abs(guided - pngs).max() > 1


def test_the_lora_of_a_sana_run_loads_in_plain_diffusers(sana_run, sana_folder, tmp_path):
    """``export --lora-rank`` on the SANA run: the change of its Linears and 1x1 convolutions as a peft LoRA file that
    ``SanaPipeline.load_lora_weights`` loads and fuses into the teacher; at full rank, the exported transformer."""
    from diffusers import SanaPipeline, SanaTransformer2DModel

    from wadi_distill.cli import app

    run, _ = sana_run
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "export"), "--lora-rank", "80"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export" / "lora" / "lora_report.json").read_text())
    assert report["total_relative_error"] < 1e-5
    pipe = SanaPipeline.from_pretrained(sana_folder, local_files_only=True)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(tmp_path / "export" / "lora")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = SanaTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer").state_dict()
    loaded = pipe.transformer.state_dict()
    assert merged.keys() == loaded.keys()
    assert max((merged[k] - loaded[k]).abs().max().item() for k in merged) < 1e-5
    changed = {k for k in merged if (original[k] - loaded[k]).abs().max() > 1e-4}
    assert {"transformer_blocks.0.ff.conv_inverted.weight", "transformer_blocks.1.attn2.to_q.weight"} <= changed


def test_a_sana_pipeline_without_a_flow_scheduler_is_refused_in_one_line(sana_folder, tmp_path):
    """SANA-Sprint's SCMScheduler (TrigFlow) or any non-flow scheduler: no SANA teacher, one line, nothing written."""
    import shutil

    from wadi_distill.cli import app

    folder = tmp_path / "not-flow"
    shutil.copytree(sana_folder, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_flow_sigmas": False,
                                  "prediction_type": "epsilon"}))
    (tmp_path / "prompts.txt").write_text("a bag\n")
    result = CliRunner().invoke(app, ["run", "--teacher", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                                      "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "flow scheduler" in result.stderr
    assert not (tmp_path / "run").exists()
