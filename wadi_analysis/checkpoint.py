"""Checkpoints as lazy ``name -> tensor`` mappings.

Every reader exposes names, shapes and dtypes from headers alone and hands out one tensor at a
time, so a comparison never holds two whole models in memory:

* safetensors files are parsed and validated here and memory-mapped; a tensor is a zero-copy view
  of the page cache, and :meth:`CheckpointSource.release` drops its pages from this process again;
* ``.bin/.pt/.pth/.ckpt`` files go through ``torch.load(weights_only=True, mmap=True)`` (:mod:`.pickles`): nothing in
  them is ever executed, and a pickle that needs more than tensors and containers is refused.

:func:`open_checkpoint` resolves a path (file, sharded index, diffusers model or pipeline folder)
to a source and normalises its key names (see :mod:`wadi_analysis.keymap`).

Every structured field is validated before it is used, and each bad one is a :class:`CheckpointError`
naming the file and the problem: safetensors headers (JSON nesting, dtype names, shapes of non-negative
ints whose byte size fits, ``__metadata__`` a mapping of strings), sharded indexes (``weight_map`` of
plain shard file names, ``metadata`` a mapping), and torch pickles (a zip storage must hold the bytes
its tensors need; only dense strided tensors are read).

Links: a shard that is a symbolic link must stay inside its index's folder (links inside it are
fine); see :mod:`wadi_analysis.locate` for folders.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import UserError


class CheckpointError(UserError):
    """Input that cannot be read as a checkpoint. The message is one line meant for the user."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass
class KeyMapping:
    """canonical (diffusers) name -> name stored in the source, plus what was left out and why."""

    names: dict[str, str]
    layout: str = "diffusers"
    ignored: list[str] = field(default_factory=list)  # other components (VAE, text encoder), EMA copies
    unmapped: list[str] = field(default_factory=list)  # U-Net keys the converter did not place


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_TENSOR_BYTES = 2 ** 62  # beyond any file; keeps every size an int64 for torch


def _count(value) -> bool:
    """A non-negative int (not a bool: JSON's true is no dimension)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_json_bytes(data: bytes | str, what: str):
    """Parsed JSON, or a :class:`CheckpointError` ``"{what} is not JSON)"`` / nests too deeply."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{what} is not JSON)") from None
    except RecursionError:  # e.g. 100k nested arrays: refused, not a crash
        raise CheckpointError(f"{what} nests too deeply to be read)") from None


def metadata_json(metadata: dict[str, str], key: str, what: str, error: type[Exception] = CheckpointError,
                  hint: str = ""):
    """The JSON value of the safetensors metadata field ``key`` of ``what`` (a file), or ``error``
    saying it is missing (with ``hint``: how to make a file that has it) or not JSON."""
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise error(f"{what} has no {key!r} metadata{hint}") from None
    except (ValueError, RecursionError):
        raise error(f"{what}: its {key!r} metadata is not JSON") from None


def string_mapping(value, what: str) -> dict[str, str]:
    """A metadata field: absent (None) or a mapping of strings to strings, else a :class:`CheckpointError`."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(f"{what} is not a mapping of strings to strings")
    return dict(value)


class CheckpointSource(ABC):
    """A checkpoint whose tensors are read one at a time. Subclasses fill ``_infos``.

    Names are canonical (diffusers-style, see :mod:`wadi_analysis.keymap`); :attr:`raw_source`,
    :meth:`raw_name` and :attr:`key_mapping` tell how they relate to the keys stored in the file,
    which a source that renames keys (``keymap.RenamedSource``) overrides.
    """

    path: Path
    format: str
    metadata: dict[str, str]

    def __init__(self) -> None:
        self._infos: dict[str, TensorInfo] = {}
        self.metadata = {}

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    @abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``; may be a read-only view valid until :meth:`release` or close."""

    def release(self, name: str) -> None:
        """Tell the reader that ``name`` is no longer needed (frees what it can)."""

    def close(self) -> None:
        pass

    def files(self) -> list[Path]:
        """The files this source reads (outputs must stay apart from them)."""
        return [self.path]

    @property
    def raw_source(self) -> CheckpointSource:
        """This checkpoint under the keys stored in its file, every key included (itself, unless renamed)."""
        return self

    def raw_name(self, name: str) -> str:
        """The key the tensor ``name`` is stored under in :attr:`raw_source`."""
        return name

    @property
    def key_mapping(self) -> KeyMapping:
        """The key layout: canonical name -> stored key, the layout's name, stored keys left out."""
        return KeyMapping({name: name for name in self.names()}, layout="as stored")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


