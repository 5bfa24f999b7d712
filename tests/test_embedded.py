"""The embedded default: CLIP BPE tokenizer, Fashion-MNIST captions, the shipped teacher and classifier,
`wadi-distill teacher`, `evaluate` and `embedded`."""

import json
import subprocess
import sys

import pytest
import torch

from wadi_distill import embedded
from wadi_distill.embedded import datasets
from wadi_distill.evaluation.classifier import embed, load_classifier

# of the defaults' 1,000 iterations: there the sweep's three seeds stood at 0.81-0.90x the teacher's best single
# step in 300-sample FD (reports/recipe/curves.csv, generator-conv-r32+regression-1-guidance-real-2.5)
CI_STEPS = 400


def cli(*args, timeout=600):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "wadi_distill.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_clip_tokenizer_gives_stable_diffusion_ids(tmp_path):
    """Ids of the released SD (openai/clip-vit-large-patch14) tokenizer for these prompts."""
    from wadi_distill.embedded.tokenizer import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(tmp_path / "tokenizer", max_length=77)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a photo of a sneaker").input_ids == [49406, 320, 1125, 539, 320, 24781, 49407]
    assert not (tmp_path / "tokenizer" / "tokenizer.json").exists()  # vocab + merges only


def test_fashion_mnist_reader_and_captions():
    test = datasets.fashion_mnist("test", size=16)
    assert test.images.shape == (10000, 1, 16, 16) and test.labels.bincount().tolist() == [1000] * 10
    assert -1.0 <= test.images.min() < -0.99 and 0.9 < test.images.max() <= 1.0
    balanced = test.balanced(7, seed=3)
    assert balanced.labels.bincount().tolist() == [7] * 10
    for label, name in enumerate(datasets.FASHION_CLASSES):
        for template in range(len(datasets.TEMPLATES)):
            assert datasets.class_of_prompt(datasets.caption(datasets.FASHION_CLASSES, label, template),
                                            datasets.FASHION_CLASSES) == label, name
    assert datasets.class_of_prompt("a photo of a t-shirt", datasets.FASHION_CLASSES) == 0  # not "shirt"


def test_shipped_classifier_accuracy():
    classifier = load_classifier(embedded.classifier_path())
    test = datasets.fashion_mnist("test", size=classifier.image_size)
    features, predicted = embed(classifier, test.images)
    assert (predicted == test.labels).float().mean() > 0.85
    assert features.shape == (10000, 128) and 0.5 < features.pow(2).mean().sqrt() < 2.0  # unit-RMS scaling


def test_embedded_teacher_quality(tmp_path):
    """Committed teacher, fixed seed, 25 DDIM steps: FD within 2x the VAE's reconstruction floor at the same
    sample count, prompt accuracy >= 0.9."""
    result = cli("evaluate", "--per-class", 50, "--steps", 25, "--json", tmp_path / "teacher.json")
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "teacher.json").read_text())
    assert scores["samples"] == 500 and scores["sampler"].startswith("DDIM 25 steps")
    floor = scores["autoencoder"]["frechet_distance"]
    assert scores["real_vs_real"]["frechet_distance"] < floor < scores["scores"]["frechet_distance"] < 2 * floor
    assert scores["scores"]["prompt_accuracy"] >= 0.9
    assert "FD" in result.stdout and "(real" in result.stdout and "VAE reconstruction FD" in result.stdout


