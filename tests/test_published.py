"""The published WaDi weights (issue 15, part 3): a merged file in the released layout (plain diffusers keys of
the whole U-Net / transformer, loaded ``strict=True``) plus its teacher becomes the complete one-step pipeline
``export`` writes, with a_T = 0.0047 recorded and used; plain diffusers runs it as the published inference does
(one conditional pass at t = 999), ``sample`` and ``evaluate`` read it; every misfit is one error line. Also: the
PixArt placement of the released code (82.56 M at r128) and PixArt's size conditioning of the 1024 px model."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.support.hostile import MARKER, check_refused, snapshot
from tests.support.tensors import relative_difference
from wadi_distill.cli import app

FAMILIES = ["sd-epsilon", "sd-v", "pixart"]
RELEASED = {"sd-epsilon": "rotated_unet-sdv1-5.safetensors", "sd-v": "rotated_unet-sdv2-1.safetensors",
            "pixart": "rotated_transformer.safetensors"}
PUBLISHED_ALPHA_T = 0.0047  # the published inference's value, typed here so that the test checks the code's
PROMPTS = ["a photo of a bag", "a photo of a shirt"]


def teacher_pipeline(family: str, folder: Path) -> Path:
    from tests.support.pipelines import tiny_pixart_pipeline, tiny_sd_pipeline

    if family == "pixart":
        return tiny_pixart_pipeline(folder)
    return tiny_sd_pipeline(folder, "v_prediction" if family == "sd-v" else "epsilon")


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def write_released(teacher: Path, out: Path, dtype: torch.dtype = torch.float32, seed: int = 1) -> Path:
    """The teacher's denoiser with every weight moved (5 % of its spread), saved as the release is: the plain
    state dict of the whole U-Net / transformer, one safetensors file."""
    from diffusers import DiffusionPipeline

    state = denoiser_of(DiffusionPipeline.from_pretrained(teacher)).state_dict()
    generator = torch.Generator().manual_seed(seed)
    moved = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1:
            tensor = tensor + 0.05 * tensor.std() * torch.randn(tensor.shape, generator=generator)
        moved[name] = tensor.to(dtype).contiguous()
    save_file(moved, out)
    return out


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory):
    """(family, teacher folder, released file, the imported pipeline folder)."""
    root = tmp_path_factory.mktemp(request.param)
    teacher = teacher_pipeline(request.param, root / "pipe")
    dtype = torch.float16 if request.param == "sd-epsilon" else torch.float32  # a half-precision release too
    file = write_released(teacher, root / RELEASED[request.param], dtype)
    result = invoke("import-published", file, "--teacher", teacher, "--out", root / "one-step")
    assert result.exit_code == 0, result.output
    assert "pipeline: " in result.output and "single_file: " in result.output
    return request.param, teacher, file, root / "one-step"


@torch.no_grad()
def published_inference(teacher: Path, file: Path, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
    """What the published inference computes, written out here: the teacher's denoiser loaded strictly from the
    file, one conditional pass at t = 999, x0 with a_T = 0.0047 (epsilon, or v for a v-prediction teacher)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher)
    denoiser = denoiser_of(pipe)
    denoiser.load_state_dict(load_file(file), strict=True)
    timesteps = torch.full((len(prompts),), 999)
    if hasattr(pipe, "transformer"):
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=False)
        output = denoiser(noise, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :noise.shape[1]]
    else:
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        output = denoiser(noise, timesteps, encoder_hidden_states=embeds).sample
    a = torch.tensor(PUBLISHED_ALPHA_T)
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * output
    return (noise - (1 - a).sqrt() * output) / a.sqrt()


def call_options(family: str) -> dict:
    extra = {"use_resolution_binning": False, "clean_caption": False} if family == "pixart" else {}
    return {"num_inference_steps": 1, "guidance_scale": 0.0, **extra}


def sample_pngs(source: Path, out: Path, count: int = 2) -> np.ndarray:
    result = invoke("sample", source, *sum((["-p", p] for p in PROMPTS), []), "--n", count, "--out", out)
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))]).astype(int)


def inputs(export: Path, count: int = 2):
    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise

    prompts = [p for p in PROMPTS for _ in range(count)]
    return prompts, initial_noise(load_export(export).teacher, len(prompts), seed=0)


