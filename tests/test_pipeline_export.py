"""The export as a complete one-step diffusers pipeline (issue 15, part 1): plain diffusers loads it
(``DiffusionPipeline`` and ``AutoPipelineForText2Image``, no project code) and its one-step images equal
``wadi-distill sample``'s to one grey level, for SD (epsilon and v), SDXL, PixArt and the embedded teacher;
it holds no absolute path and works after it was moved and its teacher is gone."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wadi_distill.cli import app
from wadi_distill.config import load_config
from wadi_distill.export import export_run
from wadi_distill.training.loop import train

from tests.support.tensors import relative_difference

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["sd-epsilon", "sd-v", "sdxl", "pixart", "embedded"]
PROMPTS = ["a photo of a bag", "a photo of a shirt"]
COUNT = 2  # images per prompt


def teacher_folder(family: str, root: Path) -> Path | None:
    """The tiny teacher pipeline of ``family`` (None: the embedded teacher)."""
    from tests.support.pipelines import tiny_pixart_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

    makers = {"sd-epsilon": lambda f: tiny_sd_pipeline(f), "sd-v": lambda f: tiny_sd_pipeline(f, "v_prediction"),
              "sdxl": tiny_sdxl_pipeline, "pixart": tiny_pixart_pipeline}
    return makers[family](root / "pipe") if family in makers else None


def run_options(family: str, root: Path) -> dict:
    """A 2-step LoRaD run on the family's teacher (the embedded teacher: its own defaults and prompts)."""
    options = dict(out=str(root / "run"), steps=2, batch_size=2, cache_dir=str(root / "cache"), generator_lr=1e-2,
                   checkpoint_every=2, validate_every=100)
    folder = teacher_folder(family, root)
    if folder is not None:
        (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        options.update(teacher=str(folder), prompts=str(root / "prompts.txt"), generator_rank=2, fake_rank=2)
    if family == "pixart":
        options.update(generator_preset="pixart-generator", fake_preset="pixart-fake")
    return options


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(family, run folder, teacher folder or None, the export moved away from where it was written)."""
    root = tmp_path_factory.mktemp(request.param)
    config = load_config(**run_options(request.param, root))
    train(config, progress=False)
    export_run(config.out, root / "export")
    moved = tmp_path_factory.mktemp("moved") / "one-step"
    shutil.move(root / "export", moved)
    return request.param, Path(config.out), teacher_folder_of(config), moved


def teacher_folder_of(config) -> Path | None:
    from wadi_distill import embedded

    return None if Path(config.teacher) == embedded.teacher_path() else Path(config.teacher)


@contextlib.contextmanager
def teacher_away(teacher: Path | None):
    """The teacher folder renamed while the block runs: what the export reads must be its own."""
    if teacher is None:  # the embedded teacher stays (the path check below covers it)
        yield
        return
    away = teacher.with_name(teacher.name + "-away")
    teacher.rename(away)
    try:
        yield
    finally:
        away.rename(teacher)


def call_options(family: str) -> dict:
    """What a user passes for one step: no CFG; PixArt: our tiny transformer is no binned resolution, and
    prompts are not cleaned (beautifulsoup/ftfy are not installed here; our encoder does not clean either)."""
    extra = {"use_resolution_binning": False, "clean_caption": False} if family == "pixart" else {}
    return {"num_inference_steps": 1, "guidance_scale": 0.0, **extra}


def sample_pngs(source: Path, out: Path, *args: str) -> np.ndarray:
    """``wadi-distill sample``'s images (N, H, W, 3) uint8, in prompt-major order."""
    result = CliRunner().invoke(app, ["sample", str(source), *sum((["-p", p] for p in PROMPTS), []),
                                      "--n", str(COUNT), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))]).astype(int)


