"""The prompt-embedding cache (prompt files are :mod:`.prompt_files`'s).

Embeddings are computed once and cached on disk under a key made of the prompts and a fingerprint of
the text encoder(s) and tokenizer(s): a different encoder or prompt list misses the cache, never reuses
it. The prompts are streamed (a :class:`~.prompt_files.PromptSet` reads them back from its file), so
only the embeddings are held in memory.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ..teacher import Conditioning, Teacher
from .prompt_files import PromptSet, json_list_chunks, read_prompts

__all__ = ["cached_embeddings", "encoder_fingerprint", "read_prompts"]  # read_prompts: where callers import it


def encoder_fingerprint(teacher: Teacher) -> str:
    """Hash of the text encoders' weights, the tokenizers' vocabularies and any instruction the pipeline puts
    before each prompt."""
    digest = hashlib.sha256()
    pipe = teacher.pipeline
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # SD3: CLIP-L, CLIP-G, T5
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            for key, tensor in sorted(encoder.state_dict().items()):
                flat = tensor.detach().reshape(-1).double()
                digest.update(f"{name}.{key}|{tuple(tensor.shape)}|{flat.sum().item():.12e}|"
                              f"{flat.square().sum().item():.12e}".encode())
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
            digest.update(str(tokenizer.model_max_length).encode())
    # text the pipeline puts before every prompt (SANA's complex_human_instruction) is part of its embedding
    instruction = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
    if instruction is not None:
        digest.update(json.dumps(instruction.default).encode())
    return digest.hexdigest()[:24]


def cache_key(teacher: Teacher, prompts: Iterable[str]) -> str:
    """sha256 of ``json.dumps([fingerprint, family, list(prompts)])`` (the key entries have always had),
    hashed streaming so that the prompt list is never built."""
    digest = hashlib.sha256(f"[{json.dumps(encoder_fingerprint(teacher))}, {json.dumps(teacher.family)}, ".encode())
    for chunk in json_list_chunks(prompts):
        digest.update(chunk)
    digest.update(b"]")
    return digest.hexdigest()[:24]


def cached_embeddings(teacher: Teacher, prompts: Sequence[str] | PromptSet, cache_dir: str | os.PathLike,
                      batch_size: int = 64, warn=None) -> tuple[Conditioning, Conditioning, bool]:
    """(conditioning of every prompt, null-prompt conditioning, cache hit?) — computed once, then read.
    ``prompts``: a list or a :class:`~.prompt_files.PromptSet` (iterated twice on a miss: key, then batches).

    A damaged cache entry is a miss: it is recomputed and rewritten, and ``warn(line)`` says so."""
    cache_dir = Path(cache_dir)
    key = cache_key(teacher, prompts)
    path = cache_dir / f"prompts-{key}.pt"
    if path.is_file():
        stored = _read_entry(path, len(prompts))
        if stored is not None:
            return stored[0], stored[1], True
        if warn is not None:
            warn(f"warning: the prompt-embedding cache entry {path} is damaged; recomputing and rewriting it")
    parts = [teacher.encode(batch) for batch in _batches(prompts, batch_size)]
    everything, null = Conditioning.cat(parts), teacher.encode([""])
    cache_dir.mkdir(parents=True, exist_ok=True)
    from wadi_analysis.atomic import atomic_write

    state = {"all": {"hidden_states": everything.hidden_states, "extra": everything.extra},
             "null": {"hidden_states": null.hidden_states, "extra": null.extra}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return everything, null, False


def _batches(prompts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of ``size`` prompts (the last shorter), read as they are needed."""
    stream = iter(prompts)
    while batch := list(itertools.islice(stream, size)):
        yield batch


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
