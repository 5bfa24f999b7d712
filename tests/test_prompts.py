"""Prompt files (issue 15, part 4): JourneyDB's nested .jsonl field, de-duplication and a seeded shuffle,
streaming in bounded memory, the cache key, the run's prompts.json, and bad input refused in one line."""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.support.hostile import check_refused, snapshot
from wadi_analysis.errors import InvalidValue
from wadi_distill.cli import app
from wadi_distill.config import load_config
from wadi_distill.teacher import Conditioning
from wadi_distill.runs import RunFolder
from wadi_distill.training.prompt_files import open_prompts, read_prompts
from wadi_distill.training.prompts import cache_key, cached_embeddings, encoder_fingerprint

CAPTIONS = ["a cat on a mat", "a dog", "a cat on a mat", "  ", "a bird, \"quoted\" — ünïcode", "a dog", "a fox"]


def journeydb(path: Path, captions=CAPTIONS) -> Path:
    """A JourneyDB-shaped .jsonl: the caption nested under Task2.Caption, other fields beside it."""
    lines = [json.dumps({"img_path": f"./{i}.jpg", "prompt": f"raw {i}", "Task2": {"Caption": c, "Category": "x"}})
             for i, c in enumerate(captions)]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_journeydb_field_dedupe_and_seeded_shuffle(tmp_path):
    path = journeydb(tmp_path / "journeydb.jsonl")
    plain = open_prompts(path, "Task2.Caption")
    assert list(plain) == ["a cat on a mat", "a dog", "a cat on a mat", 'a bird, "quoted" — ünïcode', "a dog", "a fox"]
    unique = open_prompts(path, "Task2.Caption", dedupe=True)
    assert list(unique) == ["a cat on a mat", "a dog", 'a bird, "quoted" — ünïcode', "a fox"]  # first kept
    shuffled = open_prompts(path, "Task2.Caption", dedupe=True, shuffle_seed=5)
    assert sorted(shuffled) == sorted(unique) and list(shuffled) == list(open_prompts(
        path, "Task2.Caption", dedupe=True, shuffle_seed=5))
    record = shuffled.manifest()
    assert record["count"] == 4 and record["prompts_read"] == 6 and record["duplicates_dropped"] == 2
    assert record["shuffle_seed"] == 5 and record["dedupe"] and record["field"] == "Task2.Caption"
    assert record["sha256"] == hashlib.sha256(json.dumps(list(shuffled)).encode()).hexdigest()
    assert shuffled.head(2) == list(shuffled)[:2]


def test_prompt_column_keeps_its_meaning(tmp_path):
    """A top-level key (even one holding a dot) and CSV columns read as before; .txt one prompt a line."""
    (tmp_path / "p.jsonl").write_text('{"prompt": " a ", "a.b": "dotted"}\n\n{"prompt": "b", "a.b": "x"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    assert read_prompts(tmp_path / "p.jsonl", "a.b") == ["dotted", "x"]
    (tmp_path / "p.csv").write_text('id,prompt\n1,"two\nlines"\n2,plain\n3,\n\n4,"say ""hi"""\n')
    assert read_prompts(tmp_path / "p.csv") == ["two\nlines", "plain", 'say "hi"']
    assert sorted(open_prompts(tmp_path / "p.csv", shuffle_seed=1)) == sorted(read_prompts(tmp_path / "p.csv"))
    (tmp_path / "p.txt").write_text("one\n\n two \r\nthree")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two", "three"]


def _write_many(path: Path, count: int, distinct: int) -> int:
    """``count`` JourneyDB lines over ``distinct`` ASCII captions of ~150 characters, written as generated;
    returns the bytes the prompts would take held as a list of strings."""
    held = 8 * count  # the list's pointers
    words = ["lighthouse", "storm", "watercolor", "cinematic", "neon", "forest", "portrait", "golden hour"]
    with open(path, "w", encoding="utf-8") as file:
        for i in range(count):
            k = (i * 7919) % distinct
            caption = f"{k:07d} " + " ".join(words[(k + j) % len(words)] for j in range(16))[:140]
            held += sys.getsizeof(caption)
            file.write(f'{{"img_path": "./{i}.jpg", "Task2": {{"Caption": "{caption}"}}}}\n')
    return held


def test_a_large_file_is_streamed_in_bounded_memory(tmp_path):
    """200k lines: preparing them takes well under what holding the strings would (~50 bytes a line
    against ~200), reading them back (hashing, embedding) holds one record at a time, and the order is
    fixed by the seed."""
    path = tmp_path / "big.jsonl"
    held = _write_many(path, 200_000, 150_000)
    tracemalloc.start()
    try:
        prompts = open_prompts(path, "Task2.Caption", dedupe=True, shuffle_seed=1)
        _, prepare_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        assert sum(1 for _ in itertools.islice(prompts, 20_000)) == 20_000
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(prompts) == 150_000 and prompts.stats["duplicates_dropped"] == 50_000
    assert prepare_peak < 0.35 * held, (prepare_peak, held)
    assert read_peak - start < 200_000, read_peak - start  # no growth with the prompts read
    again = open_prompts(path, "Task2.Caption", dedupe=True, shuffle_seed=1)
    assert (again.offsets == prompts.offsets).all()
    other = open_prompts(path, "Task2.Caption", dedupe=True, shuffle_seed=2)
    assert (other.offsets != prompts.offsets).any() and (np.sort(other.offsets) == np.sort(prompts.offsets)).all()


class FakeTeacher:
    """Just what the cache needs: a family, a pipeline without encoders, and encode()."""

    family = "sd"
    pipeline = SimpleNamespace()

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, prompts: list[str]) -> Conditioning:
        self.encoded += prompts
        codes = [[float(ord(ch)) for ch in (p + "   ")[:3]] for p in prompts]
        return Conditioning(torch.tensor(codes).reshape(len(prompts), 1, 3))


