"""FSDP2 for the distiller: the frozen base is sharded across processes, the adapters stay whole.

Asked for the accelerate way: ``accelerate launch --config_file configs/accelerate_fsdp2.yaml`` (or
``--use_fsdp --fsdp_version 2``), i.e. ``distributed_type: FSDP`` with ``fsdp_version: 2``. The loop
does not hand the model to ``accelerator.prepare`` (one module plays three roles by switching adapters);
instead :func:`shard` applies ``torch.distributed.fsdp.fully_shard`` itself, per block (transformer
blocks, ResNet blocks, attention blocks: the model's ``_no_split_modules`` and ``Transformer2DModel``,
or the config's ``fsdp_transformer_layer_cls_to_wrap``) and then at the root, so each process holds
about 1/N of the base weights and all-gathers one block at a time in forward and backward.

The trainable parameters (both adapters) are left out of the sharding (``ignored_params``): every
process keeps them whole, their gradients are averaged across processes as without FSDP, and
checkpoints, EMA, resume and the adapter file need no gathering. Only the frozen base is sharded,
which for adapter runs is nearly all of the memory (the adapters are a few percent of it).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
from torch import nn

# Besides the model's own ``_no_split_modules`` (diffusers: BasicTransformerBlock, ResnetBlock2D, ...):
# each U-Net attention block (proj_in/out and norm around its transformer blocks) is its own unit too.
EXTRA_UNITS = ("Transformer2DModel",)


def fsdp_plugin(accelerator):
    """The accelerate FSDP plugin of this launch, or None when FSDP was not asked for.

    On GPUs accelerate builds it (``accelerator.state.fsdp_plugin``). On CPU-only processes accelerate
    runs plain multi-CPU data parallelism and drops the plugin, so it is read from the same
    environment ``accelerate launch`` sets (``ACCELERATE_USE_FSDP``, ``FSDP_*``).
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
    return plugin


def unsupported(plugin, config, on_validate) -> str | None:
    """Why this run cannot be sharded as asked (one line), or None."""
    if plugin.fsdp_version != 2:
        return ("FSDP1 cannot shard one frozen base whose adapters switch roles; "
                "use fsdp_version: 2 in the accelerate config (--fsdp_version 2)")
    if config.adapter == "full":
        return "FSDP shards the frozen base of adapter runs; --adapter full is not supported with FSDP"
    if config.regression_weight:
        return ("the regression term (regression_weight, on in the embedded teacher's defaults) is not supported "
                "with FSDP yet; set regression_weight = 0 in the --config TOML")
    if on_validate is not None:
        return "FSDP runs validation on every process; an on_validate callback is not supported with FSDP"
    if getattr(plugin, "activation_checkpointing", False):
        return "use --gradient-checkpointing (diffusers' own) instead of fsdp_activation_checkpointing"
    return None


def units(model: nn.Module, class_names=None) -> list[nn.Module]:
    """The sub-modules that become FSDP units, children before parents (``fully_shard`` order)."""
    names = set(class_names or []) or set(getattr(model, "_no_split_modules", None) or []) | set(EXTRA_UNITS)
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    return found[::-1]  # reversed pre-order: every module after all of its descendants


def shard(model: nn.Module, accelerator, plugin, whole: list[nn.Parameter]) -> dict[str, int]:
    """Shard ``model``'s weights but ``whole`` (the adapters) over all processes with FSDP2, in place, and
    move it to the device.

    Returns this process's share: ``{"local": elements held here, "full": elements of the sharded weights}``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import OffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    device = accelerator.device
    whole = set(whole)  # the adapters (of every role, active or not): replicated, averaged by hand
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    offload = plugin.cpu_offload if isinstance(plugin.cpu_offload, OffloadPolicy) else OffloadPolicy()
    options = dict(mesh=mesh, reshard_after_forward=bool(plugin.reshard_after_forward), offload_policy=offload,
                   ignored_params=whole)
    class_names = plugin.transformer_cls_names_to_wrap if plugin.auto_wrap_policy is not None else None
    blocks = units(model, class_names)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    with torch.no_grad():  # ignored parameters are not moved by fully_shard
        for parameter in whole:
            parameter.data = parameter.data.to(device)
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    share = {"local": sum(p.to_local().numel() for p in sharded), "full": sum(p.numel() for p in sharded),
             "units": len(blocks) + 1}
    print(f"fsdp2: process {accelerator.process_index}/{accelerator.num_processes} holds {share['local']:,} of "
          f"{share['full']:,} base weights ({100 * share['local'] / max(1, share['full']):.1f} %) in "
          f"{share['units']} units", file=sys.stderr, flush=True)
    return share


@contextmanager
def full_weights(model: nn.Module):
    """Inside, every FSDP unit of ``model`` holds its whole weights (all-gathered), so code that reads
    them (the adapter file's base fingerprint, digests) sees the full base. Collective: every process
    must enter. Without FSDP it does nothing."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    with torch.no_grad():
        for module in modules:
            module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
