"""Prompt files, streamed: .txt (one prompt a line), .jsonl (a field of each JSON object), .csv (a column).

A file of millions of lines is never held in memory as strings. One pass reads it line by line and keeps,
per prompt, the byte offset of its record (8 bytes) and, when de-duplicating, a 16-byte blake2b digest
of its text: 24 bytes a prompt while reading and up to ~50 while the digests are sorted (a stable
argsort), against ~57 bytes plus the text's length for each Python string in a list (a 150-character
caption: ~200 bytes). Without ``dedupe``, 8 bytes a prompt. Prompts are read
back from the file by offset whenever they are iterated (to hash them, to embed them).

The field of a .jsonl file is a dotted path into each object (``Task2.Caption`` for JourneyDB); a
top-level key equal to the whole path wins, so a key that contains a dot still works as it did. For a
.csv file it is a column name.

Preparation as published (JourneyDB): ``dedupe`` keeps the first line of each distinct prompt (by digest;
two different prompts share a 16-byte digest with probability ~n²/2¹²⁹), ``shuffle_seed`` then orders
them by ``numpy.random.default_rng(seed).permutation``. :meth:`PromptSet.manifest` records the counts,
the seed and the SHA-256 of the resulting prompt list, so a run records exactly what it trained on.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FORMATS = (".txt", ".jsonl", ".csv")  # any other suffix is read as .txt, as before


class PromptSet:
    """The prompts of one file, prepared (de-duplicated, shuffled), as offsets into the unchanged file."""

    def __init__(self, path: Path, field: str, offsets: np.ndarray, stats: dict, stamp: tuple) -> None:
        self.path, self.field, self.offsets, self.stats, self._stamp = path, field, offsets, stats, stamp
        self._reader = _record_reader(path, field)

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[str]:
        """The prompts in their prepared order, read back from the file one record at a time."""
        if _stamp(self.path) != self._stamp:
            raise ValueError(f"prompts file {self.path} changed while it was being read")
        with open(self.path, "rb") as file:
            for offset in self.offsets:
                yield self._reader(file, int(offset))

    def head(self, count: int) -> list[str]:
        """The first ``count`` prompts (e.g. the default validation prompts)."""
        return list(itertools.islice(self, count))

    def sha256(self) -> str:
        """SHA-256 of ``json.dumps(list(self))``, computed streaming."""
        digest = hashlib.sha256()
        for chunk in json_list_chunks(self):
            digest.update(chunk)
        return digest.hexdigest()

    def manifest(self) -> dict:
        """What a run records about its prompts: source, field, counts, seed and the list's digest."""
        return {"file": str(self.path), "format": _format(self.path), "field": self.field, **self.stats,
                "count": len(self), "sha256": self.sha256(),
                "order": "file" if self.stats["shuffle_seed"] is None else "numpy default_rng(seed).permutation",
                "numpy": np.__version__}  # numpy does not promise the same permutation across versions


def json_list_chunks(prompts) -> Iterator[bytes]:
    """``json.dumps(list(prompts)).encode()`` in pieces, without building the list."""
    yield b"["
    for index, prompt in enumerate(prompts):
        yield (", " if index else "").encode() + json.dumps(prompt).encode()
    yield b"]"


def open_prompts(path: str | os.PathLike, field: str = "prompt", *, dedupe: bool = False,
                 shuffle_seed: int | None = None) -> PromptSet:
    """The non-empty prompts of ``path`` (stripped), de-duplicated and shuffled on request; bad input is a
    :class:`ValueError` naming the file and line. The file is only read."""
    path = Path(path)
    stamp = _stamp(path)  # taken first: a change during the scan shows when the prompts are read back
    offsets, digests, stats = _scan(path, field, dedupe)
    stats["duplicates_dropped"] = 0
    if dedupe and len(offsets):
        first = _first_occurrences(digests)
        del digests  # the 16 bytes a prompt are freed before the offsets are copied
        stats["duplicates_dropped"] = len(offsets) - len(first)
        offsets = offsets[first]
    if not len(offsets):
        raise ValueError(f"{path} holds no prompts")
    if shuffle_seed is not None:
        offsets = offsets[np.random.default_rng(shuffle_seed).permutation(len(offsets))]
    stats.update(dedupe=dedupe, shuffle_seed=shuffle_seed)
    return PromptSet(path, field, offsets, stats, stamp)


def read_prompts(path: str | os.PathLike, column: str = "prompt") -> list[str]:
    """Non-empty prompts of a .txt, .jsonl or .csv file, in file order, as a list (small files)."""
    return list(open_prompts(path, column))


def _first_occurrences(digests: bytearray) -> np.ndarray:
    """Indices, ascending, of the first occurrence of each distinct 16-byte digest. A stable argsort
    groups equal digests with the first one leading; this needs 8 + 16 + 2 bytes a prompt besides the
    digests (``np.unique`` would also copy them)."""
    keys = np.frombuffer(digests, dtype="V16")
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    leads = np.empty(len(keys), dtype=bool)
    leads[0] = True
    leads[1:] = ranked[1:] != ranked[:-1]
    del ranked
    return np.sort(order[leads])


