"""Hostile inputs to wadi-distill's configuration, plans, ``teacher`` command and datasets (issue 12):
each is refused with one ``error:`` line, exit 2, and every file under the case's folder unchanged
(tests/support/hostile.py). ``run`` cases name a tiny SD teacher built once per module; a refused run
writes nothing, not even its run folder."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.hostile import check_refused, snapshot
from tests.support.runs import sd_teacher_with_prompts
from wadi_distill.cli import app


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, Path]:
    return sd_teacher_with_prompts(tmp_path_factory.mktemp("hostile-config"))


def refused(root: Path, args: list[str], expect: str = "", env: dict | None = None) -> None:
    before = snapshot(root)
    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    check_refused(result, root, before, expect)


def write_case(path, content: bytes | str) -> None:
    """A case's input file: bytes as they are (e.g. not UTF-8), text as UTF-8."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


# --- run: TOML values of the wrong type or range ------------------------------------------------------

TOML = [  # (id, TOML text or bytes, what the message names)
    ("steps-a-string", 'steps = "ten"', "steps"),
    ("steps-a-bool", "steps = true", "steps"),
    ("steps-zero", "steps = 0", "steps"),
    ("out-an-int", "out = 5", "out"),
    ("out-empty", 'out = ""', "out"),
    ("checkpoint-every-zero", "checkpoint_every = 0", "checkpoint_every"),
    ("validate-every-negative", "validate_every = -5", "validate_every"),
    ("batch-size-a-float", "batch_size = 1.5", "batch_size"),
    ("keep-checkpoints-all", 'keep_checkpoints = "all"', "keep_checkpoints"),
    ("keep-checkpoints-zero", "keep_checkpoints = 0", "keep_checkpoints"),
    ("teacher-a-list", 'teacher = ["a"]', "teacher"),
    ("prompts-an-int", "prompts = 5", "prompts"),
    ("generator-rank-zero", "generator_rank = 0", "generator_rank"),
    ("fake-rank-negative", "fake_rank = -3", "fake_rank"),
    ("generator-lr-negative", "generator_lr = -1e-4", "generator_lr"),
    ("fake-lr-zero", "fake_lr = 0", "fake_lr"),
    ("generator-lr-nan", "generator_lr = nan", "generator_lr"),
    ("weight-decay-negative", "weight_decay = -1", "weight_decay"),
    ("grad-clip-zero", "grad_clip = 0", "grad_clip"),
    ("ema-decay-one", "ema_decay = 1.0", "ema_decay"),
    ("gradient-checkpointing-a-string", 'gradient_checkpointing = "yes"', "gradient_checkpointing"),
    ("record-digests-a-string", 'record_digests = "true"', "record_digests"),
    ("adapter-unknown", 'adapter = "qlora"', "adapter"),
    ("optimizer-unknown", 'optimizer = "sgd"', "optimizer"),
    ("mixed-precision-unknown", 'mixed_precision = "fp8"', "mixed_precision"),
    ("preset-unknown", 'generator_preset = "everything"', "generator_preset"),
    ("validation-prompts-a-string", 'validation_prompts = "a bag"', "validation_prompts"),
    ("validation-prompts-ints", "validation_prompts = [1, 2]", "validation_prompts"),
    ("seed-a-float", "seed = 1.5", "seed"),
    ("fake-steps-zero", "fake_steps_per_generator_step = 0", "fake_steps_per_generator_step"),
    ("max-nonfinite-negative", "max_nonfinite_in_a_row = -1", "max_nonfinite_in_a_row"),
    ("regression-weight-negative", "regression_weight = -0.5", "regression_weight"),
    ("regression-pairs-zero", "regression_pairs = 0", "regression_pairs"),
    ("unknown-option", "learning_rate = 1e-4", "unknown option"),
    ("vsd-guidance-a-string", '[vsd]\nguidance_real = "x"', "guidance_real"),
    ("vsd-guidance-infinite", "[vsd]\nguidance_fake = inf", "guidance_fake"),
    ("vsd-t-min-above-t-max", "[vsd]\nt_min = 500\nt_max = 100", "t_min"),
    ("vsd-fake-t-min-above-max", "[vsd]\nfake_t_min = 900\nfake_t_max = 10", "fake_t_min"),
    ("vsd-t-min-negative", "[vsd]\nt_min = -1", "t_min"),
    ("vsd-prompt-dropout-above-one", "[vsd]\nprompt_dropout = 1.5", "prompt_dropout"),
    ("vsd-prompt-dropout-negative", "[vsd]\nprompt_dropout = -0.1", "prompt_dropout"),
    ("vsd-alpha-t-above-one", "[vsd]\nalpha_T = 2.0", "alpha_T"),
    ("vsd-unknown-generator-weighting", '[vsd]\ngenerator_weighting = "sds"', "generator_weighting"),
    ("vsd-unknown-fake-weighting", '[vsd]\nfake_weighting = 2', "fake_weighting"),
    ("vsd-unknown-key", "[vsd]\nguidance = 2.0", "unknown option"),
    ("vsd-not-a-table", "vsd = 5", "[vsd] must be a table"),
    ("not-utf-8", b"steps = 1\n# \xff\xfe\n", "not UTF-8"),
    ("not-toml", "steps = = 1", "not valid TOML"),
]
TOML_CASES = [pytest.param(text, expect, id=name) for name, text, expect in TOML] + [
    pytest.param("[vsd]\nt_max = 5000", "schedule", id="vsd-t-max-beyond-the-schedule")]