def test_the_pipeline_runs_the_published_inference_and_sample_agrees(imported, tmp_path):
    from diffusers import DiffusionPipeline

    family, teacher, file, export = imported
    prompts, noise = inputs(export)
    pipe = DiffusionPipeline.from_pretrained(export, use_safetensors=True)
    latents = pipe(prompts, latents=noise.clone(), output_type="latent", **call_options(family)).images
    expected = published_inference(teacher, file, prompts, noise)
    assert relative_difference(latents, expected) < 1e-5
    images = pipe(prompts, latents=noise.clone(), output_type="pil", **call_options(family)).images
    ours = sample_pngs(export, tmp_path / "samples")
    assert np.abs(np.stack([np.asarray(i.convert("RGB")) for i in images]).astype(int) - ours).max() <= 1
    assert ours.std() > 5
    # the file's weights, not the teacher's: the teacher's own single step differs
    assert relative_difference(published_inference(teacher, write_released(teacher, tmp_path / "t.safetensors",
                                                                           seed=2), prompts, noise), expected) > 1e-3


def test_a_T_is_recorded_and_ends_the_schedule(imported):
    from diffusers import DDPMScheduler, DiffusionPipeline

    family, teacher, file, export = imported
    info = json.loads((export / "wadi_one_step.json").read_text())
    assert info["alpha_T"] == PUBLISHED_ALPHA_T and info["timestep"] == 999 and info["teacher"] == "pipe"
    assert info["source"]["file"] == file.name
    assert info["source"]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    own = DDPMScheduler.from_pretrained(teacher, subfolder="scheduler").alphas_cumprod
    assert info["schedule_alpha_T"] == pytest.approx(own[-1].item())
    scheduler = DiffusionPipeline.from_pretrained(export).scheduler
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    assert abs(scheduler.alphas_cumprod[999].item() - PUBLISHED_ALPHA_T) < 1e-9
    kept = int((own >= PUBLISHED_ALPHA_T).sum())  # SD: all but the last (0.00466 < 0.0047 < 0.00472); PixArt: 727
    assert kept == (727 if family == "pixart" else 999)
    assert torch.equal(scheduler.alphas_cumprod[:kept], own[:kept])
    assert torch.allclose(scheduler.alphas_cumprod[kept:], torch.tensor(PUBLISHED_ALPHA_T), rtol=1e-6, atol=0)


@pytest.mark.parametrize("imported", ["sd-epsilon"], indirect=True)
def test_the_layout_is_exports(imported):
    """The pipeline is also the model folder; one_step.safetensors and the denoiser folder hold the file's weights
    (in the teacher's float32), key for key."""
    from diffusers import UNet2DConditionModel

    _, _, file, export = imported
    released = load_file(file)
    for state in (load_file(export / "one_step.safetensors"), UNet2DConditionModel.from_pretrained(export).state_dict(),
                  UNet2DConditionModel.from_pretrained(export / "unet").state_dict()):
        assert state.keys() == released.keys()
        assert all(state[k].dtype == torch.float32 and torch.equal(state[k], released[k].float()) for k in state)


@pytest.mark.parametrize("imported", ["sd-epsilon"], indirect=True)
def test_another_alpha_T_and_an_import_over_an_import(imported, tmp_path):
    """--alpha-t the schedule's own last a: the teacher's schedule unchanged; --out an earlier import is replaced."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    _, teacher, file, export = imported
    own = DDPMScheduler.from_pretrained(teacher, subfolder="scheduler").alphas_cumprod
    out = tmp_path / "own"
    for _ in range(2):
        result = invoke("import-published", file, "--teacher", teacher, "--out", out, "--alpha-t", own[-1].item())
        assert result.exit_code == 0, result.output
    assert json.loads((out / "wadi_one_step.json").read_text())["alpha_T"] == own[-1].item()
    assert torch.equal(DiffusionPipeline.from_pretrained(out).scheduler.alphas_cumprod, own)


def test_the_embedded_teacher_import_evaluates(tmp_path):
    """The default protocol (classifier features) on a file written from the embedded teacher's U-Net."""
    from wadi_distill import embedded

    file = write_released(embedded.teacher_path(), tmp_path / "rotated_unet.safetensors")
    result = invoke("import-published", file, "--teacher", embedded.teacher_path(), "--out", tmp_path / "one-step")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "one-step" / "wadi_one_step.json").read_text())["teacher"] == "embedded"
    result = invoke("evaluate", tmp_path / "one-step", "--per-class", 4, "--json", tmp_path / "scores.json")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["sampler"].startswith("one step") and math.isfinite(scores["scores"]["frechet_distance"])


# ----------------------------------------------------------------------------- files that do not fit


