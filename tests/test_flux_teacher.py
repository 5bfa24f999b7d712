"""A FLUX.1-dev-style teacher (tiny real FluxPipeline, guidance-distilled transformer): loading, prompts through
its ``encode_prompt``, packed latents and image ids through its own helpers, the guidance input, sigmas with and
without dynamic shifting, the teacher's DDIM equal to the pipeline's sampler, and a few VSD steps."""

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from tests.support.pipelines import tiny_flux_pipeline
from tests.support.tensors import relative_difference
from wadi_distill import vsd
from wadi_distill.config import load_config
from wadi_distill.sampling import ddim, initial_noise
from wadi_distill.teacher import load_teacher
from wadi_distill.training.loop import train

PROMPTS = ["a photo of a bag", "a photo of a shirt"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", shift=3.0)


@pytest.fixture(scope="module")
def teacher(flux_folder):
    return load_teacher(flux_folder)


@pytest.fixture(scope="module")
def pipe(flux_folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(flux_folder, local_files_only=True)


def pipeline_latents(pipe, teacher, noise: torch.Tensor, steps: int, prompts=PROMPTS) -> torch.Tensor:
    """The FluxPipeline's latents from the same x_T, at the teacher's guidance input, unpacked to (B, C, H, W)."""
    size = teacher.sample_size
    packed = pipe._pack_latents(noise, *noise.shape)
    out = pipe(prompts, latents=packed, num_inference_steps=steps, guidance_scale=teacher.guidance,
               height=size * pipe.vae_scale_factor, width=size * pipe.vae_scale_factor, output_type="latent").images
    return pipe._unpack_latents(out, size * pipe.vae_scale_factor, size * pipe.vae_scale_factor, pipe.vae_scale_factor)


def test_the_flux_teacher_loads_with_its_geometry_guidance_and_sigmas(teacher):
    assert teacher.family == "flux" and teacher.prediction_type == "flow" and teacher.component == "transformer"
    assert teacher.latent_channels == 16 and teacher.sample_size == 8  # 64 packed channels; VAE 16 px / 2
    assert teacher.guidance == 3.5  # FluxPipeline's default guidance_scale
    unshifted = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(teacher.sigmas, vsd.shifted_sigma(unshifted, 3.0), atol=1e-6)
    assert teacher.sigmas[-1].item() == pytest.approx(1.0) and teacher.alphas_cumprod[-1].item() == 0


def test_flux_prompts_go_through_the_pipelines_encode_prompt(teacher, pipe):
    conditioning = teacher.encode(PROMPTS)
    with torch.no_grad():  # as the teacher encodes (autograd changes CPU attention kernels' rounding)
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None)
    assert torch.equal(conditioning.hidden_states, embeds) and embeds.shape == (2, 512, 32)
    assert torch.equal(conditioning.extra["pooled_projections"], pooled) and pooled.shape == (2, 32)
    assert torch.equal(conditioning.extra["txt_ids"][1], text_ids)
    assert torch.equal(conditioning.select(torch.tensor([1])).hidden_states, embeds[1:])


def test_flux_velocity_is_the_transformer_on_packed_latents_with_the_guidance_input(teacher, pipe):
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, 16, 8, 8, generator=generator) for _ in range(2))
    timesteps = torch.tensor([300, 900])
    sigma = teacher.sigmas[timesteps].float().view(2, 1, 1, 1)
    conditioning = teacher.encode(PROMPTS)
    with torch.no_grad():
        ours = teacher.network_output(teacher.denoiser, vsd.add_noise(x0, noise, teacher.alpha_bar(timesteps, x0)),
                                      timesteps, conditioning)
        noisy = pipe._pack_latents(vsd.flow_add_noise(x0, noise, sigma), 2, 16, 8, 8)
        ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None)

        def velocity(guidance):
            packed = pipe.transformer(hidden_states=noisy, timestep=sigma.flatten(),
                                      guidance=torch.full((2,), guidance), pooled_projections=pooled,
                                      encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                      return_dict=False)[0]
            return pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)

        theirs = velocity(3.5)
        assert ours.shape == (2, 16, 8, 8) and relative_difference(ours, theirs) < 1e-5
        assert relative_difference(velocity(1.0), theirs) > 1e-3  # the guidance input is read