@pytest.mark.parametrize("text, expect", TOML_CASES)
def test_run_refuses_bad_toml(pipeline, tmp_path, text, expect):
    folder, prompts = pipeline
    toml = tmp_path / "run.toml"
    write_case(toml, text if isinstance(text, bytes) else f'cache_dir = "{tmp_path / "cache"}"\n{text}\n')
    refused(tmp_path, ["run", "--teacher", folder, "--prompts", prompts, "--out", tmp_path / "run",
                       "--config", toml, "-q"], expect)


# --- run: command-line values and --config itself ---------------------------------------------------

CLI = [
    ("steps-zero", ["--steps", "0"], "steps"),
    ("steps-a-word", ["--steps", "ten"], "steps"),
    ("generator-rank-zero", ["--generator-rank", "0"], "generator-rank"),
    ("adapter-unknown", ["--adapter", "qlora"], "adapter"),
    ("mixed-precision-unknown", ["--mixed-precision", "fp8"], "mixed_precision"),
    ("seed-beyond-64-bits", ["--seed", str(2 ** 70)], "seed"),
    ("config-missing", ["--config", "{root}/missing.toml"], "missing.toml"),
    ("config-a-folder", ["--config", "{root}"], "cannot read config"),
]


@pytest.mark.parametrize("args, expect", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_run_refuses_bad_options(pipeline, tmp_path, args, expect):
    folder, prompts = pipeline
    args = [a.replace("{root}", str(tmp_path)) for a in args]
    refused(tmp_path, ["run", "--teacher", folder, "--prompts", prompts, "--out", tmp_path / "run", "-q", *args],
            expect)


# --- run: placement plans ---------------------------------------------------------------------------

PLANS = [  # (id, plan file content, what the message names)
    ("rank-true", {"format": "wadi-lorad-plan", "targets": {"down_blocks.0.attentions.0.proj_in": True}}, "rank"),
    ("rank-a-string", {"down_blocks.0.attentions.0.proj_in": "4"}, "rank"),
    ("rank-zero", {"format": "wadi-lorad-plan", "targets": {"down_blocks.0.attentions.0.proj_in": 0}}, "rank"),
    ("rank-a-float", {"format": "wadi-lorad-plan", "targets": {"down_blocks.0.attentions.0.proj_in": 2.5}}, "rank"),
    ("empty-module-name", {"format": "wadi-lorad-plan", "targets": {"": 4}}, "module name"),
    ("targets-a-list", {"format": "wadi-lorad-plan", "targets": ["a", "b"]}, "targets"),
    ("no-targets", {"format": "wadi-lorad-plan", "targets": {}}, "targets"),
    ("other-format", {"format": "something-else", "targets": {"a": 4}}, "format"),
    ("a-json-array", [1, 2], "JSON object"),
    ("not-json", "{ranks: 4", "not JSON"),
    ("not-utf-8", b'{"down_blocks.0": "\xff"}', "UTF-8"),
]


@pytest.mark.parametrize("content, expect", [c[1:] for c in PLANS], ids=[c[0] for c in PLANS])
def test_run_refuses_bad_plans(pipeline, tmp_path, content, expect):
    folder, prompts = pipeline
    plan = tmp_path / "plan.json"
    write_case(plan, content if isinstance(content, (bytes, str)) else json.dumps(content))
    toml = tmp_path / "run.toml"
    toml.write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    refused(tmp_path, ["run", "--teacher", folder, "--prompts", prompts, "--out", tmp_path / "run", "--plan", plan,
                       "--config", toml, "-q"], expect)


def test_run_refuses_a_missing_plan(pipeline, tmp_path):
    folder, prompts = pipeline
    refused(tmp_path, ["run", "--teacher", folder, "--prompts", prompts, "--out", tmp_path / "run",
                       "--plan", tmp_path / "missing.json", "-q"], "missing.json")


# --- teacher: options, --out, --init ----------------------------------------------------------------

TEACHER = [  # (id, arguments after --out {root}/t, what the message names)
    ("steps-zero", ["--steps", "0"], "--steps"),
    ("batch-size-zero", ["--batch-size", "0"], "--batch-size"),
    ("image-size-zero", ["--image-size", "0"], "--image-size"),
    ("image-size-not-halvable", ["--image-size", "10"], "--image-size"),
    ("channels-zero", ["--channels", "0"], "--channels"),
    ("channels-words", ["--channels", "a,b"], "--channels"),
    ("channels-empty", ["--channels", ""], "--channels"),
    ("channels-not-multiples-of-8", ["--channels", "12,24"], "--channels"),
    ("layers-per-block-zero", ["--layers-per-block", "0"], "--layers-per-block"),
    ("text-hidden-odd", ["--text-hidden", "3"], "--text-hidden"),
    ("device-tpu", ["--device", "tpu"], "--device"),
    ("lr-negative", ["--lr", "-1"], "--lr"),
    ("lr-nan", ["--lr", "nan"], "--lr"),
    ("ema-decay-one", ["--ema-decay", "1"], "--ema-decay"),
    ("save-every-negative", ["--save-every", "-1"], "--save-every"),
    ("stop-after-negative", ["--stop-after", "-2"], "--stop-after"),
    ("init-missing", ["--init", "{root}/missing"], "no such folder"),
    ("init-an-empty-folder", ["--init", "{root}/empty"], "not a teacher"),
    ("init-a-user-folder", ["--init", "{root}/user"], "not a teacher"),
    ("init-broken-configs", ["--init", "{root}/broken"], "not a loadable"),
    ("init-is-out", ["--init", "{root}/t"], "input"),
    ("vae-missing", ["--vae", "{root}/missing"], "not an AutoencoderKL folder"),
    ("vae-an-empty-folder", ["--vae", "{root}/empty"], "not an AutoencoderKL folder"),
    ("vae-broken-config", ["--vae", "{root}/brokenvae"], "not a loadable AutoencoderKL"),
    ("vae-is-out", ["--vae", "{root}/t"], "input"),
]


@pytest.fixture
def teacher_root(tmp_path) -> Path:
    """A case folder: the user's folder, an empty one, a teacher-shaped folder of broken configs, and
    an earlier teacher ``t`` (only its provenance: the cases never get as far as its weights)."""
    (tmp_path / "user").mkdir()
    (tmp_path / "user/keep.txt").write_text("the user's folder\n")
    (tmp_path / "empty").mkdir()
    for part in ("unet", "text_encoder"):
        (tmp_path / "broken" / part).mkdir(parents=True)
        (tmp_path / "broken" / part / "config.json").write_text("{not json")
    (tmp_path / "brokenvae").mkdir()
    (tmp_path / "brokenvae/config.json").write_text('{"_class_name": "AutoencoderKL", "block_out_channels": 7}')
    (tmp_path / "t").mkdir()
    (tmp_path / "t/wadi_teacher.json").write_text('{"step": 1}\n')
    (tmp_path / "file.txt").write_text("the user's file\n")
    return tmp_path


@pytest.mark.parametrize("args, expect", [c[1:] for c in TEACHER], ids=[c[0] for c in TEACHER])
def test_teacher_refuses_bad_options(teacher_root, args, expect):
    args = [a.replace("{root}", str(teacher_root)) for a in args]
    refused(teacher_root, ["teacher", "--out", teacher_root / "t", *args], expect)


OUTS = [  # (id, --out, what the message names)
    ("a-users-folder", "user", "--overwrite"),
    ("a-file", "file.txt", "is a file"),
    ("under-a-file", "file.txt/t", "is a file"),
]


@pytest.mark.parametrize("out, expect", [c[1:] for c in OUTS], ids=[c[0] for c in OUTS])
def test_teacher_refuses_outputs_it_must_not_replace(teacher_root, out, expect):
    refused(teacher_root, ["teacher", "--out", teacher_root / out, "--steps", "1"], expect)


VAE = [  # (id, arguments after `vae --out {root}/t`, what the message names)
    ("steps-zero", ["--steps", "0"], "--steps"),
    ("batch-size-zero", ["--batch-size", "0"], "--batch-size"),
    ("image-size-not-a-multiple-of-4", ["--image-size", "10"], "--image-size"),
    ("channels-two-levels", ["--channels", "16,32"], "--channels"),
    ("channels-words", ["--channels", "a,b,c"], "--channels"),
    ("latent-channels-zero", ["--latent-channels", "0"], "--latent-channels"),
    ("kl-weight-nan", ["--kl-weight", "nan"], "--kl-weight"),
    ("kl-weight-negative", ["--kl-weight", "-1"], "--kl-weight"),
    ("lr-zero", ["--lr", "0"], "--lr"),
    ("device-tpu", ["--device", "tpu"], "--device"),
]


@pytest.mark.parametrize("args, expect", [c[1:] for c in VAE], ids=[c[0] for c in VAE])
def test_vae_refuses_bad_options(teacher_root, args, expect):
    refused(teacher_root, ["vae", "--out", teacher_root / "t", *args], expect)


@pytest.mark.parametrize("out, expect", [c[1:] for c in OUTS], ids=[c[0] for c in OUTS])
def test_vae_refuses_outputs_it_must_not_replace(teacher_root, out, expect):
    refused(teacher_root, ["vae", "--out", teacher_root / out, "--steps", "1"], expect)


def test_teacher_refuses_an_init_that_does_not_fit(pipeline, tmp_path):
    """The tiny SD pipeline is a teacher folder, but of 4-channel latents, not grey 16 px images."""
    folder, _ = pipeline
    refused(tmp_path, ["teacher", "--out", tmp_path / "t", "--init", folder, "--steps", "1"], "input channels")


# --- datasets: malformed Fashion-MNIST IDX files ----------------------------------------------------

def _idx(*shape: int, data: bytes | None = None) -> bytes:
    """An unsigned-byte IDX file of ``shape`` (zeros unless ``data``)."""
    body = bytes(math.prod(shape)) if data is None else data
    return b"\x00\x00\x08" + bytes([len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + body


GOOD_IMAGES, GOOD_LABELS = gzip.compress(_idx(2, 4, 4)), gzip.compress(_idx(2))
DATASETS = [  # (id, images file bytes, labels file bytes, what the message names)
    ("images-not-gzip", b"not a gzip file", GOOD_LABELS, "not a gzip file"),
    ("images-gzip-truncated", GOOD_IMAGES[:20], GOOD_LABELS, "truncated"),
    ("images-wrong-magic", gzip.compress(b"\x01\x02" + _idx(2, 4, 4)[2:]), GOOD_LABELS, "not an unsigned-byte IDX"),
    ("images-too-short", gzip.compress(b"\x00"), GOOD_LABELS, "too short"),
    ("images-header-truncated", gzip.compress(_idx(2, 4, 4)[:8]), GOOD_LABELS, "header is truncated"),
    ("images-data-truncated", gzip.compress(_idx(2, 4, 4)[:-5]), GOOD_LABELS, "header says"),
    ("images-with-labels-dimensions", GOOD_LABELS, GOOD_LABELS, "dimensions"),
    ("labels-more-than-images", GOOD_IMAGES, gzip.compress(_idx(3)), "labels"),
    ("labels-beyond-the-classes", GOOD_IMAGES, gzip.compress(_idx(2, data=bytes([0, 12]))), "classes"),
    ("no-images", gzip.compress(_idx(0, 4, 4)), gzip.compress(_idx(0)), "no items"),
]


def _dataset_folder(root: Path, images: bytes, labels: bytes) -> Path:
    data = root / "fashion-mnist"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(images)
    (data / "train-labels-idx1-ubyte.gz").write_bytes(labels)
    return data


@pytest.mark.parametrize("images, labels, expect", [c[1:] for c in DATASETS], ids=[c[0] for c in DATASETS])
def test_teacher_refuses_malformed_datasets(tmp_path, images, labels, expect):
    data = _dataset_folder(tmp_path, images, labels)
    refused(tmp_path, ["teacher", "--out", tmp_path / "t", "--steps", "1"], expect,
            env={"WADI_FASHION_MNIST": str(data)})


def test_classifier_refuses_a_malformed_dataset(tmp_path):
    data = _dataset_folder(tmp_path, b"not a gzip file", GOOD_LABELS)
    refused(tmp_path, ["classifier", "--out", tmp_path / "c.safetensors"], "train-images-idx3-ubyte.gz",
            env={"WADI_FASHION_MNIST": str(data)})


def test_teacher_names_a_missing_dataset(tmp_path):
    refused(tmp_path, ["teacher", "--out", tmp_path / "t", "--steps", "1"], "Fashion-MNIST not found",
            env={"WADI_FASHION_MNIST": str(tmp_path / "nowhere")})


# --- help texts -------------------------------------------------------------------------------------

def test_run_help_shows_every_adapter_the_vsd_table_and_the_defaults():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "250"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0
    assert "lorad | lora | dora | full" in text and "a [vsd] table" in text
    for option, default in (("--steps", "default 100; without --teacher 1000"),
                            ("--batch-size", "default 4; without --teacher 16"),
                            ("--generator-rank", "default the preset's rank; without --teacher 32"),
                            ("--fake-rank", "default the preset's rank; without --teacher 4"),
                            ("--seed", "default 0")):
        assert default in text.split(f" {option} ", 1)[1][:120], option