def as_rgb(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB")) for image in images]).astype(int)


def pipeline_inputs(export: Path):
    """(prompts, the initial latents ``sample`` uses): the same x_T for both."""
    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise

    prompts = [p for p in PROMPTS for _ in range(COUNT)]
    return prompts, initial_noise(load_export(export).teacher, len(prompts), seed=0)


@torch.no_grad()
def project_latents(export: Path, noise: torch.Tensor, prompts: list[str], guidance: float = 1.0) -> torch.Tensor:
    from wadi_distill.runs import load_export
    from wadi_distill.sampling import one_step_sample

    model = load_export(export)
    return one_step_sample(model.teacher, model.generator.eval(), noise, model.teacher.encode(prompts), model.vsd,
                           guidance)


def test_plain_diffusers_one_step_equals_sample(exported, tmp_path):
    from diffusers import AutoPipelineForText2Image, DDIMScheduler, DiffusionPipeline

    family, _, teacher, export = exported
    prompts, noise = pipeline_inputs(export)
    with teacher_away(teacher):
        ours = sample_pngs(export, tmp_path / "samples")
        auto = AutoPipelineForText2Image.from_pretrained(export, use_safetensors=True)
        plain = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    assert type(auto) is type(plain) and isinstance(plain.scheduler, DDIMScheduler)
    for pipe in (auto, plain):
        images = pipe(prompts, latents=noise.clone(), output_type="pil", **call_options(family)).images
        assert np.abs(as_rgb(images) - ours).max() <= 1
    latents = plain(prompts, latents=noise.clone(), output_type="latent", **call_options(family)).images
    assert relative_difference(latents, project_latents(export, noise, prompts)) < 1e-5
    assert ours.std() > 5  # images, not a constant


def test_the_export_records_no_absolute_path(exported, tmp_path_factory):
    family, run, teacher, export = exported
    forbidden = {str(tmp_path_factory.getbasetemp()), str(REPO), str(run), str(teacher)}
    for path in export.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [f for f in forbidden if f.encode() in data], path
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["teacher"] == ("embedded" if family == "embedded" else "pipe")
    assert info["timestep"] == 999 and info["alpha_T"] == info["schedule_alpha_T"]


@pytest.mark.parametrize("exported", ["sd-epsilon"], indirect=True)
def test_layout_model_folder_single_file_adapter(exported):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    _, _, _, export = exported
    root = UNet2DConditionModel.from_pretrained(export).state_dict()  # the model folder exports always were
    inside = UNet2DConditionModel.from_pretrained(export / "unet").state_dict()
    single = load_file(export / "one_step.safetensors")
    assert root.keys() == inside.keys() == single.keys()
    assert all(torch.equal(root[k], inside[k]) and torch.equal(root[k], single[k]) for k in root)
    assert (export / "generator_adapter.safetensors").is_file()


@pytest.mark.parametrize("exported", ["sd-epsilon"], indirect=True)
def test_which_scheduler_runs_the_generator(exported):
    """Trailing DDIM (exported) is exact; LCM agrees to ~1e-10; leading DDIM (the default) runs at t = 1."""
    from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler

    family, _, _, export = exported
    prompts, noise = pipeline_inputs(export)
    expected = project_latents(export, noise, prompts)
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    config = pipe.scheduler.config

    def latents(scheduler):
        pipe.scheduler = scheduler
        return pipe(prompts, latents=noise.clone(), output_type="latent", **call_options(family)).images

    assert relative_difference(latents(DDIMScheduler.from_config(config)), expected) == 0
    assert relative_difference(latents(LCMScheduler.from_config(config)), expected) < 1e-6
    assert relative_difference(latents(DDIMScheduler.from_config(config, timestep_spacing="leading")), expected) > 0.1
    assert pipe.scheduler.timesteps.tolist() == [1]


def run_with_alpha(run: Path, folder: Path, alpha_T: float) -> Path:
    """A copy of ``run`` whose configuration sets ``[vsd] alpha_T``."""
    shutil.copytree(run, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vsd"]["alpha_T"] = alpha_T
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("exported", ["sd-epsilon"], indirect=True)
def test_a_runs_own_alpha_T_ends_the_exported_schedule(exported, tmp_path):
    """The published 0.0047 on SD's schedule (own last value 0.00466): only the last beta changes."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    family, run, _, _ = exported
    export = export_run(run_with_alpha(run, tmp_path / "run", 0.0047), tmp_path / "export")["pipeline"]
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    teacher = DDPMScheduler.from_pretrained(run.parent / "pipe", subfolder="scheduler").alphas_cumprod
    assert abs(pipe.scheduler.alphas_cumprod[-1].item() - 0.0047) < 1e-9
    assert torch.equal(pipe.scheduler.alphas_cumprod[:-1], teacher[:-1])
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["alpha_T"] == 0.0047 and abs(info["schedule_alpha_T"] - 0.00466) < 1e-5
    prompts, noise = pipeline_inputs(export)
    ours = sample_pngs(export, tmp_path / "samples")
    images = pipe(prompts, latents=noise.clone(), output_type="pil", **call_options(family)).images
    assert np.abs(as_rgb(images) - ours).max() <= 1
    latents = pipe(prompts, latents=noise.clone(), output_type="latent", **call_options(family)).images
    assert relative_difference(latents, project_latents(export, noise, prompts)) < 1e-5


@pytest.mark.parametrize("exported", ["sd-epsilon"], indirect=True)
def test_an_alpha_T_above_the_teachers_a_at_T_minus_2_is_held(exported, tmp_path):
    """a_T = 0.5 (as 0.0047 on PixArt's schedule): no last beta ends the teacher's schedule there, so the
    schedule holds a_T from where the teacher's a falls below it; one step is still the generator's."""
    family, run, _, _ = exported
    export = export_run(run_with_alpha(run, tmp_path / "run", 0.5), tmp_path / "export")["pipeline"]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    alphas = pipe.scheduler.alphas_cumprod
    assert abs(alphas[-1].item() - 0.5) < 1e-6 and abs(alphas[-2].item() - 0.5) < 1e-6 and alphas[0] > 0.99
    prompts, noise = pipeline_inputs(export)
    ours = sample_pngs(export, tmp_path / "sample")
    images = pipe(prompts, latents=noise.clone(), output_type="pil", **call_options(family)).images
    assert np.abs(as_rgb(images) - ours).max() <= 1


@pytest.mark.parametrize("exported", ["sd-epsilon"], indirect=True)
def test_an_alpha_T_outside_the_teachers_range_is_refused(exported, tmp_path):
    from tests.support.hostile import snapshot

    _, run, _, _ = exported
    copy = run_with_alpha(run, tmp_path / "run", 0.9995)  # above the schedule's first a, 0.99915
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["export", str(copy), "--out", str(tmp_path / "export")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "alpha_T = 0.9995" in result.stderr and "Traceback" not in result.output
    assert snapshot(tmp_path) == before and not (tmp_path / "export").exists()


@pytest.mark.parametrize("exported", ["sd-epsilon", "sdxl"], indirect=True)
def test_sample_guidance_equals_the_pipelines(exported, tmp_path):
    """``sample --guidance G`` is diffusers' ``guidance_scale=G``: <= 1 one conditional pass, > 1 CFG (SDXL:
    against zeros, as its pipeline's ``force_zeros_for_empty_prompt``)."""
    from diffusers import DiffusionPipeline

    family, _, _, export = exported
    prompts, noise = pipeline_inputs(export)
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    guided = sample_pngs(export, tmp_path / "guided", "--guidance", "2.5")
    images = pipe(prompts, latents=noise.clone(), output_type="pil", **{**call_options(family), "guidance_scale": 2.5})
    assert np.abs(as_rgb(images.images) - guided).max() <= 1
    default = sample_pngs(export, tmp_path / "default")
    assert np.array_equal(sample_pngs(export, tmp_path / "zero", "--guidance", "0"), default)
    assert np.abs(guided - default).max() > 1


@pytest.mark.parametrize("exported", ["sd-epsilon"], indirect=True)
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_guidance_is_one_error_line(exported, tmp_path, value):
    _, _, _, export = exported
    result = CliRunner().invoke(app, ["sample", str(export), "-p", "x", "--guidance", value,
                                      "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "guidance" in result.stderr and not (tmp_path / "s").exists()


@pytest.mark.parametrize("exported", ["sd-epsilon", "embedded"], indirect=True)
def test_a_model_folder_with_the_info_alone_reads_its_recorded_teacher(exported, tmp_path):
    """A model folder beside a copied ``wadi_one_step.json`` (an export of before; a swap of an export, as
    ``reproduce`` writes): the denoiser is its own, the text encoder and VAE the recorded teacher's."""
    from wadi_distill.runs import load_one_step

    family, _, teacher, export = exported
    folder = tmp_path / "model-only"
    folder.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "wadi_one_step.json"):
        shutil.copy(export / name, folder / name)
    info = json.loads((folder / "wadi_one_step.json").read_text())
    if teacher is not None:  # an export of before recorded the teacher's absolute path
        (folder / "wadi_one_step.json").write_text(json.dumps({**info, "teacher": str(teacher)}))
    prompts, noise = pipeline_inputs(export)
    model = load_one_step(folder)
    with torch.no_grad():
        latents = project_latents(folder, noise, prompts)
    assert relative_difference(latents, project_latents(export, noise, prompts)) < 1e-6
    assert model.teacher.pipeline.vae is not None
    if teacher is not None:
        (folder / "wadi_one_step.json").write_text(json.dumps({**info, "teacher": "pipe"}))
        result = CliRunner().invoke(app, ["sample", str(folder), "-p", "x", "--out", str(tmp_path / "s")])
        assert result.exit_code == 2 and "not found" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("exported", ["sd-epsilon"], indirect=True)
def test_an_export_is_its_own_bundle(exported):
    """A portable export holds no teacher denoiser: the generator is its pipeline's denoiser (the merged one),
    beside the teacher's prompt encoder, VAE and schedule, bit for bit."""
    from wadi_distill.runs import load_one_step, load_sampler

    _, _, teacher, export = exported
    model = load_one_step(export)
    reference, _, _ = load_sampler(teacher)
    assert model.generator is model.teacher.denoiser
    for part in ("text_encoder", "vae"):
        ours, theirs = (getattr(t.pipeline, part).state_dict() for t in (model.teacher, reference))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(model.teacher.alphas_cumprod, reference.alphas_cumprod)
    merged, original = model.generator.state_dict(), reference.denoiser.state_dict()
    assert any(not torch.equal(merged[k], original[k]) for k in original)  # the generator trained


@pytest.mark.parametrize("exported", ["embedded"], indirect=True)
def test_a_moved_embedded_export_evaluates(exported):
    from wadi_distill.evaluation import evaluate_source

    result, line = evaluate_source(exported[3], per_class=4)
    assert np.isfinite(result["scores"]["frechet_distance"]) and "FD" in line
