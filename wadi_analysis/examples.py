"""Example teacher/student pairs with known, planted weight changes.

``wadi-analyze example-pair DIR`` writes two tiny U-Nets in the exact SD1.5 layout (same module names,
1x1-conv ``proj_in``, GEGLU feed-forward) whose differences are planted row by row: every row of every
Linear/Conv weight is rotated by a known angle and rescaled by a known factor, so the comparison has a
ground truth (``planted.csv``) to be checked against. (A real distilled pair, the embedded teacher and
its students, comes from ``wadi-distill reproduce``.)
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

import torch

from .atomic import probe_writable
from .decompose import rows
from .outputs import check_output, staged_folder

CONFIGS = ("sd15_unet", "sd21_unet", "sdxl_unet", "pixart_alpha_xl2_transformer", "sd3_medium_transformer",
           "flux1_dev_transformer", "sana_1600m_1024px_transformer")


def real_config(name: str) -> dict:
    """The diffusers config of a real architecture shipped with the package (see ``CONFIGS``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; one of {', '.join(CONFIGS)}")
    config = json.loads(resources.files("wadi_analysis.configs").joinpath(f"{name}.json").read_text())
    config.pop("_class_name", None)
    return config


def tiny_sd15_config() -> dict:
    """SD1.5's U-Net layout (names, block types, conv proj_in) at a few MB."""
    config = real_config("sd15_unet")
    config.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=64, attention_head_dim=8,
                  norm_num_groups=16, sample_size=16)
    return config


def rotate_in_random_planes(weight_rows: torch.Tensor, angles: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
    """Rotate each row by its angle (radians) in the plane of the row and a random orthogonal direction:
    w' = cos(a) w + sin(a) ||w|| u, u a random unit vector orthogonal to w.

    Not LoRaD's rotation (that one turns fixed column pairs, see :mod:`.geometry`): a whole-row turn of
    a known angle. Norms are preserved exactly (in exact arithmetic) and cos(new, old) = cos(angle).
    """
    w = weight_rows.double()
    norms = w.norm(dim=1, keepdim=True)
    unit = w / norms
    random = torch.randn(w.shape, generator=generator, dtype=torch.float64)
    orthogonal = random - (random * unit).sum(dim=1, keepdim=True) * unit
    orthogonal = orthogonal / orthogonal.norm(dim=1, keepdim=True)
    angles = angles.double().unsqueeze(1)
    return (torch.cos(angles) * w + torch.sin(angles) * norms * orthogonal).to(weight_rows.dtype)


def plant(weight: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A weight whose row j is row j of ``weight`` rotated by ``angles[j]`` and scaled by ``scales[j]``."""
    flat = rows(weight)
    changed = rotate_in_random_planes(flat, angles, generator) * scales.to(flat.dtype).unsqueeze(1)
    return changed.reshape(weight.shape)


def planted_student(teacher_state: dict[str, torch.Tensor], seed: int = 0, mean_angle_deg: float = 8.0,
                    norm_jitter: float = 0.002) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Student weights + the truth per layer: angles ~ |N(0, s)| with a per-layer s, norms x (1 + N(0, jitter)).

    Per-layer scales vary (log-uniform over a factor of 8 around ``mean_angle_deg``) so layers differ,
    as they do in real distilled students; 1-D tensors (biases, norms) are copied unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    student, truth = {}, []
    for name, weight in teacher_state.items():
        if weight.ndim < 2:
            student[name] = weight.clone()
            continue
        layer_scale = mean_angle_deg * 2 ** (torch.rand((), generator=generator).item() * 3 - 1.5)
        angles = torch.deg2rad(torch.randn(weight.shape[0], generator=generator, dtype=torch.float64).abs()
                               * layer_scale * math.sqrt(math.pi / 2))
        scales = 1 + norm_jitter * torch.randn(weight.shape[0], generator=generator, dtype=torch.float64)
        student[name] = plant(weight, angles, scales, generator)
        direction = 100 * (1 - torch.cos(angles))
        norm_change = 100 * (scales - 1).abs()
        truth.append({"name": name, "angle_deg_mean": torch.rad2deg(angles).mean().item(),
                      "direction_change_mean": direction.mean().item(),
                      "direction_change_std": direction.std(correction=0).item(),
                      "norm_change_mean": norm_change.mean().item(),
                      "norm_change_std": norm_change.std(correction=0).item()})
    return student, truth


def is_example_pair(folder: Path) -> bool:
    """A folder :func:`make_example_pair` wrote (so it may be replaced): its three entries, nothing else."""
    return sorted(p.name for p in folder.iterdir()) == ["planted.csv", "student", "teacher"]


def make_example_pair(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write ``teacher/`` and ``student/`` (diffusers folders, fp32) and ``planted.csv`` under ``out_dir``.

    ``out_dir`` follows :mod:`wadi_analysis.outputs`: a new or empty folder, an earlier example pair, or
    (``overwrite``) any folder is replaced whole once the pair is complete."""
    import pandas as pd
    from diffusers import UNet2DConditionModel

    out_dir = check_output(out_dir, folder=True, replace=True, overwrite=overwrite, ours=is_example_pair)
    probe_writable(out_dir)
    torch.manual_seed(seed)
    teacher = UNet2DConditionModel(**tiny_sd15_config())
    student_state, truth = planted_student(teacher.state_dict(), seed=seed)
    with staged_folder(out_dir) as stage:
        teacher.save_pretrained(stage / "teacher")
        teacher.load_state_dict(student_state)
        teacher.save_pretrained(stage / "student")
        pd.DataFrame(truth).to_csv(stage / "planted.csv", index=False)
    return {"teacher": out_dir / "teacher", "student": out_dir / "student", "planted": out_dir / "planted.csv"}
