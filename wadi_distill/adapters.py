"""One API for every adapter the distiller can train on the same targets: LoRaD, peft LoRA and DoRA,
DoRA with frozen magnitude, and full fine-tuning (the baselines of WaDi's adapter ablation).

DoRA with frozen magnitude (``dora-frozen``, the paper's extra arm) is peft's DoRA,
W' = m ⊙ (W + BA) / ‖W + BA‖_row, whose magnitude vector m (initialised to the teacher's row norms
‖W‖_row) never trains: it is not among the adapter's parameters (so in no optimiser) and keeps
``requires_grad`` False through every :func:`activate` (peft's own adapter switch would set it True).
Only the direction part (A, B) trains, so the merged rows keep the teacher's norms, as LoRaD's do.

Targets are always ``{module name: rank}`` (see :mod:`wadi_distill.lorad.targets`).

Adapter files: LoRaD adapters are written by :mod:`wadi_distill.lorad.io`; LoRA/DoRA adapters as peft
state dicts in diffusers' LoRA file layout (keys and the ``lora_adapter_metadata`` LoraConfig prefixed
with the pipeline component, ``unet.`` or ``transformer.``), so ``pipe.load_lora_weights(file)`` reads
them too, plus this project's metadata (adapter name, method, base-weight fingerprint).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from wadi_analysis.geometry import cost_per_rank, row_width

from . import lorad
from .lorad import AdapterFileError

PEFT_ADAPTER_FORMAT = "wadi-peft-adapter"

METHODS = ("lorad", "lora", "dora", "dora-frozen", "full")
DORA_METHODS = ("dora", "dora-frozen")
PEFT_METHODS = ("lora",) + DORA_METHODS
FROZEN_MAGNITUDE = "wadi_frozen_magnitude"  # peft-layer attribute: the adapters whose magnitude is frozen


def _peft_layers(model: nn.Module):
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional: without it no model holds peft layers
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def attach(model: nn.Module, method: str, targets: dict[str, int], name: str = "default", seed: int = 0,
           alpha: float | None = None) -> int:
    """Attach adapter ``name`` of ``method`` to the target modules; returns its trainable parameter count.

    Base weights are frozen (for ``full``: everything but the targets' weights and biases is frozen).
    ``alpha`` is LoRA/DoRA's ``lora_alpha`` (default: equal to each rank, i.e. scale 1). For
    ``dora-frozen`` the count excludes the frozen magnitude vectors (they are not trainable).
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; one of {', '.join(METHODS)}")
    lorad.check_targets(model, targets)
    if method == "lorad":
        count = lorad.add_adapter(model, name, targets, seed=seed)
        lorad.set_adapter(model, name)
        return count
    if method == "full":
        modules = dict(model.named_modules())
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for target in targets:
            for parameter in modules[target].parameters():
                parameter.requires_grad_(True)
        return trainable_parameters(model)
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError(f"adapter {method!r} needs peft: pip install 'wadi[peft]'") from None

    first_rank = next(iter(targets.values()))
    config = LoraConfig(
        r=first_rank, lora_alpha=alpha or first_rank, target_modules=list(targets), use_dora=method in DORA_METHODS,
        rank_pattern={re.escape(k): v for k, v in targets.items()},
        alpha_pattern={re.escape(k): alpha or v for k, v in targets.items()},
        init_lora_weights=True,  # B = 0: training starts exactly at the teacher, as LoRaD does
    )
    before = {id(p) for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: seed it, as LoRaD does,
        torch.manual_seed(seed)                 # so every process of a multi-process run starts identical
        _inject(config, model, name)
    if method == "dora-frozen":
        freeze_magnitude(model, name)
    activate(model, name)
    frozen = {id(p) for p in frozen_magnitudes(model, name)}
    return sum(p.numel() for p in model.parameters() if id(p) not in before and id(p) not in frozen)


def freeze_magnitude(model: nn.Module, name: str) -> None:
    """Freeze the DoRA magnitude vectors of peft adapter ``name``: recorded on each layer, so that
    :func:`activate` keeps them frozen and :func:`adapter_parameters` leaves them out."""
    for layer in _peft_layers(model):
        if name in getattr(layer, "lora_magnitude_vector", {}):
            setattr(layer, FROZEN_MAGNITUDE, getattr(layer, FROZEN_MAGNITUDE, frozenset()) | {name})
            layer.lora_magnitude_vector[name].requires_grad_(False)


def frozen_magnitudes(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The frozen DoRA magnitude vectors of adapter ``name`` (none for any other adapter)."""
    return [p for layer in _peft_layers(model) if name in getattr(layer, FROZEN_MAGNITUDE, ())
            for p in layer.lora_magnitude_vector[name].parameters()]


def _inject(config, model: nn.Module, name: str) -> None:
    """peft's injection, without its warning that the model already has an adapter (several is the point)."""
    import warnings

    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)


def activate(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the active one (``None``: the frozen base) for LoRaD and peft layers alike."""
    lorad.activate(model, name)
    for layer in _peft_layers(model):
        if name is None or name not in layer.lora_A:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
        for frozen in getattr(layer, FROZEN_MAGNITUDE, ()):  # peft's switch made them trainable again
            layer.lora_magnitude_vector[frozen].requires_grad_(False)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lorad_parameters(model: nn.Module, targets: dict[str, int]) -> int:
    """rank * cost_per_rank per target: what :func:`attach` with ``lorad`` would add."""
    modules = dict(model.named_modules())
    return sum(rank * cost_per_rank(modules[name].weight.shape) for name, rank in targets.items())


def lora_ranks_at_equal_budget(model: nn.Module, targets: dict[str, int]) -> dict[str, int]:
    """LoRA ranks with (about) the parameter count of LoRaD at ``targets``: r * (out + width) ~ r_lorad * cost_per_rank."""
    modules = dict(model.named_modules())
    ranks = {}
    for name, rank in targets.items():
        shape = modules[name].weight.shape
        lora_cost_per_rank = shape[0] + row_width(shape)  # one column of up, one row of down
        ranks[name] = max(1, round(rank * cost_per_rank(shape) / lora_cost_per_rank))
    return ranks


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter ``name``, LoRaD or peft alike (peft names them
    ``...lora_A.<name>.weight``); frozen DoRA magnitudes (:func:`freeze_magnitude`) are not among them."""
    found = lorad.adapter_parameters(model, name)
    if found:
        return found
    frozen = {id(p) for p in frozen_magnitudes(model, name)}
    return [p for n, p in model.named_parameters()
            if f".{name}." in f".{n}." and "lora_" in n and id(p) not in frozen]



def _peft_targets(model: nn.Module, name: str) -> list[str]:
    """The modules adapter ``name`` (a peft one) adapts."""
    layers = {id(m) for m in _peft_layers(model)}
    return sorted(n for n, m in model.named_modules() if id(m) in layers and name in m.lora_A)


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike, component: str = "unet") -> Path:
    """Write adapter ``name`` of ``model`` to ``path`` (atomically), whatever its method.

    ``component`` is the denoiser's name in its pipeline (``unet`` or ``transformer``): the prefix of a
    LoRA/DoRA file's keys, as diffusers' ``load_lora_weights`` expects them.
    """
    if name in lorad.adapter_names(model):
        return lorad.save_adapter(model, name, path)
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from wadi_analysis.atomic import atomic_write

    if name not in getattr(model, "peft_config", {}):
        raise ValueError(f"no adapter named {name!r}")
    config = model.peft_config[name]
    # From the named tensors, not model.state_dict(): under FSDP2 that would reshard the base weights the
    # fingerprint below reads (and a resharded weight's sum is a collective only this process would join).
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {f"{component}.{k}": v.detach().float().cpu().contiguous()
             for k, v in get_peft_model_state_dict(model, state_dict=named, adapter_name=name).items()}
    lora_config = {f"{component}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    targets = _peft_targets(model, name)
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(lora_config, sort_keys=True),
                "wadi_format": PEFT_ADAPTER_FORMAT, "adapter_name": name, "component": component,
                "method": _peft_method(model, name, config), "targets": json.dumps(targets),
                "base_fingerprint": lorad.base_fingerprint(model, targets)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def _peft_method(model: nn.Module, name: str, config) -> str:
    """``lora``, ``dora``, or ``dora-frozen`` (DoRA whose magnitudes are frozen)."""
    if not config.use_dora:
        return "lora"
    return "dora-frozen" if frozen_magnitudes(model, name) else "dora"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, strict_base: bool = True) -> str:
    """Attach the adapter stored at ``path`` (LoRaD, or LoRA/DoRA/frozen-magnitude DoRA written by :func:`save_adapter`) to
    ``model`` under ``name`` or its saved name; returns the name. It is not activated (see :func:`activate`).

    With ``strict_base`` the base weights must be the ones the adapter was trained on.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if metadata.get("wadi_format") != PEFT_ADAPTER_FORMAT:
        return lorad.load_adapter(model, path, name, strict_base=strict_base)
    try:
        from peft import LoraConfig, set_peft_model_state_dict
    except ImportError:
        raise AdapterFileError(f"{path} is a LoRA/DoRA adapter, which needs peft: pip install 'wadi[peft]'") from None
    targets, lora_config = _peft_metadata(path, tensors, metadata)
    name = name or metadata["adapter_name"]
    prefix = metadata["component"] + "."
    values = {k.removeprefix(prefix): v for k, v in lora_config.items()}
    try:
        config = LoraConfig(**values)
    except (TypeError, ValueError):
        raise AdapterFileError(f"{path}: its 'lora_adapter_metadata' is not a LoRA configuration peft accepts") from None
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise AdapterFileError(f"{path} targets {missing[0]!r}, which this model does not have "
                               f"({len(missing)} of {len(targets)} targets missing): wrong base model")
    if strict_base and lorad.base_fingerprint(model, targets) != metadata.get("base_fingerprint"):
        raise AdapterFileError(f"{path} was trained on other base weights (fingerprint mismatch)")
    _inject(config, model, name)
    if _peft_targets(model, name) != targets:
        raise AdapterFileError(f"{path}: its LoRA config selects other modules in this model: wrong base model")
    try:
        result = set_peft_model_state_dict(model, {k.removeprefix(prefix): v for k, v in tensors.items()},
                                           adapter_name=name)
    except RuntimeError as exc:  # size mismatches
        raise AdapterFileError(f"{path} does not fit this model: {str(exc).strip().splitlines()[-1][:200]}") from None
    if result.unexpected_keys:
        raise AdapterFileError(f"{path}: {result.unexpected_keys[0]} has no place in this model")
    absent = [k for k in result.missing_keys if "lora_" in k and f".{name}" in k]
    if absent:
        raise AdapterFileError(f"{path} lacks {len(absent)} of the adapter's tensors (e.g. {absent[0]})")
    if metadata["method"] == "dora-frozen":
        freeze_magnitude(model, name)
        if not frozen_magnitudes(model, name):
            raise AdapterFileError(f"{path}: method dora-frozen, but its LoRA config makes no DoRA magnitudes")
    return name


@torch.no_grad()
def merge_and_unload(model: nn.Module, name: str) -> nn.Module:
    """Bake adapter ``name`` into the base weights and remove every adapter (LoRaD and peft alike); the
    result is the plain model class (a diffusers model ``save_pretrained``/``from_pretrained`` accept)."""
    if name not in lorad.adapter_names(model) and name not in getattr(model, "peft_config", {}):
        raise ValueError(f"no adapter named {name!r}")
    if lorad.adapter_names(model):
        lorad.merge_and_unload(model, name if name in lorad.adapter_names(model) else None)
    modules = dict(model.named_modules())
    layers = {id(m) for m in _peft_layers(model)}
    for module_name, layer in list(modules.items()):
        if id(layer) in layers:
            if name in layer.lora_A:
                layer.merge(safe_merge=True, adapter_names=[name])
            parent, _, child = module_name.rpartition(".")
            setattr(modules[parent] if parent else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def _json_metadata(path: Path, metadata: dict[str, str], key: str, kind: type):
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise AdapterFileError(f"{path} has no {key!r} metadata") from None
    except (ValueError, RecursionError):
        raise AdapterFileError(f"{path}: its {key!r} metadata is not JSON") from None
    if not isinstance(value, kind):
        raise AdapterFileError(f"{path}: its {key!r} metadata must be a JSON {kind.__name__}")
    return value


def _peft_metadata(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[list[str], dict]:
    """(targets, LoRA config) of a LoRA/DoRA file written by :func:`save_adapter`, validated, and its
    tensors finite floats."""
    for key in ("adapter_name", "component", "method"):
        if not metadata.get(key):
            raise AdapterFileError(f"{path} has no {key!r} metadata")
    if metadata["method"] not in PEFT_METHODS:
        raise AdapterFileError(f"{path}: method {metadata['method']!r} is not one of {', '.join(PEFT_METHODS)}")
    targets = _json_metadata(path, metadata, "targets", list)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterFileError(f"{path}: its 'targets' metadata must be a non-empty list of module names")
    config = _json_metadata(path, metadata, "lora_adapter_metadata", dict)
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all() or 0 in tensor.shape:
            raise AdapterFileError(f"{path}: {key} is empty, not float, or holds NaN or infinite values")
    return targets, config


def describe_adapter(path: str | os.PathLike) -> dict:
    """What an adapter file holds, whatever its method: name, method, modules, ranks, parameter count,
    and its metadata (LoRaD: pairing, base dtype; every method: the base-weight fingerprint)."""
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if metadata.get("wadi_format") == PEFT_ADAPTER_FORMAT:
        targets, _ = _peft_metadata(path, tensors, metadata)
        ranks = {k: v.shape[0] for k, v in tensors.items() if ".lora_A." in k and v.ndim >= 2}
        details = {"component": metadata.get("component"), "base_fingerprint": metadata.get("base_fingerprint")}
        return {"name": metadata.get("adapter_name"), "method": metadata.get("method"),
                "modules": len(targets), "ranks": sorted(set(ranks.values())),
                "parameters": sum(t.numel() for t in tensors.values()), "details": details}
    tensors, metadata = lorad.read_adapter(path)  # validated: name, ranks, pairing, factor shapes, finite
    ranks = json.loads(metadata["ranks"])
    details = {key: metadata.get(key) for key in ("pairing", "base_dtype", "base_fingerprint")}
    return {"name": metadata["adapter_name"], "method": "lorad", "modules": len(ranks),
            "ranks": sorted(set(ranks.values())), "parameters": sum(t.numel() for t in tensors.values()),
            "details": details}


def merge_file(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
               component: str | None = None, strict_base: bool = True) -> str:
    """Bake the adapter file ``adapter`` (any method) into the denoiser of ``base`` (a diffusers model
    or pipeline folder) and save a plain diffusers model folder at ``out``; returns the adapter's name.
    With ``strict_base`` the base weights must be the ones the adapter was trained on. ``out`` follows
    the output policy (apart from the inputs, empty or new) and appears only when complete."""
    from wadi_analysis.errors import UserError
    from wadi_analysis.outputs import check_output, staged_folder

    from .teacher import load_denoiser

    out = Path(out)
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty")
    check_output(out, [base, adapter], folder=True)
    model = load_denoiser(base, component)
    name = load_adapter(model, adapter, strict_base=strict_base)
    merged = merge_and_unload(model, name)
    check_finite(merged, adapter)
    with staged_folder(out) as stage:
        merged.save_pretrained(stage)
    return name


def check_finite(model: nn.Module, source) -> None:
    """A merged model with NaN or infinite weights is refused (a tampered or diverged adapter)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{source}: the merged weight {name} is not finite (NaN or infinite values)")