def test_cache_key_is_unchanged_and_a_prompt_set_is_embedded_in_order(tmp_path):
    teacher, path = FakeTeacher(), journeydb(tmp_path / "j.jsonl")
    prompts = open_prompts(path, "Task2.Caption", dedupe=True, shuffle_seed=3)
    listed = list(prompts)
    old = hashlib.sha256(json.dumps([encoder_fingerprint(teacher), teacher.family, listed]).encode()).hexdigest()[:24]
    assert cache_key(teacher, prompts) == cache_key(teacher, listed) == old  # existing entries still hit
    everything, null, hit = cached_embeddings(teacher, prompts, tmp_path / "cache", batch_size=3)
    assert not hit and teacher.encoded == [*listed, ""] and len(everything) == 4
    again, _, hit = cached_embeddings(FakeTeacher(), listed, tmp_path / "cache")
    assert hit and torch.equal(again.hidden_states, everything.hidden_states)


def test_config_rules_for_the_prompt_options(tmp_path):
    config = load_config(teacher="t", prompt_column="Task2.Caption", prompt_dedupe=True, prompt_shuffle_seed=7)
    assert (config.prompt_column, config.prompt_dedupe, config.prompt_shuffle_seed) == ("Task2.Caption", True, 7)
    assert load_config(teacher="t").prompt_shuffle_seed is None and not load_config(teacher="t").prompt_dedupe
    for key, value in (("prompt_shuffle_seed", -1), ("prompt_shuffle_seed", 2 ** 62), ("prompt_dedupe", "yes")):
        with pytest.raises(InvalidValue, match=key):
            load_config(teacher="t", **{key: value})


