"""wadi_analysis: compare a teacher and a one-step student checkpoint weight by weight (WaDi §1).

Data flows one way: checkpoint source -> aligned pairs -> per-layer rows (pandas DataFrame) ->
figures/tables -> report.
"""

from .checkpoint import CheckpointError, CheckpointSource, TensorInfo
from .compare import Comparison, compare, compare_sources, summarize
from .layers import LayerLabel, label
from .locate import open_checkpoint
from .lora_student import LoraStudentSource, open_lora_student, read_lora

__all__ = [
    "CheckpointError", "CheckpointSource", "Comparison", "LayerLabel", "TensorInfo", "compare",
    "compare_sources", "label", "LoraStudentSource", "open_checkpoint", "open_lora_student", "read_lora", "summarize",
]
