"""Torch pickles (``.bin/.pt/.pth/.ckpt``) as a lazy checkpoint source, never executed.

``torch.load(weights_only=True, mmap=True)`` reads them: nothing in a file is ever run, and a pickle
that needs more than tensors and containers is refused. Before that, the zip storages are checked
against what the pickle says they hold (found with :mod:`pickletools`, which executes nothing), so a
truncated file is refused instead of read from neighbouring bytes; only dense strided tensors are
read, and state dicts nested under ``state_dict``/``model``/... at most a few levels deep.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from .checkpoint import CheckpointError, CheckpointSource, TensorInfo

_MAX_NESTING = 4  # state dicts nested under state_dict/model/... at most this deep


def _persistent_ids(pickled: bytes) -> list[tuple]:
    """The persistent ids (torch's storage references) a pickle holds, found by simulating its stack
    with :mod:`pickletools` (nothing is imported or executed; unknown values are ``None``)."""
    import pickletools

    stack, memo = [], {}
    found = []
    for op, arg, _ in pickletools.genops(pickled):
        before, after = op.stack_before, op.stack_after
        if op.name in ("BINPUT", "LONG_BINPUT", "PUT") and stack:
            memo[arg] = stack[-1]
            continue
        if op.name == "MEMOIZE" and stack:
            memo[len(memo)] = stack[-1]
            continue
        if pickletools.markobject in before:  # pops everything down to the last MARK
            mark = max((i for i, v in enumerate(stack) if v is pickletools.markobject), default=0)
            popped, stack = stack[mark + 1:], stack[:mark]
        else:
            popped = stack[len(stack) - len(before):] if before else []
            stack = stack[:len(stack) - len(before)] if before else stack
        if op.name == "MARK":
            value = pickletools.markobject
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
        elif op.name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            value = tuple(popped)
        elif op.name == "STACK_GLOBAL":
            value = " ".join(map(str, popped))
        elif op.name == "BINPERSID":
            found.append(popped[0] if popped else None)
            value = None
        else:
            value = arg if arg is not None and not isinstance(arg, bytes) else None
        stack += [value] * len(after)
    return found


_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                     "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8,
                     "Float8_e4m3fn": 1, "Float8_e5m2": 1}


def check_zip_storages(path: Path) -> None:
    """Every storage a torch zip checkpoint references must be a record of the size its pickle says:
    memory-mapped loading does not check, and would read the neighbouring bytes of a truncated record."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = {info.filename: info for info in archive.infolist()}
            pickles = [name for name in records if name.endswith("data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} is not a torch checkpoint (a zip without one data.pkl)")
            prefix = pickles[0][:-len("data.pkl")]
            ids = _persistent_ids(archive.read(pickles[0]))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({str(exc)[:120]})") from None
    for saved in ids:
        if not (isinstance(saved, tuple) and len(saved) == 5 and saved[0] == "storage"):
            continue  # not a tensor storage: torch.load judges it
        _, kind, key, _, numel = saved
        itemsize = _STORAGE_ITEMSIZE.get(str(kind).rsplit(" ", 1)[-1].removesuffix("Storage"))
        record = records.get(f"{prefix}data/{key}")
        if record is None:
            raise CheckpointError(f"{path} is corrupt: storage {str(key)[:20]!r} is missing")
        if itemsize and isinstance(numel, int) and record.file_size != numel * itemsize:
            raise CheckpointError(f"{path} is truncated or corrupt: storage {key} holds {record.file_size:,} "
                                  f"bytes, its tensors need {numel * itemsize:,}")
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path} is corrupt: storage {key} is compressed")


class TorchPickleFile(CheckpointSource):
    """``.bin/.pt/.pth/.ckpt`` state dicts, read with ``weights_only=True`` (never executes code)."""

    format = "torch pickle (weights_only)"
    _NESTED_KEYS = ("state_dict", "model", "module", "model_state_dict")

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} does not exist")
        with open(self.path, "rb") as fh:
            magic = fh.read(2)
        mmap_ok = zipfile.is_zipfile(self.path)  # only the zip format can be memory-mapped
        if not mmap_ok and magic[:1] != b"\x80":  # neither torch's zip format nor a raw pickle
            raise CheckpointError(f"{self.path} is not a torch checkpoint (neither a zip archive nor a pickle)")
        if mmap_ok:
            check_zip_storages(self.path)
        try:
            with warnings.catch_warnings():  # e.g. pickle-protocol notices: the outcome is reported below
                warnings.simplefilter("ignore")
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap_ok)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()
            detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), "")
            if not any(word in detail.lower() for word in ("global", "reduce", "call", "class")):  # a bad opcode
                raise CheckpointError(f"{self.path} is not a readable torch checkpoint (a broken pickle)") from None
            raise CheckpointError(
                f"{self.path} needs full unpickling (arbitrary code) and was refused; convert it to "
                f"safetensors in a trusted environment ({detail.split(' was not an allowed')[0].strip()[:160]})") from None
        except RecursionError:
            raise CheckpointError(f"{self.path} nests too deeply to be read") from None
        except Exception as exc:  # torch.load's failures on foreign bytes are many (KeyError, EOFError, ...)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.path} is not a readable torch checkpoint ({message[:200]})") from None
        state = self._find_state_dict(obj)
        if state is None:
            raise CheckpointError(f"{self.path} holds no state dict of tensors")
        for name, tensor in state.items():
            if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
                raise CheckpointError(f"{self.path}: tensor {name[:80]!r} is {str(tensor.layout).removeprefix('torch.')}"
                                      f"{' quantized' if tensor.is_quantized else ''}"
                                      f"{' meta' if tensor.is_meta else ''}; only dense tensors are read")
        self._tensors = state
        self._infos = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in state.items()}

    @classmethod
    def _find_state_dict(cls, obj, depth: int = 0) -> dict[str, torch.Tensor] | None:
        if not isinstance(obj, dict) or depth > _MAX_NESTING:
            return None
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        for key in cls._NESTED_KEYS:
            nested = cls._find_state_dict(obj.get(key), depth + 1)
            if nested:
                return nested
        return tensors or None

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}
