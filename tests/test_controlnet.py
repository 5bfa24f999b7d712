"""ControlNet with the one-step student (issue 15, part 5): ``sample --controlnet`` equals diffusers'
``StableDiffusionControlNetPipeline`` (and ``AutoPipelineForText2Image`` with a ControlNet) run in one step
on the exported pipeline, to one grey level; the edge metrics on planted maps; ``wadi-distill controlnet``
trains a loadable ControlNet; the shipped ControlNet steers the teacher; bad input is one error line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wadi_distill import embedded
from wadi_distill.cli import app
from wadi_distill.config import load_config
from wadi_distill.evaluation.control import edge_image, edge_map, edge_scores
from wadi_distill.export import export_run
from wadi_distill.training.loop import train

PROMPTS = ["a photo of a bag", "a photo of a sneaker"]
COUNT = 2


def square(size: int = 32, low: int = 8, high: int = 24) -> torch.Tensor:
    """(1, 1, size, size) image in [-1, 1]: a white square on black."""
    image = -torch.ones(1, 1, size, size)
    image[..., low:high, low:high] = 1
    return image


def write_control(path: Path, image: torch.Tensor) -> Path:
    Image.fromarray(edge_image(edge_map(image))[0]).save(path)
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A 2-step LoRaD run on the embedded teacher, exported as a one-step pipeline."""
    root = tmp_path_factory.mktemp("controlnet")
    config = load_config(out=str(root / "run"), steps=2, batch_size=2, cache_dir=str(root / "cache"),
                         generator_lr=1e-2, checkpoint_every=2, validate_every=100)
    train(config, progress=False)
    export_run(config.out, root / "export")
    return root / "export"


@pytest.fixture(scope="module")
def random_controlnet(tmp_path_factory) -> Path:
    """A ControlNet of the embedded teacher with every weight random (its zero convolutions too), so its
    residuals are large: a test that ignored them would fail."""
    from diffusers import ControlNetModel

    from wadi_distill.embedded.controlnet_training import CONDITIONING_CHANNELS
    from wadi_distill.teacher import load_denoiser

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(load_denoiser(embedded.teacher_path()),
                                    conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("random-controlnet") / "controlnet"
    net.save_pretrained(folder)
    return folder


def sample_pngs(source: Path, out: Path, *args: str) -> np.ndarray:
    result = CliRunner().invoke(app, ["sample", str(source), *sum((["-p", p] for p in PROMPTS), []),
                                      "--n", str(COUNT), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))]).astype(int)


def pipeline_images(pipe, export: Path, control, guidance: float = 0.0) -> np.ndarray:
    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise

    noise = initial_noise(load_export(export).teacher, len(PROMPTS) * COUNT, seed=0)
    images = pipe(PROMPTS, image=control, num_images_per_prompt=COUNT, num_inference_steps=1,
                  guidance_scale=guidance, latents=noise).images
    return np.stack([np.asarray(image.convert("RGB")) for image in images]).astype(int)