def test_flux_teacher_ddim_is_the_pipelines_sampler(teacher, pipe):
    """Trailing DDIM (timesteps 999, 499: sigmas 1 and 0.5 before the shift) is FluxPipeline's default 2-step
    Euler (sigmas linspace(1, 1/2, 2) shifted); one step is x - v at sigma = 1."""
    noise = initial_noise(teacher, 2, seed=1)
    conditioning, null = teacher.encode(PROMPTS), teacher.encode([""])
    for steps in (1, 2):
        ours = ddim(teacher, teacher.denoiser, noise, conditioning, null, steps=steps)  # no CFG pair: scale 1
        assert relative_difference(ours, pipeline_latents(pipe, teacher, noise, steps)) < 1e-5


def test_dynamic_shifting_gives_the_pipelines_sigmas_at_the_teachers_size(flux_folder, tmp_path):
    """FLUX.1-dev's scheduler shifts with the resolution: at the teacher's fixed size the training sigmas are the
    ones FluxPipeline uses there (mu of (8 / 2)^2 = 16 tokens), so its DDIM still equals the pipeline."""
    from diffusers import FluxPipeline

    folder = tmp_path / "dynamic"
    shutil.copytree(flux_folder, folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "use_dynamic_shifting": True,
                                          "base_shift": 0.5, "max_shift": 1.15}))
    teacher = load_teacher(folder)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)
    unshifted = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert torch.allclose(teacher.sigmas, vsd.shifted_sigma(unshifted, math.exp(mu)), atol=1e-9)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    noise = initial_noise(teacher, 2, seed=2)
    ours = ddim(teacher, teacher.denoiser, noise, teacher.encode(PROMPTS), teacher.encode([""]), steps=2)
    assert relative_difference(ours, pipeline_latents(pipe, teacher, noise, 2)) < 1e-5
    from wadi_distill.one_step_pipeline import one_step_flow_scheduler

    one_step = one_step_flow_scheduler(dict(pipe.scheduler.config), 1.0, dynamic=True)  # what a FLUX export gets
    one_step.set_timesteps(sigmas=[1.0], mu=0.9)  # as FluxPipeline calls it, mu from the image size
    assert one_step.sigmas.tolist() == [1.0, 0.0] and one_step.config.use_dynamic_shifting


@pytest.fixture(scope="module")
def flux_run(flux_folder, tmp_path_factory):
    """A 3-step LoRaD run (flux presets) on the guidance-distilled teacher, no CFG pair ([vsd] guidance 1)."""
    root = tmp_path_factory.mktemp("flux-run")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = load_config(teacher=str(flux_folder), prompts=str(root / "prompts.txt"), out=str(root / "run"),
                         steps=3, batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(root / "cache"),
                         generator_preset="flux-generator", fake_preset="flux-fake", generator_lr=1e-2,
                         validate_every=100, vsd={"guidance_real": 1.0, "guidance_fake": 1.0})
    return root / "run", train(config, progress=False)


def test_a_few_vsd_steps_on_the_flux_teacher(flux_run):
    import csv

    run, summary = flux_run
    assert summary["steps"] == 3 and summary["skipped"] == 0
    assert summary["trainable"]["generator"] > summary["trainable"]["fake"] > 0
    with open(run / "metrics.csv") as metrics:
        rows = list(csv.DictReader(metrics))
    assert len(rows) == 3 and all(math.isfinite(float(r["generator_loss"])) and math.isfinite(float(r["fake_loss"]))
                                  for r in rows)


