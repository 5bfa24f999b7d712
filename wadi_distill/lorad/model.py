"""Model surgery for LoRaD: several named adapters on one frozen base model.

Each adapted Linear/Conv2d gets a ``torch.nn.utils.parametrize`` parametrization of its ``weight``:
``module.weight`` *is* the rotated weight whenever an adapter is active, so the module's own forward
runs its single matmul/convolution on it, and any code that reads ``.weight`` sees the adapted
value. With no adapter active, ``weight`` is the frozen base weight: one model serves as teacher
(no adapter), generator (large-rank adapter) and fake score (small-rank adapter).

Rotated weights of :data:`REUSE_MIN_BYTES` or more cost no allocation and are not built twice from
the same factors (smaller ones are cheaper to rebuild in fresh memory than to track):

* on the CPU every rotated weight is written into a buffer of the model's :class:`RotationBuffers`,
  handed out again (to any layer of that shape and dtype) once nothing holds its memory any more: no
  autograd graph, no caller, no kept rotation;
* one built without autograd recording (``torch.no_grad``, or factors that do not require grad) is
  kept per layer and adapter and served again, to calls with or without grad, while the factors are
  the same tensors with the same version counters *and the same values* (compared with a copy kept
  with it, so writes that bypass version counters, e.g. through ``.data``, are seen too), the base
  weight is the same tensor at the same version, and nothing wrote to the kept weight. The fake
  score's weights, built under ``no_grad`` in the generator step, serve its own training step.

:func:`release_rotations` frees both (merging, unmerging, adding adapters and ``.to()`` do it too);
:func:`set_rotation_reuse` turns keeping off where memory is tighter than time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from wadi_analysis.geometry import row_width

from .rotation import RotationAdapter, fused_rotation, rotate_rows

ADAPTABLE = (nn.Linear, nn.Conv2d)


def _storage_uses(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


try:  # how many references a buffer's memory has when only the pool's own tensor holds it
    _UNUSED = _storage_uses(torch.empty(1))
except (AttributeError, RuntimeError, TypeError):  # not in this torch: no recycling, fresh buffers
    _UNUSED = None


REUSE_MIN_BYTES = 1 << 18  # smaller weights are rebuilt in fresh memory: cheaper than the bookkeeping


class RotationBuffers:
    """Weight-sized buffers for the rotated weights of one model, recycled across its layers: a buffer is
    handed out again once the storage use count says nothing but this pool holds its memory. CPU only:
    glibc maps and unmaps every large block afresh (page faults each time), where a GPU's caching
    allocator already recycles, and for any use (activations too)."""

    def __init__(self) -> None:
        self.by_shape: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if (_UNUSED is None or device.type != "cpu" or torch.is_inference_mode_enabled()
                or shape.numel() * dtype.itemsize < REUSE_MIN_BYTES):
            return torch.empty(shape, dtype=dtype, device=device)
        buffers = self.by_shape.setdefault((tuple(shape), dtype, device), [])
        for buffer in buffers:
            if _storage_uses(buffer) <= _UNUSED:
                return buffer
        buffers.append(torch.empty(shape, dtype=dtype, device=device))
        return buffers[-1]

    def nbytes(self) -> int:
        return sum(b.nbytes for buffers in self.by_shape.values() for b in buffers)

    def clear(self) -> None:
        self.by_shape.clear()

    def __deepcopy__(self, memo) -> RotationBuffers:  # a copied model gets its own, empty pool
        return RotationBuffers()

    def __getstate__(self) -> dict:
        return {"by_shape": {}}


def _stamp(*tensors: torch.Tensor) -> tuple:
    return tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)


@dataclass
class _Kept:
    """A rotated weight built without autograd, with what it was built from."""

    rotated: torch.Tensor  # a view of a pool buffer (holding it)
    written: int  # ``rotated``'s version counter when kept: any in-place write through an alias moves it
    sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # weight, A, B
    stamp: tuple
    values: tuple[torch.Tensor, torch.Tensor]  # copies of A and B

    def serves(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
        return (all(x is y for x, y in zip(self.sources, (weight, a, b))) and self.rotated._version == self.written
                and _stamp(weight, a, b) == self.stamp
                and torch.equal(a, self.values[0]) and torch.equal(b, self.values[1]))


class KeptRotations(dict):
    """adapter name -> :class:`_Kept`, for one layer; copies and pickles of a model start empty."""

    def __deepcopy__(self, memo) -> KeptRotations:
        return KeptRotations()

    def __reduce__(self):
        return KeptRotations, ()


class LoRaDParametrization(nn.Module):
    """Holds every adapter of one weight; applies the active one (or none)."""

    def __init__(self, pool: RotationBuffers | None = None) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None  # an adapter whose rotation is already in the base weight
        self.pool = pool if pool is not None else RotationBuffers()
        self.kept = KeptRotations()
        self.reuse = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        name = self.active
        if name is None or name == self.merged or name not in self.adapters:
            return weight
        adapter = self.adapters[name]
        a, b = adapter.A, adapter.B
        records = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or weight.requires_grad)
        if self.kept:
            kept = self.kept.pop(name, None)
            if kept is not None and kept.serves(weight, a, b):
                self.kept[name] = kept
                return fused_rotation(weight, a, b, kept.rotated, ready=True) if records else kept.rotated
            del kept  # its buffer may serve this very build
        out = self.pool.take(weight.shape, weight.dtype, weight.device)
        # Angles and the rotation in float32 (A's dtype); one cast back to the base dtype.
        result = fused_rotation(weight, a, b, out)
        if (self.reuse and not records and weight.nbytes >= REUSE_MIN_BYTES and weight.device.type != "meta"
                and not torch.is_inference_mode_enabled()):
            rotated = out.view(weight.shape)
            self.kept[name] = _Kept(rotated, rotated._version, (weight, a, b), _stamp(weight, a, b),
                                    (a.detach().clone(), b.detach().clone()))
        return result

    def release(self) -> None:
        self.kept.clear()
        self.pool.clear()

    def _apply(self, fn, recurse=True):  # .to() / .half() / ...: nothing built on the old tensors survives
        self.release()
        return super()._apply(fn, recurse)


def lorad_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, LoRaDParametrization]]:
    """(name, module, parametrization) for every LoRaD-adapted module of ``model``."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LoRaDParametrization):
                    yield name, module, p


