"""Hostile inputs to wadi-distill's runs, resume, exports, samples, adapter files and evaluation files
(issue 12): each is refused with one ``error:`` line, exit 2, and every file under the case's folder
unchanged (tests/support/hostile.py). One tiny finished run is trained once; each case copies it (and
its teacher) into its own folder before tampering."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from tests.support.hostile import MARKER, check_refused, snapshot
from tests.support.runs import config_for, sd_teacher_with_prompts
from wadi_distill.cli import app
from wadi_distill.export import export_run
from wadi_distill.training.loop import train

CHECKPOINT = Path("run/checkpoints/step-0000002")
ADAPTER = Path("run/generator_adapter.safetensors")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A finished 2-step LoRaD run (one checkpoint, at step 2) beside its teacher and prompts."""
    base = tmp_path_factory.mktemp("hostile-runs")
    pipeline = sd_teacher_with_prompts(base)
    train(config_for(pipeline, base / "run", steps=2, checkpoint_every=2))
    export_run(base / "run", base / "export")
    lora_file(base)
    return base


def lora_file(base: Path) -> None:
    """A LoRA adapter file (peft, diffusers' layout) on the LoRaD run's targets."""
    from wadi_distill import adapters
    from wadi_distill.teacher import load_denoiser

    with safe_open(str(base / ADAPTER), "pt") as handle:
        targets = json.loads(handle.metadata()["ranks"])
    model = load_denoiser(base / "pipe")
    adapters.attach(model, "lora", {name: 2 for name in targets}, name="generator")
    adapters.save_adapter(model, "generator", base / "lora.safetensors")


@pytest.fixture
def root(pristine, tmp_path) -> Path:
    """The case's folder: a copy of the run and its teacher; config.json names the copies."""
    root = tmp_path / "case"
    root.mkdir()
    for name in ("run", "prompts.txt", "lora.safetensors"):  # what cases tamper with: copies
        (shutil.copytree if (pristine / name).is_dir() else shutil.copy)(pristine / name, root / name)
    for name in ("pipe", "export"):  # only read (or refused as outputs): hard links, which are cheap
        shutil.copytree(pristine / name, root / name, copy_function=os.link)
    (root / "export/wadi_one_step.json").unlink()  # tampered by some cases: a copy of its own
    shutil.copy(pristine / "export/wadi_one_step.json", root / "export/wadi_one_step.json")
    config = json.loads((root / "run/config.json").read_text())
    config.update(teacher=str(root / "pipe"), prompts=str(root / "prompts.txt"), out=str(root / "run"))
    (root / "run/config.json").write_text(json.dumps(config, indent=2) + "\n")
    info = json.loads((root / "export/wadi_one_step.json").read_text())
    (root / "export/wadi_one_step.json").write_text(json.dumps({**info, "teacher": str(root / "pipe")}))
    (root / "file.txt").write_text("the user's file\n")
    (root / "user").mkdir()
    (root / "user/keep.txt").write_text("the user's folder\n")
    (root / "run.toml").write_text(resume_toml(root, pristine / "embedding-cache"))
    return root


def resume_toml(root: Path, cache: Path, **changes) -> str:
    """The run's own options, for 4 steps (its checkpoint is at 2), with ``changes``."""
    values = dict(teacher=str(root / "pipe"), prompts=str(root / "prompts.txt"), out=str(root / "run"), steps=4,
                  batch_size=2, cache_dir=str(cache), generator_rank=4, fake_rank=2, checkpoint_every=2,
                  validate_every=4, keep_checkpoints=5)
    values.update(changes)
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


