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
from wadi_analysis.errors import UserError

from .model import add_adapter, adapter_names, adapter_state_dict, base_weight, lorad_modules

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
    return tensors, metadata


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, strict_base: bool = True) -> str:
    """Attach the adapter stored at ``path`` to ``model`` (under ``name`` or its saved name); returns the name.

    With ``strict_base`` (default) the base weights must be the ones the adapter was trained on.
    """
    tensors, metadata = read_adapter(path)
    name = name or metadata["adapter_name"]
    ranks = {k: int(v) for k, v in json.loads(metadata["ranks"]).items()}
    modules = dict(model.named_modules())
    missing = [m for m in ranks if m not in modules]
    if missing:
        raise AdapterFileError(f"{path} targets {missing[0]!r}, which this model does not have "
                               f"({len(missing)} of {len(ranks)} targets missing): wrong base model")
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