class SafetensorsFile(CheckpointSource):
    """One ``.safetensors`` file, header validated, data memory-mapped."""

    format = "safetensors"

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path} is not a safetensors file (too short)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > _MAX_HEADER_BYTES:
                    raise CheckpointError(f"{self.path} is not a safetensors file (bad header length)")
                if header_len > size - 8:
                    raise CheckpointError(f"{self.path} is truncated or not a safetensors file (its header "
                                          f"needs {header_len:,} bytes, the file has {size - 8:,} after the length)")
                header_bytes = fh.read(header_len)
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        header = read_json_bytes(header_bytes, f"{self.path} is not a safetensors file (header")
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is not a safetensors file (header is not a mapping)")
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self.metadata = string_mapping(header.pop("__metadata__", None), f"{self.path}: __metadata__")
        self._offsets: dict[str, tuple[int, int]] = {}
        spans = []
        for name, entry in header.items():
            dtype, shape, (begin, end) = self._validate_entry(name, entry)
            if end > data_len:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {end:,} "
                    f"but the file holds {data_len:,} data bytes")
            self._infos[name] = TensorInfo(shape, dtype)
            self._offsets[name] = (begin, end)
            spans.append((begin, end, name))
        spans.sort()
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise CheckpointError(f"{self.path} is corrupt: tensors {name_a!r} and {name_b!r} overlap")
        self._mmap: mmap.mmap | None = None
        if size:
            with open(self.path, "rb") as fh:
                # Private copy-on-write mapping: torch gets a writable buffer, the file is never touched.
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)

    def _validate_entry(self, name, entry):
        bad = f"{self.path} is corrupt: bad header entry for tensor {str(name)[:80]!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{bad}: not a mapping")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise CheckpointError(f"{bad}: dtype {str(code)[:40]!r} is not a safetensors dtype")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise CheckpointError(f"{bad}: shape {str(shape)[:60]} is not a list of non-negative integers")
        if prod(d for d in shape if d) * dtype.itemsize >= _MAX_TENSOR_BYTES:
            raise CheckpointError(f"{bad}: shape {str(shape)[:60]} is larger than any file")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(d) for d in offsets):
            raise CheckpointError(f"{bad}: data_offsets is not a pair of non-negative integers")
        begin, end = offsets
        if end - begin != prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{bad}: data_offsets span {end - begin} bytes, shape and dtype need "
                                  f"{prod(shape) * dtype.itemsize}")
        return dtype, tuple(shape), (begin, end)

    def tensor(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        begin, end = self._offsets[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        offset = self._data_start + begin
        if offset % info.dtype.itemsize:  # unaligned data: copy rather than hand torch a misaligned view
            raw = bytearray(self._mmap[offset:self._data_start + end])
            return torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape)
        return torch.frombuffer(self._mmap, dtype=info.dtype, count=info.numel, offset=offset).reshape(info.shape)

    def release(self, name: str) -> None:
        # Drop the tensor's pages from this process (they stay in the OS page cache), which keeps the
        # resident set at about one layer however large the file is.
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self._offsets[name]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + end
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a tensor view is still alive; the mapping goes with it
                pass
            self._mmap = None


class ShardedSafetensors(CheckpointSource):
    """A model split over several safetensors files listed in a ``*.safetensors.index.json``."""

    format = "sharded safetensors"

    def __init__(self, index_path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(index_path)
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path} is not a safetensors index (not text)") from None
        index = read_json_bytes(text, f"{self.path} is not a safetensors index (it")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{self.path} is not a safetensors index (no weight_map)")
        metadata = index.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path}: metadata is not a mapping")
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}  # total_size is a number
        self._shards: dict[str, SafetensorsFile] = {}
        self._shard_of: dict[str, SafetensorsFile] = {}
        for name, shard_name in weight_map.items():
            shard = self._shards.get(shard_name) if isinstance(shard_name, str) else None
            if shard is None:
                shard = self._open_shard(name, shard_name)
            if name not in shard._infos:
                raise CheckpointError(f"{self.path}: tensor {name!r} is not in shard {shard_name}")
            self._shard_of[name] = shard
            self._infos[name] = shard.info(name)

    def _open_shard(self, name: str, shard_name) -> SafetensorsFile:
        """The shard ``shard_name``: a plain file name in the index's folder, not a link out of it."""
        if not isinstance(shard_name, str) or not shard_name or Path(shard_name).name != shard_name:
            raise CheckpointError(f"{self.path}: the shard of {name[:80]!r} ({str(shard_name)[:80]!r}) "
                                  f"is not a plain file name")
        shard_path = self.path.parent / shard_name
        if not shard_path.is_file():
            raise CheckpointError(f"{self.path}: shard {shard_name} is missing")
        check_link_inside(shard_path, self.path.parent)
        self._shards[shard_name] = SafetensorsFile(shard_path)
        return self._shards[shard_name]

    def tensor(self, name: str) -> torch.Tensor:
        return self._shard_of[name].tensor(name)

    def files(self) -> list[Path]:
        return [self.path, *(shard.path for shard in self._shards.values())]

    def release(self, name: str) -> None:
        self._shard_of[name].release(name)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