class Payload:
    """Unpickling this would write the marker file: a refused pickle never runs it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return (exec, (f"open({str(self.folder / MARKER)!r}, 'w').write('x')",))


# --------------------------------------------------------------------------- tampering helpers
def write_bytes(relative: str | Path):
    return lambda root: (root / relative).write_bytes(os.urandom(256))


def write_text(relative: str | Path, text: str):
    return lambda root: (root / relative).write_text(text)


def edit_tensors(relative: str | Path, change):
    """Rewrite a safetensors file with ``change(tensors)`` applied, metadata kept."""
    def tamper(root: Path) -> None:
        path = root / relative
        with safe_open(str(path), "pt") as handle:
            tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
        change(tensors)
        save_file(tensors, str(path), metadata=metadata)
    return tamper


def edit_metadata(relative: str | Path, change):
    """Rewrite a safetensors file with ``change(metadata)`` applied, tensors kept."""
    def tamper(root: Path) -> None:
        path = root / relative
        with safe_open(str(path), "pt") as handle:
            tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        change(metadata)
        save_file(tensors, str(path), metadata=metadata)
    return tamper


def edit_config(change):
    def tamper(root: Path) -> None:
        path = root / "run/config.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return tamper


def edit_info(change):
    def tamper(root: Path) -> None:
        path = root / "export/wadi_one_step.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return tamper


def without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


def drop_first(tensors: dict) -> None:
    del tensors[first_key(tensors)]


def set_first(value: float):
    def change(tensors: dict) -> None:
        tensors[first_key(tensors)][0, 0] = value
    return change


def narrow_first(tensors: dict) -> None:
    key = first_key(tensors)
    tensors[key] = tensors[key][:, :1].contiguous()


def swap_optimizer_states(root: Path) -> None:
    path = root / CHECKPOINT / "optimizers.pt"
    states = torch.load(path, weights_only=True)
    torch.save({"generator": states["fake"], "fake": states["generator"]}, path)


def symlink(relative: str | Path, target: str = "file.txt"):
    def tamper(root: Path) -> None:
        (root / relative).unlink()
        (root / relative).symlink_to(root / target)
    return tamper


def groupnorm_target(metadata: dict) -> None:
    ranks = json.loads(metadata["ranks"])
    ranks["down_blocks.0.resnets.0.norm1"] = ranks.pop(sorted(ranks)[0])
    metadata["ranks"] = json.dumps(ranks)


def groupnorm_tensors(tensors: dict) -> None:
    key = sorted(tensors)[0].rsplit(".", 1)[0]
    rank = tensors[f"{key}.lorad_A"].shape[1]
    del tensors[f"{key}.lorad_A"], tensors[f"{key}.lorad_B"]
    tensors["down_blocks.0.resnets.0.norm1.lorad_A"] = torch.zeros(32, rank)
    tensors["down_blocks.0.resnets.0.norm1.lorad_B"] = torch.zeros(rank, 1)


def both(*tampers):
    def tamper(root: Path) -> None:
        for t in tampers:
            t(root)
    return tamper


def nothing(root: Path) -> None:
    pass


# --------------------------------------------------------------------------- the corpus
RESUME = ["run", "--config", "{root}/run.toml", "--resume", "latest", "--quiet"]
EXPORT = ["export", "{root}/run", "--out", "{root}/export"]
SAMPLE = ["sample", "{root}/run", "-p", "a bag", "--n", "1", "--out", "{root}/images"]
INFO = ["adapter-info", "{root}/" + str(ADAPTER)]
MERGE = ["merge", "{root}/pipe", "{root}/" + str(ADAPTER), "--out", "{root}/merged"]
LORA = "lora.safetensors"
SAMPLE_EXPORT = ["sample", "{root}/export", "-p", "a bag", "--n", "1", "--out", "{root}/images"]
INFO_LORA = ["adapter-info", "{root}/lora.safetensors"]
MERGE_LORA = ["merge", "{root}/pipe", "{root}/lora.safetensors", "--out", "{root}/merged"]
EVALUATE = ["evaluate", "{root}/run", "--per-class", "4", "--classifier", "{root}/classifier.safetensors"]


def classifier_file(tensors=None, metadata=None):
    def tamper(root: Path) -> None:
        from wadi_distill.evaluation.classifier import Classifier

        state = tensors if tensors is not None else {k: v.contiguous() for k, v in Classifier().state_dict().items()}
        save_file(state, str(root / "classifier.safetensors"), metadata=metadata)
    return tamper


GOOD_CLASSIFIER = classifier_file(metadata={"config": json.dumps(dict(num_classes=10, image_size=16, width=32,
                                                                     features=128))})

CASES = [
    # --- resume of a tampered run (issue 12, part 2)
    ("resume-generator-random-bytes", write_bytes(CHECKPOINT / "generator.safetensors"), RESUME, "generator.safetensors"),
    ("resume-fake-random-bytes", write_bytes(CHECKPOINT / "fake.safetensors"), RESUME, "fake.safetensors"),
    ("resume-generator-missing-tensor", edit_tensors(CHECKPOINT / "generator.safetensors", drop_first), RESUME, "missing"),
    ("resume-generator-nan", edit_tensors(CHECKPOINT / "generator.safetensors", set_first(float("nan"))), RESUME, "finite"),
    ("resume-generator-other-rank", nothing, ["run", "--config", "{root}/run.toml.rank8", "--resume",
                                                                 "latest", "-q"], "shape"),
    ("resume-optimizers-pickle-payload", lambda root: torch.save(Payload(root), root / CHECKPOINT / "optimizers.pt"),
     RESUME, "optimizers.pt"),
    ("resume-optimizers-random-bytes", write_bytes(CHECKPOINT / "optimizers.pt"), RESUME, "optimizers.pt"),
    ("resume-optimizers-wrong-structure", lambda root: torch.save({"x": 1}, root / CHECKPOINT / "optimizers.pt"),
     RESUME, "optimiser"),
    ("resume-optimizers-swapped-roles", swap_optimizer_states, RESUME, "optimiser"),
    ("resume-step-not-an-int", write_text(CHECKPOINT / "state.json", '{"step": "abc"}'), RESUME, "positive integer"),
    ("resume-step-a-float", write_text(CHECKPOINT / "state.json", '{"step": 2.5}'), RESUME, "positive integer"),
    ("resume-step-a-bool", write_text(CHECKPOINT / "state.json", '{"step": true}'), RESUME, "positive integer"),
    ("resume-step-not-its-folder", write_text(CHECKPOINT / "state.json", '{"step": 7}'), RESUME, "step-0000002"),
    ("resume-state-not-json", write_text(CHECKPOINT / "state.json", "{"), RESUME, "state.json"),
    ("resume-rng-random-bytes", write_bytes(CHECKPOINT / "rng-0.pt"), RESUME, "rng-0.pt"),
    ("resume-rng-wrong-tensor", lambda root: torch.save({"rng": torch.zeros(3)}, root / CHECKPOINT / "rng-0.pt"),
     RESUME, "random-generator state"),
    ("resume-rng-not-a-dict", lambda root: torch.save([1, 2], root / CHECKPOINT / "rng-0.pt"), RESUME, "rng-0.pt"),
    ("resume-two-process-checkpoint", lambda root: shutil.copy(root / CHECKPOINT / "rng-0.pt", root / CHECKPOINT / "rng-1.pt"),
     RESUME, "2 process"),
    ("resume-metrics-symlink", symlink("run/metrics.csv"), RESUME, "symbolic link"),
    ("resume-config-symlink", symlink("run/config.json"), RESUME, "symbolic link"),
    ("resume-metrics-not-metrics", write_text("run/metrics.csv", "a,b\nx,y\n"), RESUME, "metrics"),
    ("resume-a-folder-that-is-no-checkpoint", nothing, RESUME[:-3] + ["--resume", "{root}/run", "-q"], "checkpoint"),
    # --- where a run writes (issue 12, part 1)
    ("run-out-is-the-teacher", nothing, ["run", "--config", "{root}/run.toml", "--out", "{root}/pipe", "-q"], "is the input"),
    ("run-out-inside-the-teacher", nothing, ["run", "--config", "{root}/run.toml", "--out", "{root}/pipe/run", "-q"],
     "lies inside"),
    ("run-out-under-a-file", nothing, ["run", "--config", "{root}/run.toml", "--out", "{root}/file.txt/run", "-q"],
     "is a file"),
    ("run-out-is-a-file", nothing, ["run", "--config", "{root}/run.toml", "--out", "{root}/file.txt", "-q"], "is a file"),
    # --- export (parts 1 and 2)
    ("export-out-is-the-run", nothing, ["export", "{root}/run", "--out", "{root}/run"], "is the run"),
    ("export-out-is-the-runs-checkpoints", nothing, ["export", "{root}/run", "--out", "{root}/run/checkpoints"],
     "the run's own checkpoints"),
    ("export-out-inside-the-runs-samples", nothing, ["export", "{root}/run", "--out", "{root}/run/samples/x"],
     "the run's own samples"),
    ("export-out-is-the-runs-config", nothing, ["export", "{root}/run", "--out", "{root}/run/config.json"],
     "the run's own config.json"),
    ("export-out-contains-the-run", nothing, ["export", "{root}/run", "--out", "{root}"], "contains the run"),
    ("export-out-is-the-teacher", nothing, ["export", "{root}/run", "--out", "{root}/pipe"], "is the input"),
    ("export-out-under-a-file", nothing, ["export", "{root}/run", "--out", "{root}/file.txt/export"], "is a file"),
    ("export-out-is-a-file", nothing, ["export", "{root}/run", "--out", "{root}/file.txt"], "is a file"),
    ("export-out-is-a-user-folder", nothing, ["export", "{root}/run", "--out", "{root}/user"], "non-empty folder"),
    ("export-out-is-a-symlink", lambda root: (root / "link").symlink_to(root / "user"),
     ["export", "{root}/run", "--out", "{root}/link"], "symbolic link"),
    ("export-out-in-proc", nothing, ["export", "{root}/run", "--out", "/proc/wadi-export"], ""),
    ("export-config-without-adapter", edit_config(without("adapter")), EXPORT, "adapter"),
    ("export-config-without-vsd", edit_config(without("vsd")), EXPORT, "vsd"),
    ("export-config-vsd-unknown-key", edit_config(lambda c: {**c, "vsd": {**c["vsd"], "extra": 1}}), EXPORT, "vsd"),
    ("export-config-vsd-wrong-type", edit_config(lambda c: {**c, "vsd": {**c["vsd"], "t_min": "x"}}), EXPORT, "t_min"),
    ("export-config-teacher-a-number", edit_config(lambda c: {**c, "teacher": 5}), EXPORT, "teacher"),
    ("export-config-a-list", write_text("run/config.json", "[1, 2]"), EXPORT, "JSON object"),
    ("export-config-not-json", write_text("run/config.json", "{"), EXPORT, "JSON"),
    ("export-adapter-random-bytes", write_bytes(ADAPTER), EXPORT, "safetensors"),
    ("export-adapter-nan-angles", edit_tensors(ADAPTER, set_first(float("nan"))), EXPORT, "NaN"),
    # --- sample
    ("sample-out-is-the-run", nothing, SAMPLE[:-1] + ["{root}/run"], "is the run"),
    ("sample-out-is-the-runs-checkpoint", nothing, SAMPLE[:-1] + ["{root}/" + str(CHECKPOINT)], "own checkpoints"),
    ("sample-out-under-a-file", nothing, SAMPLE[:-1] + ["{root}/file.txt/images"], "is a file"),
    ("sample-out-is-a-user-folder", nothing, SAMPLE[:-1] + ["{root}/user"], "non-empty folder"),
    ("sample-config-without-adapter", edit_config(without("adapter")), SAMPLE, "adapter"),
    ("sample-config-teacher-config-a-list", edit_config(lambda c: {**c, "teacher_config": ["a"]}), SAMPLE,
     "teacher_config"),
    # --- adapter files (part 3)
    ("adapter-info-without-ranks", edit_metadata(ADAPTER, lambda m: m.pop("ranks")), INFO, "ranks"),
    ("adapter-info-ranks-not-json", edit_metadata(ADAPTER, lambda m: m.update(ranks="{")), INFO, "not JSON"),
    ("adapter-info-ranks-a-list", edit_metadata(ADAPTER, lambda m: m.update(ranks="[4]")), INFO, "ranks"),
    ("adapter-info-rank-abc", edit_metadata(ADAPTER, lambda m: m.update(
        ranks=json.dumps({k: "abc" for k in json.loads(m["ranks"])}))), INFO, "positive integer"),
    ("adapter-info-rank-zero", edit_metadata(ADAPTER, lambda m: m.update(
        ranks=json.dumps({k: 0 for k in json.loads(m["ranks"])}))), INFO, "positive integer"),
    ("adapter-info-without-pairing", edit_metadata(ADAPTER, lambda m: m.pop("pairing")), INFO, "pairing"),
    ("adapter-info-without-name", edit_metadata(ADAPTER, lambda m: m.pop("adapter_name")), INFO, "adapter_name"),
    ("adapter-info-tensor-of-the-wrong-shape", edit_tensors(ADAPTER, narrow_first), INFO, "shapes"),
    ("adapter-info-a-tensor-missing", edit_tensors(ADAPTER, drop_first), INFO, "do not match"),
    ("adapter-info-random-bytes", write_bytes(ADAPTER), INFO, "safetensors"),
    ("adapter-info-an-empty-file", write_text(ADAPTER, ""), INFO, "safetensors"),
    ("adapter-info-a-folder", nothing, ["adapter-info", "{root}/user"], "user"),
    ("adapter-info-a-missing-file", nothing, ["adapter-info", "{root}/missing.safetensors"], "does not exist"),
    ("adapter-info-not-lorad-format", edit_metadata(ADAPTER, lambda m: m.update(format="other")), INFO, "not a LoRaD"),
    ("adapter-info-angles-not-float", edit_tensors(ADAPTER, lambda t: t.update(
        {first_key(t): t[first_key(t)].to(torch.int32)})), INFO, "not float"),
    ("merge-nan-angles", edit_tensors(ADAPTER, set_first(float("nan"))), MERGE, "NaN"),
    ("merge-inf-angles", edit_tensors(ADAPTER, set_first(float("inf"))), MERGE, "infinite"),
    ("merge-target-a-groupnorm", both(edit_metadata(ADAPTER, groupnorm_target), edit_tensors(ADAPTER, groupnorm_tensors)),
     MERGE, "GroupNorm"),
    ("merge-out-is-the-base", nothing, MERGE[:-1] + ["{root}/pipe"], "not empty"),
    ("merge-out-inside-the-base", nothing, MERGE[:-1] + ["{root}/pipe/merged"], "lies inside"),
    ("merge-out-under-a-file", nothing, MERGE[:-1] + ["{root}/file.txt/merged"], "is a file"),
    ("merge-out-is-a-file", nothing, MERGE[:-1] + ["{root}/file.txt"], "is a file"),
    ("sample-export-info-not-json", write_text("export/wadi_one_step.json", "{"), SAMPLE_EXPORT, "JSON"),
    ("sample-export-alpha-a-string", edit_info(lambda i: {**i, "alpha_T": "x"}), SAMPLE_EXPORT, "alpha_T"),
    ("sample-export-alpha-above-one", edit_info(lambda i: {**i, "alpha_T": 2.0}), SAMPLE_EXPORT, "alpha_T"),
    ("sample-export-without-teacher", edit_info(without("teacher")), SAMPLE_EXPORT, "teacher"),
    ("sample-out-is-the-export", nothing, SAMPLE_EXPORT[:-1] + ["{root}/export"], "is the input"),
    ("lora-info-targets-not-json", edit_metadata(LORA, lambda m: m.update(targets="{")), INFO_LORA, "not JSON"),
    ("lora-info-targets-an-object", edit_metadata(LORA, lambda m: m.update(targets="{}")), INFO_LORA, "list"),
    ("lora-info-without-name", edit_metadata(LORA, lambda m: m.pop("adapter_name")), INFO_LORA, "adapter_name"),
    ("lora-info-method-unknown", edit_metadata(LORA, lambda m: m.update(method="vera")), INFO_LORA, "method"),
    ("lora-info-nan-tensor", edit_tensors(LORA, set_first(float("nan"))), INFO_LORA, "NaN"),
    ("lora-merge-config-a-list", edit_metadata(LORA, lambda m: m.update(lora_adapter_metadata="[1]")), MERGE_LORA,
     "lora_adapter_metadata"),
    ("lora-merge-config-unknown-option", edit_metadata(LORA, lambda m: m.update(
        lora_adapter_metadata=json.dumps({"unet.bogus": 1}))), MERGE_LORA, "lora_adapter_metadata"),
    ("lora-merge-inf-tensor", edit_tensors(LORA, set_first(float("inf"))), MERGE_LORA, "infinite"),
    ("merge-out-in-proc", nothing, MERGE[:-1] + ["/proc/wadi-merged"], ""),
    # --- evaluation files (part 4)
    ("evaluate-classifier-random-bytes", write_bytes("classifier.safetensors"), EVALUATE, "classifier"),
    ("evaluate-classifier-without-metadata", classifier_file(), EVALUATE, "metadata"),
    ("evaluate-classifier-config-not-json", classifier_file(metadata={"config": "{"}), EVALUATE, "not JSON"),
    ("evaluate-classifier-config-a-list", classifier_file(metadata={"config": "[1]"}), EVALUATE, "config"),
    ("evaluate-classifier-other-tensors", classifier_file(tensors={"w": torch.zeros(2)},
                                                          metadata={"config": "{}"}), EVALUATE, "tensors"),
    ("evaluate-json-under-a-file", GOOD_CLASSIFIER, EVALUATE + ["--json", "{root}/file.txt/out.json"], "is a file"),
    ("evaluate-json-is-a-folder", GOOD_CLASSIFIER, EVALUATE + ["--json", "{root}/user"], "is a folder"),
    ("evaluate-json-is-the-runs-metrics", GOOD_CLASSIFIER, EVALUATE + ["--json", "{root}/run/metrics.csv"],
     "own metrics.csv"),
    ("evaluate-json-is-the-classifier", GOOD_CLASSIFIER, EVALUATE + ["--json", "{root}/classifier.safetensors"],
     "is the input"),
    ("classifier-out-under-a-file", nothing, ["classifier", "--out", "{root}/file.txt/c.safetensors"], "is a file"),
    ("classifier-out-is-a-folder", nothing, ["classifier", "--out", "{root}/user"], "is a folder"),
    # --- reproduce (part 1)
    ("reproduce-out-under-a-file", nothing, ["reproduce", "--quick", "--out", "{root}/file.txt/r"], "is a file"),
    ("reproduce-out-is-a-file", nothing, ["reproduce", "--quick", "--out", "{root}/file.txt"], "is a file"),
    ("reproduce-out-is-a-user-folder", nothing, ["reproduce", "--quick", "--out", "{root}/user"], "non-empty folder"),
    ("reproduce-out-is-a-symlink", lambda root: (root / "link").symlink_to(root / "user"),
     ["reproduce", "--quick", "--out", "{root}/link"], "symbolic link"),
]


@pytest.mark.parametrize("case_id, tamper, args, expect", CASES, ids=[c[0] for c in CASES])
def test_refused(root, pristine, case_id, tamper, args, expect):
    tamper(root)
    cache = pristine / "embedding-cache"
    # options the TOML of a case needs (written before the snapshot: they are the case's inputs)
    (root / "run.toml.rank8").write_text(resume_toml(root, cache, generator_rank=8))
    before = snapshot(root)
    result = CliRunner().invoke(app, [a.replace("{root}", str(root)) for a in args])
    check_refused(result, root, before, expect)


@pytest.mark.parametrize("out", ["fresh", "user"], ids=["a-new-folder", "a-user-folder"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(root, pristine, monkeypatch, out):
    """Non-finite generator losses end the run at step 3, before its first checkpoint (step 10): the folder
    it made is removed, a folder that existed keeps exactly what it held."""
    from wadi_distill.training import loop

    real = loop.generator_step

    def diverging(*args, **kwargs):
        loss, x0 = real(*args, **kwargs)
        return loss * float("nan"), x0

    monkeypatch.setattr(loop, "generator_step", diverging)
    (root / "fresh.toml").write_text(resume_toml(root, pristine / "embedding-cache", out=str(root / out), steps=12,
                                                 checkpoint_every=10, validate_every=10, max_nonfinite_in_a_row=2))
    before = snapshot(root)
    result = CliRunner().invoke(app, ["run", "--config", str(root / "fresh.toml"), "-q"])
    check_refused(result, root, before, "non-finite")


@pytest.mark.parametrize("damage", [
    lambda path: path.write_bytes(path.read_bytes()[:100]),
    lambda path: torch.save({"all": {"hidden_states": torch.zeros(1, 2, 3), "extra": {}}}, path),
], ids=["truncated", "wrong-structure"])
def test_a_damaged_embedding_cache_entry_is_a_miss_rewritten(root, pristine, damage):
    """A damaged entry does not break every later run: it is recomputed and rewritten, with one warning."""
    from wadi_distill.training.prompts import _read_entry

    cache = root / "cache"
    shutil.copytree(pristine / "embedding-cache", cache)
    (entry,) = cache.glob("prompts-*.pt")
    damage(entry)
    (root / "fresh.toml").write_text(resume_toml(root, cache, out=str(root / "fresh"), steps=1, checkpoint_every=1,
                                                 validate_every=1))
    result = CliRunner().invoke(app, ["run", "--config", str(root / "fresh.toml"), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("\n") == 1 and "cache entry" in result.stderr and "damaged" in result.stderr
    assert _read_entry(entry, 3) is not None  # rewritten whole (the prompt file holds 3 prompts)


@pytest.mark.parametrize("out", ["new", "empty"])
def test_a_failed_reproduction_leaves_nothing(root, monkeypatch, out):
    """reproduce fails after it made its folder: the folder it made is gone, an empty one stays empty."""
    from wadi_distill.experiments import reproduce

    def failing(settings, final):
        (root / out / "runs").mkdir()  # something written before the failure
        raise ValueError("the teacher cannot be evaluated")

    monkeypatch.setattr(reproduce, "teacher_rows", failing)
    monkeypatch.setattr(reproduce, "Benchmark", lambda per_class: None)
    if out == "empty":
        (root / out).mkdir()
    before = snapshot(root)
    result = CliRunner().invoke(app, ["reproduce", "--quick", "--out", str(root / out)])
    check_refused(result, root, before, "cannot be evaluated")


def test_a_refused_resume_with_a_damaged_cache_entry_says_one_line(root, pristine, tmp_path):
    cache = tmp_path / "cache"  # outside the case folder: the entry is rewritten before the refusal
    shutil.copytree(pristine / "embedding-cache", cache)
    for entry in cache.glob("prompts-*.pt"):
        entry.write_bytes(os.urandom(64))
    (root / "run.toml").write_text(resume_toml(root, cache))
    write_bytes(CHECKPOINT / "generator.safetensors")(root)
    before = snapshot(root)
    result = CliRunner().invoke(app, ["run", "--config", str(root / "run.toml"), "--resume", "latest", "-q"])
    check_refused(result, root, before, "generator.safetensors")


def test_an_export_inside_its_run_as_the_quick_start_does(root):
    """`export RUN --out RUN/one-step` writes a new folder of the run's and touches none of its files; a
    second export replaces the first (its own output)."""
    run_files = {k: v for k, v in snapshot(root / "run").items()}
    for _ in range(2):
        result = CliRunner().invoke(app, ["export", str(root / "run"), "--out", str(root / "run/one-step")])
        assert result.exit_code == 0, result.output
    after = snapshot(root / "run")
    assert {k: v for k, v in after.items() if not k.startswith("one-step")} == run_files
    assert (root / "run/one-step/one_step.safetensors").is_file()
    assert not [p for p in (root / "run").iterdir() if p.name.startswith(".")]  # no staging debris


def test_overwrite_lets_export_and_sample_replace_a_user_folder(root):
    """What a command's --overwrite passes to the library: the user's folder is replaced whole."""
    from wadi_distill.sampling import write_samples

    export_run(root / "run", root / "user", overwrite=True)
    assert (root / "user/one_step.safetensors").is_file() and not (root / "user/keep.txt").exists()
    (root / "user2").mkdir()
    (root / "user2/keep.txt").write_text("x")
    write_samples(root / "run", ["a bag"], 1, root / "user2", overwrite=True)
    assert sorted(p.name for p in (root / "user2").iterdir()) == ["000-00.png", "grid.png"]