def base_weight(module: nn.Module) -> torch.Tensor:
    """The stored (unrotated, or merged) weight of an adapted or plain module."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def add_adapter(model: nn.Module, name: str, targets: dict[str, int], seed: int = 0) -> int:
    """Attach adapter ``name`` with the given rank per module name; returns its parameter count.

    The base weights are frozen. The new adapter is not activated (see :func:`set_adapter`).
    """
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in the model ({len(missing)} missing targets)")
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    count, pool = 0, next((p.pool for _, _, p in lorad_modules(model)), None) or RotationBuffers()
    release_rotations(model)
    for module_name, rank in targets.items():
        module = modules[module_name]
        if not isinstance(module, ADAPTABLE):
            raise ValueError(f"{module_name} is a {type(module).__name__}; LoRaD adapts Linear and Conv2d")
        parametrization = next((p for _, m, p in lorad_modules(module) if m is module), None)
        if parametrization is None:
            parametrization = LoRaDParametrization(pool)
            parametrize.register_parametrization(module, "weight", parametrization)
        if name in parametrization.adapters:
            raise ValueError(f"{module_name} already has an adapter named {name!r}")
        weight = base_weight(module)
        # Initialise on the CPU with the seeded generator (or shape-only on meta), then move.
        adapter = RotationAdapter(weight.shape[0], row_width(weight.shape), rank,
                                  generator=None if weight.is_meta else generator,
                                  device="meta" if weight.is_meta else "cpu")
        parametrization.adapters[name] = adapter.to(weight.device)
        count += sum(p.numel() for p in adapter.parameters())
    set_adapter(model, _active_name(model))
    return count


def _parametrizations(model: nn.Module) -> list[LoRaDParametrization]:
    """Every LoRaD parametrization of ``model``: one pass over its modules, no names (what switching needs)."""
    return [m for m in model.modules() if isinstance(m, LoRaDParametrization)]


def _active_name(model: nn.Module) -> str | None:
    return next((p.active for p in _parametrizations(model) if p.active is not None), None)


def _names(parametrizations: list[LoRaDParametrization]) -> list[str]:
    names: dict[str, None] = {}
    for p in parametrizations:
        names.update(dict.fromkeys(p.adapters))
    return list(names)


def adapter_names(model: nn.Module) -> list[str]:
    return _names(_parametrizations(model))


def _switch(parametrizations: list[LoRaDParametrization], name: str | None) -> None:
    for p in parametrizations:
        p.active = name if name in p.adapters else None
        for adapter_name, adapter in p.adapters.items():
            wanted = adapter_name == name
            for param in (adapter.A, adapter.B):
                if param.requires_grad is not wanted:
                    param.requires_grad_(wanted)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Activate adapter ``name`` (``None``: the frozen base). Only its parameters require grad."""
    parametrizations = _parametrizations(model)
    if name is not None and not any(name in p.adapters for p in parametrizations):
        raise ValueError(f"no adapter named {name!r}; adapters: {', '.join(_names(parametrizations)) or 'none'}")
    _switch(parametrizations, name)