def _scan(path: Path, field: str, dedupe: bool) -> tuple[np.ndarray, bytearray, dict]:
    """One pass over the file: offsets of the non-empty prompts, their digests (when ``dedupe``) and counts."""
    offsets, digests, lines = array("q"), bytearray(), 0
    try:
        with open(path, "rb") as file:
            for lines, offset, prompt in _records(file, path, field):
                if prompt:
                    offsets.append(offset)
                    if dedupe:
                        digests += hashlib.blake2b(prompt.encode(), digest_size=16).digest()
    except OSError as exc:
        raise ValueError(f"cannot read prompts {path}: {exc.strerror or exc}") from None
    stats = {"lines": lines, "prompts_read": len(offsets)}
    return np.frombuffer(offsets, dtype=np.int64) if offsets else np.zeros(0, np.int64), digests, stats


def _records(file, path: Path, field: str) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, stripped prompt or "") of every record of the file."""
    kind = _format(path)
    if kind == ".csv":
        yield from _csv_records(file, path, field)
        return
    steps = _field_steps(field) if kind == ".jsonl" else None
    offset = 0
    for number, raw in enumerate(file, 1):
        line = _decode(raw, path, number)
        if kind == ".jsonl":
            yield number, offset, _json_prompt(line, path, number, field, steps) if line.strip() else ""
        else:
            yield number, offset, line.strip()
        offset += len(raw)


def _record_reader(path: Path, field: str):
    """``read(file, offset) -> prompt``: one record read back at its offset (the scan checked it)."""
    kind = _format(path)
    if kind == ".csv":
        with open(path, "rb") as file:
            index = _csv_index(next(csv.reader(_lines(file, path)), []), path, field)

        def read_csv(file, offset):
            file.seek(offset)
            return next(csv.reader(_lines(file, path)))[index].strip()
        return read_csv
    steps = _field_steps(field) if kind == ".jsonl" else None

    def read_line(file, offset):
        file.seek(offset)
        line = _decode(file.readline(), path, None)
        return _json_prompt(line, path, None, field, steps) if steps is not None else line.strip()
    return read_line


def _csv_records(file, path: Path, column: str) -> Iterator[tuple[int, int, str]]:
    """Records of a CSV file with a header; a record's offset is where its first line starts (a quoted
    field may span lines)."""
    position = [0, 0]  # bytes and lines consumed so far, advanced as the csv reader pulls lines

    def lines():
        for raw in file:
            position[1] += 1
            line = _decode(raw, path, position[1])
            position[0] += len(raw)
            yield line
    reader = csv.reader(lines())
    index = _csv_index(next(reader, []), path, column)
    while True:
        offset = position[0]
        row = next(reader, None)
        if row is None:
            return
        yield position[1], offset, row[index].strip() if index < len(row) else ""


def _csv_index(header: list[str], path: Path, column: str) -> int:
    """The column's index in the header (the last of equal names, as ``csv.DictReader`` takes it)."""
    if column not in header:
        raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(header)})")
    return len(header) - 1 - header[::-1].index(column)


def _lines(file, path: Path) -> Iterator[str]:
    """Decoded lines from the file's current position."""
    for raw in iter(file.readline, b""):
        yield _decode(raw, path, None)


def _decode(raw: bytes, path: Path, number: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        where = f"{path}:{number}" if number is not None else str(path)
        raise ValueError(f"{where}: not UTF-8 text") from None


def _field_steps(field: str) -> list[str]:
    """The keys of a dotted field path; every part must be non-empty."""
    steps = field.split(".")
    if not all(steps):
        raise ValueError(f"prompt field {field!r} is not a dotted path of keys (e.g. Task2.Caption)")
    return steps


def _json_prompt(line: str, path: Path, number: int | None, field: str, steps: list[str]) -> str:
    """The stripped string at ``field`` in one JSON line; anything else is a ValueError naming the line."""
    where = f"{path}:{number}" if number is not None else f"{path} (changed while it was being read)"
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{where}: not a JSON object (malformed JSON)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: not a JSON object")
    if field in value:  # a top-level key holding a dot, as prompt_column read it before dotted paths
        value = value[field]
    else:
        for depth, step in enumerate(steps):
            if not isinstance(value, dict) or step not in value:
                missing = ".".join(steps[:depth + 1])
                wanted = "" if missing == field else f" (looking for {field!r})"
                raise ValueError(f"{where}: no field {missing!r}{wanted}")
            value = value[step]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is a {_json_kind(value)}, not a string")
    return value.strip()


def _json_kind(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _format(path: Path) -> str:
    return path.suffix if path.suffix in FORMATS else ".txt"


def _stamp(path: Path) -> tuple:
    """Size and modification time: a file that changes between passes is refused, not half-read."""
    try:
        status = path.stat()
    except OSError as exc:
        raise ValueError(f"cannot read prompts {path}: {exc.strerror or exc}") from None
    return status.st_size, status.st_mtime_ns