class TensorDictSource(CheckpointSource):
    """An in-memory ``{name: tensor}`` mapping (e.g. ``model.state_dict()``) as a source."""

    format = "in-memory state dict"

    def __init__(self, tensors: dict[str, torch.Tensor], path: str = "<memory>") -> None:
        super().__init__()
        self.path = Path(path)
        self._tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        self._infos = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in self._tensors.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def files(self) -> list[Path]:
        return []


def write_safetensors(path: str | os.PathLike, infos: dict[str, TensorInfo], tensor_for,
                      metadata: dict[str, str] | None = None) -> Path:
    """Stream tensors to a safetensors file one at a time: the header comes from ``infos`` and
    ``tensor_for(name)`` is asked for each tensor in turn, so memory stays at one tensor. Atomic."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, info in infos.items():
        size = info.numel * info.dtype.itemsize
        header[name] = {"dtype": codes[info.dtype], "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name, info in infos.items():
                tensor = tensor_for(name)
                if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                    raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, header says {info}")
                if info.numel:
                    fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    return atomic_write(path, write)


def check_link_inside(path: Path, folder: Path) -> None:
    """Refuse ``path`` when it is (or passes through) a link that leads out of ``folder``: a checkpoint
    is read from the folder the user named. Links that stay inside it are fine, and so are the links
    of a Hugging Face cache (``snapshots/REV/...`` into the same repository's ``blobs/``)."""
    target, root = path.resolve(), folder.resolve()
    if target == root or root in target.parents:
        return
    cache = next((p for p in root.parents if p.name.startswith(("models--", "datasets--"))), None)
    if cache is not None and root.is_relative_to(cache / "snapshots") and target.parent == cache / "blobs":
        return
    raise CheckpointError(f"{path} is a symbolic link that leads out of {folder} (to {target}); "
                          f"links out of the named folder are not followed: copy the file in, or name it itself")


def open_file(path: Path) -> CheckpointSource:
    """A single checkpoint file, by its suffix."""
    from .pickles import TorchPickleFile  # it builds on the sources above

    name = path.name
    if name.endswith(".safetensors"):
        return SafetensorsFile(path)
    if name.endswith(".json"):
        return ShardedSafetensors(path)
    if name.endswith(PICKLE_SUFFIXES):
        return TorchPickleFile(path)
    # Unknown suffix: sniff. Zip/pickle -> torch; anything else -> safetensors (which validates).
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return TorchPickleFile(path)
    return SafetensorsFile(path)