class Payload:
    """Writes the marker when unpickled: a pickle that runs code."""

    def __init__(self, root: Path) -> None:
        self.target = str(root / MARKER)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def edited(file: Path, root: Path, edit) -> Path:
    state = load_file(file)
    edit(state)
    save_file(state, root / "rotated_unet-sdv1-5.safetensors")
    return root / "rotated_unet-sdv1-5.safetensors"


def first_weight(state: dict) -> str:
    return next(k for k in state if k.endswith(".weight") and state[k].ndim > 1)


HOSTILE = {
    "missing-key": (lambda file, root: edited(file, root, lambda s: s.pop(first_weight(s))),
                    "1 missing: conv_in.weight"),
    "extra-key": (lambda file, root: edited(file, root, lambda s: s.update(extra_weight=torch.zeros(2))),
                  "1 extra: extra_weight"),
    "shape": (lambda file, root: edited(file, root, lambda s: s.update(
        {first_weight(s): torch.zeros(2, 2)})), "conv_in.weight (2x2 in the file"),
    "integer-weights": (lambda file, root: edited(file, root, lambda s: s.update(
        {first_weight(s): s[first_weight(s)].to(torch.int32)})), "not floating-point"),
    "nan-weights": (lambda file, root: edited(file, root, lambda s: s[first_weight(s)].fill_(float("nan"))),
                    "not finite"),
    "not-safetensors": (lambda file, root: (root / "w.safetensors").write_bytes(b"\x10\x00\x00\x00" * 8)
                        and root / "w.safetensors", "not a safetensors file"),
    "pickle-bin": (lambda file, root: torch.save({"conv_in.weight": Payload(root)}, root / "w.bin")
                   or root / "w.bin", "pickle"),
    "pickle-named-safetensors": (lambda file, root: torch.save({"w": Payload(root)}, root / "w.safetensors")
                                 or root / "w.safetensors", "pickle"),
    "missing-file": (lambda file, root: root / "absent.safetensors", "does not exist"),
}


@pytest.mark.parametrize("imported", ["sd-epsilon"], indirect=True)
@pytest.mark.parametrize("case", HOSTILE)
def test_a_file_that_does_not_fit_is_one_error_line(imported, tmp_path, case):
    _, teacher, file, _ = imported
    make, expect = HOSTILE[case]
    bad = make(file, tmp_path)
    before = snapshot(tmp_path)
    teacher_before = snapshot(teacher)
    result = invoke("import-published", bad, "--teacher", teacher, "--out", tmp_path / "out")
    check_refused(result, tmp_path, before, expect)
    assert snapshot(teacher) == teacher_before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("imported", ["sd-epsilon"], indirect=True)
@pytest.mark.parametrize("args,expect", [(["--alpha-t", "0"], "between 0 and 1"), (["--alpha-t", "nan"], "between"),
                                         (["--alpha-t", "1.5"], "between"), (["--component", "transformer"], "unet"),
                                         (["--component", "vae"], "unet, transformer")])
def test_bad_options_are_one_error_line(imported, tmp_path, args, expect):
    _, teacher, file, _ = imported
    before = snapshot(tmp_path)
    result = invoke("import-published", file, "--teacher", teacher, "--out", tmp_path / "out", *args)
    check_refused(result, tmp_path, before, expect)


@pytest.mark.parametrize("imported", ["sd-epsilon"], indirect=True)
def test_outputs_keep_apart_from_the_inputs(imported, tmp_path):
    """--out never is or holds the teacher or the file; a foreign non-empty folder needs --overwrite."""
    _, teacher, file, _ = imported
    copy = tmp_path / "in" / file.name
    copy.parent.mkdir()
    copy.write_bytes(file.read_bytes())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    before, teacher_before = snapshot(tmp_path), snapshot(teacher)
    for out, expect in ((teacher, "is the input"), (teacher / "unet", "lies inside the input"),
                        (tmp_path / "in", "contains the input"), (tmp_path / "mine", "--overwrite")):
        check_refused(invoke("import-published", copy, "--teacher", teacher, "--out", out), tmp_path, before, expect)
    assert snapshot(teacher) == teacher_before


@pytest.mark.parametrize("imported", ["sd-epsilon"], indirect=True)
def test_a_teacher_that_is_not_a_pipeline_and_a_wrong_family(imported, tmp_path_factory, tmp_path):
    """An export as the teacher (its schedule is the one-step one), and a PixArt file on an SD teacher."""
    _, teacher, file, export = imported
    before = snapshot(tmp_path)
    check_refused(invoke("import-published", file, "--teacher", export, "--out", tmp_path / "out"), tmp_path, before,
                  "not a teacher pipeline")
    pixart = teacher_pipeline("pixart", tmp_path_factory.mktemp("px") / "pipe")
    pixart_file = write_released(pixart, pixart.parent / RELEASED["pixart"])
    check_refused(invoke("import-published", pixart_file, "--teacher", teacher, "--out", tmp_path / "out"), tmp_path,
                  before, "does not fit the teacher's unet")