def sample_pngs(source, out, *args):
    import numpy as np
    from PIL import Image

    from wadi_distill.cli import app

    result = CliRunner().invoke(app, ["sample", str(source), *sum((["-p", p] for p in PROMPTS), []), "--n", "1",
                                      "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))]).astype(int)


def test_the_flux_export_is_a_one_step_flux_pipeline_equal_to_sample(flux_run, tmp_path):
    """``export`` writes a FluxPipeline whose one step (sigmas [1, 0]) at the teacher's guidance input reproduces
    ``sample`` of the run and of the export; ``sample --guidance 2.5`` is its ``true_cfg_scale=2.5`` against ""."""
    import numpy as np
    from diffusers import DiffusionPipeline, FluxPipeline

    from wadi_distill.export import export_run
    from wadi_distill.runs import load_one_step
    from wadi_distill.sampling import one_step_sample

    run, _ = flux_run
    export = export_run(run, tmp_path / "export")["pipeline"]
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["pipeline"] == "FluxPipeline" and info["one_step_call"].endswith("guidance_scale=3.5)")
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    assert isinstance(pipe, FluxPipeline) and pipe.scheduler.config.shift == 3.0
    model = load_one_step(export)
    noise = initial_noise(model.teacher, len(PROMPTS), seed=0)
    with torch.no_grad():
        ours = one_step_sample(model.teacher, model.generator.eval(), noise, model.teacher.encode(PROMPTS), model.vsd)
    assert relative_difference(pipeline_latents(pipe, model.teacher, noise, 1), ours) < 1e-5
    with torch.no_grad():
        run_model = load_one_step(run)
        from_run = one_step_sample(run_model.teacher, run_model.generator.eval(), noise,
                                   run_model.teacher.encode(PROMPTS), run_model.vsd)
    assert relative_difference(from_run, ours) < 1e-4
    pngs = sample_pngs(export, tmp_path / "samples")
    size = 16  # pixels: 8 latents x the VAE's factor 2
    images = pipe(PROMPTS, latents=pipe._pack_latents(noise, *noise.shape), num_inference_steps=1, height=size,
                  width=size, guidance_scale=3.5, output_type="np").images
    assert np.abs((images * 255).round().astype(int) - pngs).max() <= 1 and pngs.std() > 5
    assert np.abs(sample_pngs(run, tmp_path / "from-run") - pngs).max() <= 1
    guided = sample_pngs(export, tmp_path / "guided", "--guidance", "2.5")
    images = pipe(PROMPTS, latents=pipe._pack_latents(noise, *noise.shape), num_inference_steps=1, height=size,
                  width=size, guidance_scale=3.5, true_cfg_scale=2.5, negative_prompt="", output_type="np").images
    assert np.abs((images * 255).round().astype(int) - guided).max() <= 1 and np.abs(guided - pngs).max() > 1


@pytest.mark.slow
def test_fsdp2_on_the_flux_teacher_shards_and_trains_like_ddp(flux_folder, tmp_path):
    """Two CPU processes: FSDP2 shards the FLUX base (double and single blocks, then the root) half and half,
    the adapters stay identical on both processes and train as under plain data parallelism."""
    from tests.support.two_process import check_fsdp2_matches_ddp

    check_fsdp2_matches_ddp(flux_folder, tmp_path, PROMPTS, 'generator_preset = "flux-generator"\n'
                            'fake_preset = "flux-fake"\n[vsd]\nguidance_real = 1.0\nguidance_fake = 1.0\n')


# --- the guidance input as a run setting: RunConfig flux_guidance ------------------------------------------------


def test_flux_guidance_replaces_the_pipelines_default_guidance_input(flux_folder, pipe):
    teacher = load_teacher(flux_folder, flux_guidance=2.0)
    assert teacher.guidance == 2.0
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 16, 8, 8, generator=generator)
    timesteps = torch.tensor([400, 800])
    sigma = teacher.sigmas[timesteps].float()
    conditioning = teacher.encode(PROMPTS)
    with torch.no_grad():
        ours = teacher.network_output(teacher.denoiser, noisy, timesteps, conditioning)
        packed = pipe._pack_latents(noisy * vsd.flow_scale(sigma).view(2, 1, 1, 1), 2, 16, 8, 8)
        ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)

        def velocity(guidance):
            out = pipe.transformer(hidden_states=packed, timestep=sigma, guidance=torch.full((2,), guidance),
                                   pooled_projections=conditioning.extra["pooled_projections"],
                                   encoder_hidden_states=conditioning.hidden_states,
                                   txt_ids=conditioning.extra["txt_ids"][0], img_ids=ids, return_dict=False)[0]
            return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)

        assert relative_difference(ours, velocity(2.0)) < 1e-5 and relative_difference(ours, velocity(3.5)) > 1e-3


GUIDANCE_TOML = [("a-string", 'flux_guidance = "high"'), ("zero", "flux_guidance = 0"),
                 ("negative", "flux_guidance = -1.5"), ("nan", "flux_guidance = nan"),
                 ("a-bool", "flux_guidance = true")]


@pytest.mark.parametrize("text", [t for _, t in GUIDANCE_TOML], ids=[i for i, _ in GUIDANCE_TOML])
def test_run_refuses_a_bad_flux_guidance(flux_folder, tmp_path, text):
    from tests.support.hostile import check_refused, snapshot
    from wadi_distill.cli import app

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "run.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n{text}\n')
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["run", "--teacher", str(flux_folder), "--prompts", str(tmp_path / "prompts.txt"),
                                      "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.toml"), "-q"])
    check_refused(result, tmp_path, before, "flux_guidance")