@pytest.mark.parametrize(("name", "content", "expect"), [
    ("missing.jsonl", '{"Task2": {"Caption": "ok"}}\n{"Task2": {"Other": 1}}\n', "missing.jsonl:2: no field 'Task2.Caption'"),
    ("top.jsonl", '{"Task2": {"Caption": "ok"}}\n\n{"Task1": 1}\n', "top.jsonl:3: no field 'Task2'"),
    ("number.jsonl", '{"Task2": {"Caption": 5}}\n', "number.jsonl:1: field 'Task2.Caption' is a number"),
    ("null.jsonl", '{"Task2": {"Caption": null}}\n', "is a null, not a string"),
    ("malformed.jsonl", '{"Task2": {"Caption": "ok"}}\n{"Task2": \n', "malformed.jsonl:2: not a JSON object (malformed"),
    ("array.jsonl", '[1, 2]\n', "array.jsonl:1: not a JSON object"),
    ("empty.jsonl", '{"Task2": {"Caption": "  "}}\n\n', "holds no prompts"),
    ("binary.jsonl", b'{"Task2": {"Caption": "ok"}}\n\xff\xfe\n', "binary.jsonl:2: not UTF-8"),
], ids=["missing-field", "missing-parent", "number", "null", "malformed", "not-an-object", "empty", "not-utf-8"])
def test_bad_prompt_files_are_refused_in_one_line(tmp_path, name, content, expect):
    """`wadi-distill run --prompt-field Task2.Caption` on a bad file: exit 2, one line naming the line,
    no traceback, nothing written, the file unchanged."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "pipe").mkdir()  # never loaded: the prompts are read first
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["run", "--teacher", str(tmp_path / "pipe"), "--prompts", str(path),
                                      "--prompt-field", "Task2.Caption", "--dedupe-prompts", "--shuffle-prompts", "3",
                                      "--out", str(tmp_path / "run"), "-q"])
    check_refused(result, tmp_path, before, expect)


@pytest.mark.parametrize(("args", "expect"), [
    (["--prompt-field", "Task2..Caption"], "not a dotted path"),
    (["--shuffle-prompts", "-1"], "prompt_shuffle_seed must be a non-negative integer"),
], ids=["empty-path-part", "negative-seed"])
def test_bad_prompt_options_are_refused_in_one_line(tmp_path, args, expect):
    path = journeydb(tmp_path / "j.jsonl")
    (tmp_path / "pipe").mkdir()
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["run", "--teacher", str(tmp_path / "pipe"), "--prompts", str(path), *args,
                                      "--out", str(tmp_path / "run"), "-q"])
    check_refused(result, tmp_path, before, expect)


def test_a_run_records_its_prompts(tmp_path):
    """A one-step run on the tiny SD teacher with JourneyDB-style prompts writes prompts.json, and
    config.json holds the options."""
    from tests.support.runs import config_for
    from tests.support.pipelines import tiny_sd_pipeline
    from wadi_distill.training.loop import train

    path = journeydb(tmp_path / "j.jsonl")
    config = config_for((tiny_sd_pipeline(tmp_path / "pipe"), path), tmp_path / "run", steps=1, checkpoint_every=1,
                        validate_every=1, prompt_column="Task2.Caption", prompt_dedupe=True, prompt_shuffle_seed=9)
    train(config)
    record = json.loads(RunFolder(tmp_path / "run").prompts_file.read_text())
    expected = list(open_prompts(path, "Task2.Caption", dedupe=True, shuffle_seed=9))
    assert record["count"] == 4 and record["shuffle_seed"] == 9 and record["duplicates_dropped"] == 2
    assert record["sha256"] == hashlib.sha256(json.dumps(expected).encode()).hexdigest()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["prompt_column"], saved["prompt_dedupe"], saved["prompt_shuffle_seed"]) == ("Task2.Caption", True, 9)


def test_the_embedding_cache_key_covers_sd3s_t5_encoder(tmp_path):
    """SD3's third text encoder (T5) is part of the fingerprint: changing one of its weights changes the key."""
    import torch

    from tests.support.pipelines import tiny_sd3_pipeline
    from wadi_distill.teacher import load_teacher
    from wadi_distill.training.prompts import encoder_fingerprint

    teacher = load_teacher(str(tiny_sd3_pipeline(tmp_path / "sd3")))
    before = encoder_fingerprint(teacher)
    with torch.no_grad():
        next(teacher.pipeline.text_encoder_3.parameters()).view(-1)[0] += 1.0
    assert encoder_fingerprint(teacher) != before


def test_the_embedding_cache_key_covers_sanas_prompt_instruction(tmp_path, monkeypatch):
    """SANA prepends its pipeline's default complex_human_instruction to every prompt: another default (a new
    diffusers release) is another embedding, so another key."""
    import inspect

    from diffusers import SanaPipeline

    from tests.support.pipelines import tiny_sana_pipeline
    from wadi_distill.teacher import load_teacher
    from wadi_distill.training.prompts import encoder_fingerprint

    teacher = load_teacher(str(tiny_sana_pipeline(tmp_path / "sana")))
    before = encoder_fingerprint(teacher)
    original = SanaPipeline.__call__

    def changed(self, *args, complex_human_instruction=["another instruction"], **kwargs):
        return original(self, *args, complex_human_instruction=complex_human_instruction, **kwargs)

    monkeypatch.setattr(SanaPipeline, "__call__", changed)
    assert "another instruction" in str(inspect.signature(SanaPipeline.__call__))
    assert encoder_fingerprint(teacher) != before
