"""Adapter files: safetensors with the angle factors and metadata saying what they belong to.

Metadata (all strings, as safetensors requires): format/version, adapter name, ranks per module,
targets, the pairing convention, the base weights' dtype and a fingerprint of the base weights the
adapter was trained on. Loading onto another base model is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from wadi_analysis.atomic import atomic_write
from wadi_analysis.checkpoint import metadata_json
from wadi_analysis.errors import UserError

from .model import ADAPTABLE, add_adapter, adapter_names, adapter_state_dict, base_weight, lorad_modules

ADAPTER_FORMAT = "wadi-lorad-adapter"
PAIRING = ("adjacent columns (2k, 2k+1) of each row of the weight flattened row-major to (out, -1) "
           "(Conv2d: (out, in*kh*kw)); an odd last column is not rotated")


class AdapterFileError(UserError, ValueError):
    """An adapter file that cannot be used on this model; one line for the user."""


def base_fingerprint(model: nn.Module, modules: list[str]) -> str:
    """A hash of the base weights under ``modules``: shape, dtype, float64 sum and sum of squares, and
    a strided sample of values. Cheap (one pass), and any retraining or other checkpoint changes it."""
    digest = hashlib.sha256()
    named = dict(model.named_modules())
    for name in sorted(modules):
        weight = base_weight(named[name]).detach()
        flat = weight.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].double().cpu()
        summary = (flat.double().sum().item(), flat.double().square().sum().item())
        digest.update(f"{name}|{tuple(weight.shape)}|{weight.dtype}|{summary[0]:.10e}|{summary[1]:.10e}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def _ranks(model: nn.Module, name: str) -> dict[str, int]:
    return {module_name: p.adapters[name].rank for module_name, _, p in lorad_modules(model) if name in p.adapters}


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike, **extra: str) -> Path:
    """Write adapter ``name`` of ``model`` to ``path`` (atomically)."""
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}")
    ranks = _ranks(model, name)
    state = {k: v.float().cpu().contiguous() for k, v in adapter_state_dict(model, name).items()}
    named = dict(model.named_modules())
    dtypes = sorted({str(base_weight(named[m]).dtype).removeprefix("torch.") for m in ranks})
    metadata = {
        "format": ADAPTER_FORMAT, "version": "1", "adapter_name": name, "method": "lorad",
        "ranks": json.dumps(ranks), "targets": json.dumps(sorted(ranks)), "pairing": PAIRING,
        "base_dtype": ",".join(dtypes), "base_fingerprint": base_fingerprint(model, list(ranks)),
        **{k: str(v) for k, v in extra.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, validated."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist") from None
    except (SafetensorError, OSError, struct.error, ValueError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterFileError(f"{path} is not a LoRaD adapter file (format {metadata.get('format')!r})")
    check_adapter(path, tensors, metadata)
    return tensors, metadata


def adapter_ranks(path, metadata: dict[str, str]) -> dict[str, int]:
    """The ``ranks`` metadata: a JSON object of module name -> positive integer rank."""
    ranks = metadata_json(metadata, "ranks", str(path), AdapterFileError,
                          hint=" (which modules it adapts, at which rank)")
    if not isinstance(ranks, dict) or not ranks:
        raise AdapterFileError(f"{path}: its 'ranks' metadata must be a non-empty object of module -> rank")
    for module, rank in ranks.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise AdapterFileError(f"{path}: the rank of {module!r} must be a positive integer (got {rank!r})")
    return ranks


def check_adapter(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A LoRaD file as its readers need it: a name, the pairing this code rotates, and for every module
    of ``ranks`` a finite float A (out, rank) and B (rank, pairs), nothing else."""
    if not metadata.get("adapter_name"):
        raise AdapterFileError(f"{path} has no 'adapter_name' metadata")
    if metadata.get("pairing") != PAIRING:
        raise AdapterFileError(f"{path}: its 'pairing' metadata is missing or not the column pairing LoRaD "
                               "rotates; refusing to guess which columns its angles turn")
    ranks = adapter_ranks(path, metadata)
    expected = {f"{module}.{suffix}" for module in ranks for suffix in ("lorad_A", "lorad_B")}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[0]
        raise AdapterFileError(f"{path}: its tensors do not match its 'ranks' metadata ({odd})")
    for module, rank in ranks.items():
        a, b = tensors[f"{module}.lorad_A"], tensors[f"{module}.lorad_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank or 0 in a.shape + b.shape:
            raise AdapterFileError(f"{path}: {module}'s factors have shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                                   f"not (rows, {rank}) and ({rank}, pairs)")
        for suffix, tensor in (("lorad_A", a), ("lorad_B", b)):
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise AdapterFileError(f"{path}: {module}.{suffix} holds NaN or infinite angles (or is not float)")


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, strict_base: bool = True) -> str:
    """Attach the adapter stored at ``path`` to ``model`` (under ``name`` or its saved name); returns the name.

    With ``strict_base`` (default) the base weights must be the ones the adapter was trained on.
    """
    tensors, metadata = read_adapter(path)
    name = name or metadata["adapter_name"]
    ranks = adapter_ranks(path, metadata)
    modules = dict(model.named_modules())
    missing = [m for m in ranks if m not in modules]
    if missing:
        raise AdapterFileError(f"{path} targets {missing[0]!r}, which this model does not have "
                               f"({len(missing)} of {len(ranks)} targets missing): wrong base model")
    unadaptable = [m for m in ranks if not isinstance(modules[m], ADAPTABLE)]
    if unadaptable:
        raise AdapterFileError(f"{path} targets {unadaptable[0]!r}, a {type(modules[unadaptable[0]]).__name__}; "
                               "LoRaD adapts Linear and Conv2d layers only")
    for module_name, rank in ranks.items():
        weight = base_weight(modules[module_name])
        expected = {"lorad_A": (weight.shape[0], rank), "lorad_B": (rank, weight[0].numel() // 2)}
        for suffix, shape in expected.items():
            stored = tensors.get(f"{module_name}.{suffix}")
            if stored is None or tuple(stored.shape) != shape:
                got = None if stored is None else tuple(stored.shape)
                raise AdapterFileError(f"{path}: {module_name}.{suffix} has shape {got}, this model needs {shape}: "
                                       "wrong base model")
    if strict_base:
        found = base_fingerprint(model, list(ranks))
        if found != metadata.get("base_fingerprint"):
            raise AdapterFileError(f"{path} was trained on other base weights (fingerprint "
                                   f"{metadata.get('base_fingerprint')}, this model {found})")
    add_adapter(model, name, ranks)
    with torch.no_grad():
        for module_name, _, p in lorad_modules(model):
            if name in p.adapters:
                p.adapters[name].A.copy_(tensors[f"{module_name}.lorad_A"])
                p.adapters[name].B.copy_(tensors[f"{module_name}.lorad_B"])
    return name