# ----------------------------------------------------------------------------- the released PixArt placement


@pytest.mark.parametrize("preset,millions,adaln", [("pixart-generator", 81.22, False),
                                                   ("pixart-generator-released", 82.56, True)])
def test_pixart_presets_count_the_paper_and_the_released_code(preset, millions, adaln):
    """On the real PixArt-α config (meta device): the paper's 81.22 M leaves adaln_single out, the released
    code's 82.56 M adapts it too; otherwise the same Linears at rank 128."""
    from accelerate import init_empty_weights
    from diffusers import PixArtTransformer2DModel

    from wadi_analysis.examples import real_config
    from wadi_distill import adapters, lorad

    with init_empty_weights():
        model = PixArtTransformer2DModel.from_config(real_config("pixart_alpha_xl2_transformer"))
    targets = lorad.resolve_preset(model, preset)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) == {n for n in linears if adaln or not n.startswith("adaln_single.")}
    assert set(targets.values()) == {128}
    assert round(adapters.attach(model, "lorad", targets, "gen") / 1e6, 2) == millions


# ----------------------------------------------------------------------------- PixArt at 1024 px


def pixart_1024_style(folder: Path) -> Path:
    """The tiny PixArt pipeline with a transformer of sample_size 128 (diffusers then turns on
    use_additional_conditions, as for PixArt-XL-2-1024-MS); 16-pixel patches keep it at 64 tokens, 3 heads make
    its width a multiple of 3 (the size embeddings take a third each)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    tiny = teacher_pipeline("pixart", folder.parent / "base")
    pipe = PixArtAlphaPipeline.from_pretrained(tiny)
    torch.manual_seed(3)
    pipe.transformer = PixArtTransformer2DModel(**{**pipe.transformer.config, "sample_size": 128, "patch_size": 16,
                                                         "num_attention_heads": 3, "cross_attention_dim": 24})
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(folder)
    return folder


def test_pixart_size_conditions_are_the_pipelines(tmp_path):
    """Our conditioning carries (height, width) and height / width per prompt, as PixArtAlphaPipeline passes them
    for a 1024 px transformer; the one-step images of the imported file equal the pipeline's, and the
    conditions matter (another resolution changes the output)."""
    from diffusers import DiffusionPipeline

    from wadi_distill.runs import load_export
    from wadi_distill.sampling import one_step_sample
    from wadi_distill.teacher import load_teacher

    teacher_dir = pixart_1024_style(tmp_path / "pipe")
    teacher = load_teacher(teacher_dir)
    assert teacher.denoiser.use_additional_conditions
    conditioning = teacher.encode(PROMPTS)
    size = conditioning.extra["added_cond_kwargs"]
    assert size["resolution"].tolist() == [[256.0, 256.0]] * 2 and size["aspect_ratio"].tolist() == [[1.0]] * 2
    assert size["resolution"].dtype == conditioning.hidden_states.dtype
    file = write_released(teacher_dir, tmp_path / RELEASED["pixart"])
    assert invoke("import-published", file, "--teacher", teacher_dir, "--out", tmp_path / "one-step").exit_code == 0
    export = tmp_path / "one-step"
    prompts, noise = inputs(export, count=1)
    pipe = DiffusionPipeline.from_pretrained(export)
    latents = pipe(prompts, latents=noise.clone(), output_type="latent", **call_options("pixart")).images
    model = load_export(export)
    with torch.no_grad():
        ours = one_step_sample(model.teacher, model.generator, noise, model.teacher.encode(prompts), model.vsd)
        other = model.teacher.encode(prompts)
        other.extra["added_cond_kwargs"]["resolution"] = other.extra["added_cond_kwargs"]["resolution"] * 2
        elsewhere = one_step_sample(model.teacher, model.generator, noise, other, model.vsd)
    assert relative_difference(ours, latents) < 1e-5
    assert relative_difference(elsewhere, latents) > 1e-4
    images = pipe(prompts, latents=noise.clone(), output_type="pil", **call_options("pixart")).images
    pngs = sample_pngs(export, tmp_path / "samples", count=1)
    assert np.abs(np.stack([np.asarray(i.convert("RGB")) for i in images]).astype(int) - pngs).max() <= 1