def controlnet_pipeline(export: Path, controlnet: Path, auto: bool = False):
    from diffusers import AutoPipelineForText2Image, ControlNetModel, StableDiffusionControlNetPipeline

    net = ControlNetModel.from_pretrained(controlnet)
    loader = AutoPipelineForText2Image if auto else StableDiffusionControlNetPipeline
    pipe = loader.from_pretrained(export, controlnet=net, safety_checker=None, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("auto", [False, True], ids=["controlnet-pipeline", "auto-pipeline"])
def test_sample_with_controlnet_equals_the_diffusers_pipeline(export, random_controlnet, tmp_path, auto):
    control = write_control(tmp_path / "edges.png", square())
    ours = sample_pngs(export, tmp_path / "ours", "--controlnet", str(random_controlnet), "--control-image", str(control))
    theirs = pipeline_images(controlnet_pipeline(export, random_controlnet, auto), export, Image.open(control))
    assert np.abs(ours - theirs).max() <= 1
    plain = sample_pngs(export, tmp_path / "plain")
    assert np.abs(ours - plain).mean() > 5  # the ControlNet's residuals were applied


def test_guided_and_per_prompt_control_equal_the_pipeline(export, random_controlnet, tmp_path):
    """Guidance doubles the batch (the control repeated over it); one control image per prompt."""
    controls = [write_control(tmp_path / "a.png", square()), write_control(tmp_path / "b.png", square(low=4, high=12))]
    args = ["--controlnet", str(random_controlnet), "--control-image", str(controls[0]), "--control-image",
            str(controls[1]), "--guidance", "2"]
    ours = sample_pngs(export, tmp_path / "ours", *args)
    pipe = controlnet_pipeline(export, random_controlnet)
    theirs = pipeline_images(pipe, export, [Image.open(c) for c in controls], guidance=2.0)
    assert np.abs(ours - theirs).max() <= 1


def test_edge_scores_on_planted_maps():
    edges = edge_map(square())
    assert edges.sum() > 0 and edges[..., 0, :].sum() == 0  # edges at the square's border only
    assert edge_scores(edges, edges) == {"edge_precision": 1.0, "edge_recall": 1.0, "edge_f1": 1.0, "edge_iou": 1.0}
    shifted = edges.roll(1, dims=-1)
    within, exact = edge_scores(edges, shifted), edge_scores(edges, shifted, tolerance=0)
    assert within["edge_f1"] == 1.0 and exact["edge_f1"] < 1.0 and exact["edge_iou"] < 1.0
    assert edge_scores(edges, torch.zeros_like(edges))["edge_f1"] == 0.0
    far = edge_map(square(low=0, high=4))
    assert edge_scores(edges, far)["edge_f1"] < 0.2


def test_controlnet_command_trains_a_loadable_controlnet(tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "controlnet"
    result = CliRunner().invoke(app, ["controlnet", "--out", str(out), "--steps", "2", "--batch-size", "4",
                                      "--images", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "wadi_controlnet.json").is_file() and not list(tmp_path.glob(".*"))
    net = ControlNetModel.from_pretrained(out)
    # zero convolutions start at zero: trained ones are not
    assert any(block.weight.abs().sum() > 0 for block in net.controlnet_down_blocks)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["controlnet", "--out", str(foreign), "--steps", "1"])
    assert result.exit_code == 2 and (foreign / "keep.txt").read_text() == "mine"


def test_the_shipped_controlnet_steers_the_teacher():
    """On 20 test images' edge maps the teacher at 10 steps follows them far better with the ControlNet."""
    from wadi_distill.controlnet import load_controlnet
    from wadi_distill.experiments.control import control_set, sample_images
    from wadi_distill.teacher import load_teacher

    teacher = load_teacher(embedded.teacher_path())
    net = load_controlnet(embedded.controlnet_path(), teacher.denoiser)
    images, _, prompts = control_set(2, 32)
    edges = edge_map(images)
    scores = {}
    for name, model in (("controlled", net), ("free", None)):
        generated = sample_images(teacher, teacher.denoiser, model, edges.expand(-1, 3, -1, -1), prompts, 0, 10, 1.5, None)
        scores[name] = edge_scores(edges, edge_map(generated))["edge_f1"]
    assert scores["controlled"] > scores["free"] + 0.1, scores


def test_control_report_writes_its_table(export, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["control-report", str(export), "--out", str(out), "--per-class", "2"])
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(out / "table.csv")
    assert len(table) == 6 and {"edge_f1", "frechet_distance", "prompt_accuracy"} <= set(table.columns)
    ceiling = table.set_index("row").loc["real, VAE round trip", "edge_f1"]
    assert ceiling > table.set_index("row").loc["real, another image of the class", "edge_f1"]
    assert (out / "samples.png").is_file() and (out / "table.md").is_file()


def hostile_cases(tmp_path: Path, export: Path, controlnet: Path) -> dict[str, list[str]]:
    from tests.support.pipelines import tiny_sd_pipeline

    control = write_control(tmp_path / "edges.png", square())
    (tmp_path / "not-an-image.png").write_text("hello")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((controlnet / "config.json").read_text())
    torch.save({}, pickled / "diffusion_pytorch_model.bin")
    misfit = tmp_path / "misfit"
    from diffusers import ControlNetModel

    from wadi_distill.teacher import load_denoiser

    ControlNetModel.from_unet(load_denoiser(tiny_sd_pipeline(tmp_path / "tiny"), "unet")).save_pretrained(misfit)
    base = ["--controlnet", str(controlnet), "--control-image", str(control)]
    return {
        "controlnet without image": ["--controlnet", str(controlnet)],
        "image without controlnet": ["--control-image", str(control)],
        "not an image": ["--controlnet", str(controlnet), "--control-image", str(tmp_path / "not-an-image.png")],
        "missing image": ["--controlnet", str(controlnet), "--control-image", str(tmp_path / "none.png")],
        "three images for two prompts": base + ["--control-image", str(control)] * 2,
        "not a controlnet": ["--controlnet", str(embedded.teacher_path() / "unet"), "--control-image", str(control)],
        "pickle only": ["--controlnet", str(pickled), "--control-image", str(control)],
        "another architecture": ["--controlnet", str(misfit), "--control-image", str(control)],
        "negative scale": base + ["--control-scale", "-1"],
        "nan scale": base + ["--control-scale", "nan"],
    }


def test_bad_controlnet_input_is_one_error_line(export, random_controlnet, tmp_path):
    for name, args in hostile_cases(tmp_path, export, random_controlnet).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = CliRunner().invoke(app, ["sample", str(export), *sum((["-p", p] for p in PROMPTS), []), "--out",
                                          str(out), *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.output)
        assert not out.exists(), name
