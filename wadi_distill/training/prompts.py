"""Prompt sources and the prompt-embedding cache.

Prompts come from a text file (one per line), JSONL or CSV (a named column). Their embeddings are
computed once and cached on disk under a key made of the prompts and a fingerprint of the text
encoder(s) and tokenizer(s): a different encoder or prompt list misses the cache, never reuses it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import torch

from ..teacher import Conditioning, Teacher


def read_prompts(path: str | os.PathLike, column: str = "prompt") -> list[str]:
    """Non-empty prompts of a .txt, .jsonl or .csv file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read prompts {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(str(json.loads(line)[column]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{number}: not a JSON object with a {column!r} field") from None
    elif path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if column not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
        prompts = [row[column] for row in reader]
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def encoder_fingerprint(teacher: Teacher) -> str:
    """Hash of the text encoders' weights and the tokenizers' vocabularies."""
    digest = hashlib.sha256()
    pipe = teacher.pipeline
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            for key, tensor in sorted(encoder.state_dict().items()):
                flat = tensor.detach().reshape(-1).double()
                digest.update(f"{name}.{key}|{tuple(tensor.shape)}|{flat.sum().item():.12e}|"
                              f"{flat.square().sum().item():.12e}".encode())
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
            digest.update(str(tokenizer.model_max_length).encode())
    return digest.hexdigest()[:24]


def cached_embeddings(teacher: Teacher, prompts: list[str], cache_dir: str | os.PathLike,
                      batch_size: int = 64, warn=None) -> tuple[Conditioning, Conditioning, bool]:
    """(conditioning of every prompt, null-prompt conditioning, cache hit?) — computed once, then read.

    A damaged cache entry is a miss: it is recomputed and rewritten, and ``warn(line)`` says so."""
    cache_dir = Path(cache_dir)
    key = hashlib.sha256(json.dumps([encoder_fingerprint(teacher), teacher.family, prompts]).encode()).hexdigest()[:24]
    path = cache_dir / f"prompts-{key}.pt"
    if path.is_file():
        stored = _read_entry(path, len(prompts))
        if stored is not None:
            return stored[0], stored[1], True
        if warn is not None:
            warn(f"warning: the prompt-embedding cache entry {path} is damaged; recomputing and rewriting it")
    parts = [teacher.encode(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    everything, null = Conditioning.cat(parts), teacher.encode([""])
    cache_dir.mkdir(parents=True, exist_ok=True)
    from wadi_analysis.atomic import atomic_write

    state = {"all": {"hidden_states": everything.hidden_states, "extra": everything.extra},
             "null": {"hidden_states": null.hidden_states, "extra": null.extra}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return everything, null, False


def _read_entry(path: Path, count: int) -> tuple[Conditioning, Conditioning] | None:
    """A cache entry's (all, null) conditioning, or None when it is not one (damaged, truncated, foreign);
    read with ``weights_only``, so a tampered entry never runs code."""
    try:
        stored = torch.load(path, weights_only=True)
        parts = [stored[name] for name in ("all", "null")]
        conditionings = [Conditioning(part["hidden_states"], part["extra"]) for part in parts]
    except Exception:  # unpickling, zip or key errors of a damaged file all mean: recompute
        return None
    for conditioning, rows in zip(conditionings, (count, 1)):
        states = conditioning.hidden_states
        if (not isinstance(states, torch.Tensor) or not isinstance(conditioning.extra, dict) or states.ndim != 3
                or states.shape[0] != rows or not states.is_floating_point() or not torch.isfinite(states).all()):
            return None
    if conditionings[0].hidden_states.shape[1:] != conditionings[1].hidden_states.shape[1:]:
        return None
    return conditionings[0], conditionings[1]