def test_embedded_teacher_layout():
    from wadi_distill.teacher import load_teacher

    teacher = load_teacher(embedded.teacher_path())
    assert teacher.family == "unet" and teacher.prediction_type == "epsilon"
    assert teacher.latent_channels == 4 and teacher.sample_size == 8  # SD's 4-channel latents, 1/4 of 32 px
    vae = teacher.pipeline.vae
    assert vae is not None and vae.config.in_channels == 1 and len(vae.config.block_out_channels) == 3
    assert teacher.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)  # SD's scaled-linear schedule
    provenance = json.loads((embedded.teacher_path() / "wadi_teacher.json").read_text())
    assert provenance["command"].startswith("wadi-distill teacher") and "--vae" in provenance["command"]
    assert provenance["vae"]["command"].startswith("wadi-distill vae")
    assert provenance["vae"]["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    prompts = embedded.prompts_path().read_text().splitlines()
    assert len(prompts) == 80 and "a photo of a sneaker" in prompts


def test_plain_diffusers_loads_and_runs_the_embedded_teacher():
    """`StableDiffusionPipeline.from_pretrained(path)` with no extra arguments; 25 steps give PIL images of
    the prompted class (the evaluation classifier agrees) at the pipeline's default 32x32."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded.teacher_path())
    pipe.set_progress_bar_config(disable=True)
    classes = [0, 1, 5, 7, 8, 9]
    prompts = [datasets.caption(datasets.FASHION_CLASSES, label) for label in classes for _ in range(4)]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=1.5,
                  generator=torch.Generator().manual_seed(0)).images
    assert all(image.size == (32, 32) for image in images)
    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("L")) for image in images])).float()
    predicted = embed(load_classifier(embedded.classifier_path()), pixels[:, None] / 127.5 - 1)[1]
    labels = torch.tensor(classes).repeat_interleave(4)
    assert (predicted == labels).float().mean() >= 0.8


def test_teacher_command_trains_a_loadable_pipeline(tmp_path):
    from wadi_distill.teacher import load_teacher
    from wadi_distill.sampling import ddim

    out = tmp_path / "teacher"
    result = cli("teacher", "--out", out, "--steps", 6, "--batch-size", 8, "--image-size", 8, "--channels", "16,32")
    assert result.returncode == 0, result.stderr
    teacher = load_teacher(out)
    shipped = load_teacher(embedded.teacher_path()).pipeline.tokenizer
    assert teacher.sample_size == 8 and teacher.pipeline.tokenizer("a bag").input_ids == shipped("a bag").input_ids
    conditioning, null = teacher.encode(["a photo of a bag"]), teacher.encode([""])
    sample = ddim(teacher, teacher.denoiser, torch.randn(1, 1, 8, 8), conditioning, null, steps=3)
    assert sample.shape == (1, 1, 8, 8) and torch.isfinite(sample).all()
    assert json.loads((out / "wadi_teacher.json").read_text())["step"] == 6

    # a second phase continues from the first one's weights and keeps its provenance
    second = tmp_path / "second"
    result = cli("teacher", "--out", second, "--init", out, "--steps", 3, "--batch-size", 8, "--image-size", 8,
                 "--lr", 1e-4, "--seed", 1)
    assert result.returncode == 0, result.stderr
    provenance = json.loads((second / "wadi_teacher.json").read_text())
    assert provenance["init_from"]["step"] == 6 and provenance["step"] == 3 and "--init" in provenance["command"]
    before, after = load_teacher(out).denoiser.state_dict(), load_teacher(second).denoiser.state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("args", [
    lambda tmp: ("evaluate", tmp / "missing"),
    lambda tmp: ("teacher", "--out", tmp / "t", "--channels", "a,b"),
    lambda tmp: ("embedded", "--path", "vae"),
    lambda tmp: ("teacher", "--out", tmp / "t", "--init", tmp / "missing"),
], ids=["evaluate-missing-run", "teacher-bad-channels", "embedded-unknown-path", "teacher-missing-init"])
def test_bad_input_gives_one_error_line(tmp_path, args):
    args = args(tmp_path)
    result = cli(*args)
    assert result.returncode == 2 and result.stderr.startswith("error: "), (args, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_ddim_one_step_is_the_teacher_x0_prediction():
    """ddim(steps=1) from x_T is the teacher's x0 estimate at the last timestep (the undistilled one-step)."""
    from wadi_distill.teacher import load_teacher
    from wadi_distill.distill import VSDConfig, one_step
    from wadi_distill.sampling import ddim, trailing_timesteps

    assert trailing_timesteps(1000, 1) == [999] and trailing_timesteps(1000, 4) == [999, 749, 499, 249]
    teacher = load_teacher(embedded.teacher_path())
    noise = torch.randn(3, teacher.latent_channels, teacher.sample_size, teacher.sample_size,
                        generator=torch.Generator().manual_seed(0))
    conditioning, null = teacher.encode(["a bag", "a dress", "a coat"]), teacher.encode([""])
    expected = one_step(teacher, teacher.denoiser, noise, conditioning, VSDConfig())
    # ddim evaluates conditional and null prompts in one batch: equal up to float rounding
    torch.testing.assert_close(ddim(teacher, teacher.denoiser, noise, conditioning, null, 1), expected,
                               rtol=1e-4, atol=1e-4)


def test_run_defaults_to_the_embedded_teacher(tmp_path):
    from wadi_distill.config import load_config

    default = load_config()
    assert default.teacher == str(embedded.teacher_path()) and default.prompts == str(embedded.prompts_path())
    assert (default.generator_rank, default.fake_rank, default.out) == (32, 4, "wadi-run")
    # the recipe sweep's choice (README "The VSD recipe"): LoRaD on Linear + Conv2d, VSD + regression, cfg 2.5
    assert (default.generator_preset, default.regression_weight, default.vsd.guidance_real) == \
        ("sd-unet-generator-conv", 1.0, 2.5)
    assert default.vsd.guidance_fake == 1.5 and default.adapter == "lorad"
    assert len(default.validation_prompts) == 10
    assert load_config(steps=7, out="elsewhere").steps == 7  # the command line still wins
    other = tmp_path / "run.toml"
    other.write_text('teacher = "some/pipeline"\nprompts = "p.txt"\n')
    named = load_config(other)
    assert named.teacher == "some/pipeline" and named.generator_rank is None and named.out == "run"


def test_short_distillation_beats_the_teachers_best_single_step(tmp_path):
    """CI-sized WaDi run on the embedded teacher: the defaults (LoRaD r32 on Linear and Conv2d, VSD +
    regression, guidance 2.5) for CI_STEPS of their 1,000 steps. Its one-step samples beat the teacher used
    as a one-step generator at its best guidance (of 1, 1.5, 2 and 3), at the same sample count, in FD and
    in recall."""
    from wadi_distill.config import load_config
    from wadi_distill.evaluation.benchmark import evaluate
    from wadi_distill.training.loop import train

    config = load_config(out=str(tmp_path / "run"), steps=CI_STEPS, checkpoint_every=CI_STEPS,
                         validate_every=CI_STEPS, cache_dir=str(tmp_path / "cache"))
    train(config)
    student = evaluate(tmp_path / "run", per_class=30)
    singles = [evaluate(embedded.teacher_path(), per_class=30, steps=1, guidance_scale=g) for g in (1.0, 1.5, 2.0, 3.0)]
    best = min(singles, key=lambda s: s["scores"]["frechet_distance"])
    assert student["real_vs_real"] == best["real_vs_real"]  # same reference, same sample count
    assert student["scores"]["frechet_distance"] < best["scores"]["frechet_distance"]
    assert student["scores"]["recall"] > max(s["scores"]["recall"] for s in singles)


def test_lorad_runs_without_peft_and_lora_says_what_is_missing(tmp_path):
    """peft is an optional extra: the default LoRaD run must not need it; LoRA/DoRA name the extra."""
    script = ("import sys; sys.modules['peft'] = None; sys.argv[0] = 'wadi-distill'; "
              "from wadi_distill.cli import main; main()")
    common = ["run", "-q", "--steps", "2", "--batch-size", "2"]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script, *common, "--out", str(tmp_path / "a")], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "generator_adapter.safetensors").is_file()
    for args in (["export", str(tmp_path / "a"), "--out", str(tmp_path / "a-export")],
                 ["sample", str(tmp_path / "a"), "--prompt", "a photo of a bag", "--n", "2", "--out", str(tmp_path / "s")]):
        step = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, env=env)
        assert step.returncode == 0, (args, step.stderr)
    assert (tmp_path / "a-export" / "one_step.safetensors").is_file() and (tmp_path / "s" / "grid.png").is_file()
    refused = subprocess.run([sys.executable, "-c", script, *common, "--adapter", "lora", "--out", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode == 2 and "needs peft" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_teacher_command_replaces_only_its_own_folders_and_leaves_no_debris(tmp_path):
    """--out: a folder the command wrote is replaced, a user's folder only with --overwrite; a run that
    fails leaves the folder as it was and nothing beside it (the tokenizer works in a private folder)."""
    from wadi_analysis.errors import UserError
    from wadi_distill.embedded.teacher_training import teacher_config, train_teacher

    tiny = teacher_config(steps=1, batch_size=4, image_size=8, channels="16,32")
    out = train_teacher(tiny, tmp_path / "t", log=lambda line: None)
    first = (out / "wadi_teacher.json").read_text()
    train_teacher(teacher_config(steps=1, batch_size=4, image_size=8, channels="16,32", seed=1), out,
                  log=lambda line: None)  # its own folder: replaced without --overwrite
    assert json.loads((out / "wadi_teacher.json").read_text())["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]

    def interrupted(line):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_teacher(tiny, out, log=interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"] and (out / "wadi_teacher.json").read_text() != first

    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine\n")
    with pytest.raises(UserError, match="--overwrite"):
        train_teacher(tiny, user, log=lambda line: None)
    assert (user / "keep.txt").read_text() == "mine\n"
    train_teacher(tiny, user, log=lambda line: None, overwrite=True)
    assert (user / "wadi_teacher.json").is_file() and not (user / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "user"]