def activate(model: nn.Module, name: str | None) -> bool:
    """:func:`set_adapter` where ``model`` has LoRaD adapters (a name it lacks activates none); whether it has."""
    parametrizations = _parametrizations(model)
    _switch(parametrizations, name if any(name in p.adapters for p in parametrizations) else None)
    return bool(parametrizations)


def release_rotations(model: nn.Module) -> None:
    """Drop every kept rotated weight and recycled buffer of ``model`` (their memory goes back)."""
    for _, _, p in lorad_modules(model):
        p.release()


def set_rotation_reuse(model: nn.Module, enabled: bool) -> None:
    """Keep rotated weights built without autograd for reuse (the default), or build them every time
    (less memory: the fake score's weights are then not held between the generator and fake steps)."""
    for _, _, p in lorad_modules(model):
        p.reuse = enabled
        p.kept.clear()


def rotation_memory(model: nn.Module) -> int:
    """Bytes held by ``model``'s rotation buffers (in use or free)."""
    pools = {id(p.pool): p.pool for _, _, p in lorad_modules(model)}
    return sum(pool.nbytes() for pool in pools.values())


def disable_adapters(model: nn.Module) -> None:
    """The base model's behaviour (the teacher)."""
    set_adapter(model, None)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [param for _, _, p in lorad_modules(model) if name in p.adapters for param in p.adapters[name].parameters()]


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``{module}.lorad_A`` / ``{module}.lorad_B`` for adapter ``name``."""
    state = {}
    for module_name, _, p in lorad_modules(model):
        if name in p.adapters:
            state[f"{module_name}.lorad_A"] = p.adapters[name].A.detach()
            state[f"{module_name}.lorad_B"] = p.adapters[name].B.detach()
    return state


@torch.no_grad()
def merge(model: nn.Module, name: str) -> None:
    """Write adapter ``name``'s rotation into the base weights (kept, marked merged; see :func:`unmerge`)."""
    for _, _, p in lorad_modules(model):
        if p.merged is not None:
            raise ValueError(f"adapter {p.merged!r} is already merged; unmerge it first")
    release_rotations(model)
    for _, module, p in lorad_modules(model):
        if name in p.adapters:
            original = module.parametrizations.weight.original
            original.copy_(rotate_rows(original, p.adapters[name].theta().float()).to(original.dtype))
            p.merged = name


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` by rotating back (exact up to rounding of the base dtype)."""
    release_rotations(model)
    for _, module, p in lorad_modules(model):
        if p.merged is not None:
            original = module.parametrizations.weight.original
            theta = p.adapters[p.merged].theta().float()
            original.copy_(rotate_rows(original, -theta).to(original.dtype))
            p.merged = None


@torch.no_grad()
def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Bake adapter ``name`` (if given) into the weights and remove every LoRaD parametrization.

    The result is the plain model class (e.g. a diffusers ``UNet2DConditionModel``) with ordinary
    ``weight`` parameters and state-dict keys.
    """
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}")
    release_rotations(model)
    for _, module, p in list(lorad_modules(model)):
        original = module.parametrizations.weight.original
        if name is not None and name in p.adapters and p.merged != name:
            if p.merged is not None:
                raise ValueError(f"adapter {p.merged!r} is merged; unmerge it before baking {name!r}")
            original.copy_(rotate_rows(original, p.adapters[name].theta().float()).to(original.dtype))
        elif p.merged is not None and p.merged != name:
            raise ValueError(f"adapter {p.merged!r} is merged; unmerge it or bake that adapter")
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model
