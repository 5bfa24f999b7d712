"""LoRaD: low-rank rotation of weight direction (WaDi §2).

``rotation``  the math (``compiled`` its opt-in torch.compile kernel); ``model`` the surgery (named adapters on one frozen base,
switch, merge/unmerge); ``targets`` where adapters go; ``io`` adapter files.
"""

from .io import AdapterFileError, base_fingerprint, load_adapter, read_adapter, save_adapter
from .model import (activate, add_adapter, adapter_names, adapter_parameters, adapter_state_dict, disable_adapters, merge,
                    merge_and_unload, release_rotations, rotation_memory, set_adapter, set_rotation_reuse, unmerge)
from .rotation import (PairRotation, RotatedWeight, RotationAdapter, rotate_rows, rotated_weight, rotation_kernel_status,
                       set_rotation_kernel)
from .targets import PRESETS, TargetSpec, check_targets, read_plan, resolve_preset, resolve_spec, write_plan

__all__ = [
    "AdapterFileError", "PRESETS", "PairRotation", "RotatedWeight", "RotationAdapter", "TargetSpec", "activate", "add_adapter",
    "adapter_names", "adapter_parameters", "adapter_state_dict", "base_fingerprint", "check_targets",
    "disable_adapters", "load_adapter", "merge", "merge_and_unload", "read_adapter", "read_plan",
    "release_rotations", "resolve_preset", "resolve_spec", "rotate_rows", "rotated_weight", "rotation_kernel_status",
    "rotation_memory", "save_adapter", "set_adapter", "set_rotation_kernel", "set_rotation_reuse", "unmerge",
    "write_plan",
]