def test_run_refuses_flux_guidance_for_a_teacher_without_a_guidance_input(tmp_path):
    """FLUX.1-schnell's layout (no guidance_embeds) takes no guidance input: one line, no run folder."""
    from tests.support.hostile import check_refused, snapshot
    from wadi_distill.cli import app

    schnell = tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "run.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\nflux_guidance = 2.0\n'
                                       'generator_preset = "flux-generator"\nfake_preset = "flux-fake"\n')
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["run", "--teacher", str(schnell), "--prompts", str(tmp_path / "prompts.txt"),
                                      "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.toml"), "-q"])
    check_refused(result, tmp_path, before, "guidance_embeds")


def test_run_option_flux_guidance_is_the_toml_key(flux_folder, tmp_path):
    """`run --flux-guidance G` wins over the TOML's flux_guidance and is recorded in the run's config.json."""
    import json

    from wadi_distill.cli import app

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "run.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\nflux_guidance = 2.0\nsteps = 1\n'
                                       'batch_size = 2\ngenerator_rank = 2\nfake_rank = 2\n'
                                       'generator_preset = "flux-generator"\nfake_preset = "flux-fake"\n')
    result = CliRunner().invoke(app, ["run", "--teacher", str(flux_folder), "--prompts", str(tmp_path / "prompts.txt"),
                                      "--out", str(tmp_path / "run"), "--config", str(tmp_path / "run.toml"),
                                      "--flux-guidance", "4.5", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["flux_guidance"] == 4.5
    refused = CliRunner().invoke(app, ["run", "--teacher", str(flux_folder), "--prompts", str(tmp_path / "prompts.txt"),
                                       "--out", str(tmp_path / "run2"), "--config", str(tmp_path / "run.toml"),
                                       "--flux-guidance", "-1", "-q"])
    assert refused.exit_code == 2 and refused.output.startswith("error:") and "flux_guidance" in refused.output
    assert not (tmp_path / "run2").exists()


def test_a_run_at_its_own_flux_guidance_samples_and_exports_at_it(flux_folder, tmp_path):
    """A run with ``flux_guidance = 2`` records it (config.json); sample of the run and of the export use it, and
    the export's FluxPipeline reproduces them when called with ``guidance_scale=2`` (what wadi_one_step.json says),
    not at its default 3.5."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from wadi_distill.export import export_run
    from wadi_distill.runs import load_one_step

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "run.toml").write_text("flux_guidance = 2\n")
    config = load_config(tmp_path / "run.toml", teacher=str(flux_folder), prompts=str(tmp_path / "prompts.txt"),
                         out=str(tmp_path / "run"), steps=2, batch_size=2, generator_rank=2, fake_rank=2,
                         cache_dir=str(tmp_path / "cache"), generator_preset="flux-generator", fake_preset="flux-fake",
                         generator_lr=1e-2, validate_every=100, vsd={"guidance_real": 1.0, "guidance_fake": 1.0})
    assert config.flux_guidance == 2.0
    train(config, progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["flux_guidance"] == 2.0
    assert load_one_step(run).teacher.guidance == 2.0
    export = export_run(run, tmp_path / "export")["pipeline"]
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["flux_guidance"] == 2.0 and info["one_step_call"].endswith("guidance_scale=2)")
    assert load_one_step(export).teacher.guidance == 2.0
    pngs = sample_pngs(export, tmp_path / "samples")
    assert np.abs(sample_pngs(run, tmp_path / "from-run") - pngs).max() <= 1
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    noise = initial_noise(load_one_step(export).teacher, len(PROMPTS), seed=0)

    def images(guidance):
        out = pipe(PROMPTS, latents=pipe._pack_latents(noise, *noise.shape), num_inference_steps=1, height=16,
                   width=16, guidance_scale=guidance, output_type="np").images
        return (out * 255).round().astype(int)

    assert np.abs(images(2.0) - pngs).max() <= 1 and np.abs(images(3.5) - pngs).max() > 1


@pytest.mark.parametrize("recorded", ["high", -1.0, True])
def test_a_bad_recorded_flux_guidance_is_refused_in_one_line(flux_run, tmp_path, recorded):
    from wadi_distill.cli import app

    run, _ = flux_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "flux_guidance": recorded}))
    result = CliRunner().invoke(app, ["sample", str(copy), "-p", "x", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "flux_guidance" in result.stderr
    assert not (tmp_path / "s").exists()
