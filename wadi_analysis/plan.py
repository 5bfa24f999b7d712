"""From findings to a LoRaD placement plan: which modules to adapt and at which rank, under a budget.

A plan is JSON: ``{"format": "wadi-lorad-plan", "version": 1, "targets": {module name: rank}, ...}``;
``wadi_distill`` reads it (``--plan plan.json``).

Planning rule (documented, deterministic). Every Linear/Conv weight of the per-layer table is a
candidate. Its LoRaD cost per unit of rank is ``out + width // 2`` (:func:`.geometry.cost_per_rank`).
The rank it *needs* is the rank of its angle field for 90 % energy (``compare --lorad-fit``), else of
its residual (``--spectrum``), else 30 % of the largest possible rank. Its *importance* is how much
it rotates — the sum over rows of ``1 - cos`` (``direction_change_mean / 100 * rows``) — times the
share of its change a rotation can express, when known. Layers are taken by importance per parameter
at their needed rank (rounded up to a multiple of ``rank_multiple``, capped at ``max_rank``) until the
budget is spent; the first layer that no longer fits gets the largest rank that does.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .atomic import atomic_write_text, probe_writable
from .compare import COMPARISON_FILES, read_comparison
from .errors import InvalidValue, UserError
from .outputs import check_output
from .geometry import angle_field_shape, cost_per_rank, row_width
from .spectrum import PAPER_RANK_FRACTION

PLAN_FORMAT = "wadi-lorad-plan"


@dataclass(frozen=True)
class Preset:
    """A published placement: modules matching ``pattern`` (regex on module names) of the given kinds."""

    description: str
    pattern: str
    rank: int
    kinds: tuple[str, ...] = ("linear",)
    exclude: str | None = None

    def matches(self, module_name: str, kind: str) -> bool:
        return (kind in self.kinds and re.search(self.pattern, module_name) is not None
                and not (self.exclude and re.search(self.exclude, module_name)))


PRESETS = {
    "sd-unet-generator": Preset("SD U-Net generator: every Linear in down/mid/up blocks, rank 256",
                                r"^(down_blocks|mid_block|up_blocks)\.", 256),
    "sd-unet-generator-conv": Preset("SD U-Net generator with convolutions: every Linear and Conv2d in "
                                     "down/mid/up blocks, rank 256", r"^(down_blocks|mid_block|up_blocks)\.", 256,
                                     kinds=("linear", "conv")),
    "sd-unet-fake": Preset("SD U-Net fake score: attention and feed-forward Linear layers, rank 32",
                           r"^(down_blocks|mid_block|up_blocks)\..*\.(attn1|attn2|ff)\.", 32),
    "pixart-generator": Preset("PixArt generator: every Linear except adaln_single, rank 128",
                               r".", 128, exclude=r"^adaln_single\."),
    "pixart-generator-released": Preset("PixArt generator as the released code adapts it: every Linear, "
                                        "adaln_single included, rank 128", r".", 128),
    "pixart-fake": Preset("PixArt fake score: Linear layers in transformer_blocks, rank 32",
                          r"^transformer_blocks\.", 32),
    # Flow-matching transformers: the project's placements (no published LoRaD placement exists for
    # them), the same split as above: the generator adapts every Linear of the blocks, modulation
    # included; the fake score only attention and feed-forward.
    "sd3-generator": Preset("SD3/SD3.5 generator: every Linear in transformer_blocks, rank 128",
                            r"^transformer_blocks\.", 128),
    "sd3-fake": Preset("SD3/SD3.5 fake score: attention and feed-forward Linear layers, rank 32",
                       r"^transformer_blocks\.\d+\.(attn2?|ff|ff_context)\.", 32),
    "flux-generator": Preset("FLUX.1 generator: every Linear in the double and single blocks, rank 128",
                             r"^(single_)?transformer_blocks\.", 128),
    "flux-fake": Preset("FLUX.1 fake score: attention and feed-forward Linear layers (single blocks: q/k/v, "
                        "proj_mlp, proj_out), rank 32",
                        r"^transformer_blocks\.\d+\.(attn|ff|ff_context)\.|"
                        r"^single_transformer_blocks\.\d+\.(attn\.|proj_mlp$|proj_out$)", 32),
    # SANA's blocks hold only attention and the GLUMBConv feed-forward, whose 1x1 convolutions are
    # Linears on pixels; its depthwise 3x3 (one input channel per row) is left out.
    "sana-generator": Preset("SANA generator: every Linear and 1x1 conv in transformer_blocks, rank 128",
                             r"^transformer_blocks\.", 128, kinds=("linear", "conv"), exclude=r"\.conv_depth$"),
    "sana-fake": Preset("SANA fake score: attention and feed-forward in transformer_blocks, rank 32",
                        r"^transformer_blocks\.\d+\.(attn1|attn2|ff)\.", 32, kinds=("linear", "conv"),
                        exclude=r"\.conv_depth$"),
}


def _geometry(layers: pd.DataFrame) -> pd.DataFrame:
    """Module name, rows, column pairs and LoRaD cost per rank of each Linear/Conv weight LoRaD can rotate."""
    frame = layers[layers["kind"].isin(["linear", "conv"]) & layers["name"].astype(str).str.endswith(".weight")].copy()
    frame["name"] = frame["name"].astype(str)
    shapes = frame["shape"].map(_shape)
    frame["module"] = frame["name"].str.removesuffix(".weight")
    frame["out"] = shapes.map(lambda s: s[0])
    frame["width"] = shapes.map(row_width)
    frame["pairs"] = shapes.map(lambda s: angle_field_shape(s)[1])
    frame["cost_per_rank"] = shapes.map(cost_per_rank)
    return frame[frame["pairs"] >= 1]


def _shape(text, where: str = "layers.csv") -> tuple[int, ...]:
    """``"320x320x1x1"`` (the shape column) as ints; anything else is a :class:`UserError`."""
    parts = str(text).split("x")
    if len(parts) < 2 or not all(p.isdigit() and p.isascii() and int(p) > 0 for p in parts):
        raise UserError(f"{where}: shape {str(text)[:40]!r} is not a shape like 320x320 of positive sizes")
    return tuple(int(p) for p in parts)


def _model_params(summary: dict, layers: pd.DataFrame, where: Path) -> int:
    """The teacher's parameter count from the summary, else the table's."""
    count = (summary.get("teacher") or {}).get("n_params")
    if count is None:
        return int(layers["numel"].fillna(0).sum())
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise UserError(f"{where}: teacher n_params {str(count)[:40]!r} is not a positive integer")
    return count


def check_plan_options(budget: float, max_rank: int, rank_multiple: int) -> None:
    """The planner's options in range: a finite budget > 0, ranks of whole positive sizes, the cap a
    multiple's worth (else every planned rank would break the multiple)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise InvalidValue(f"--budget {budget} is not a positive finite number (a fraction <= 1 or a count)")
    for flag, value in (("--max-rank", max_rank), ("--rank-multiple", rank_multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidValue(f"{flag} {value!r} is not a positive integer")
    if max_rank < rank_multiple:
        raise InvalidValue(f"--max-rank {max_rank} is below --rank-multiple {rank_multiple}")


def find_preset(name: str) -> Preset:
    """The published placement called ``name``, or a message listing them."""
    if not isinstance(name, str) or name not in PRESETS:
        raise InvalidValue(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_plan(layers: pd.DataFrame, preset: str, rank: int | None = None) -> dict[str, int]:
    """The published placement ``preset`` on the modules of a per-layer table."""
    chosen = find_preset(preset)
    frame = _geometry(layers)
    return {m: rank or chosen.rank for m, k in zip(frame["module"], frame["kind"]) if chosen.matches(m, k)}


def plan_from_findings(layers: pd.DataFrame, budget_params: int, *, max_rank: int = 256, rank_multiple: int = 8,
                       kinds: tuple[str, ...] = ("linear", "conv")) -> tuple[dict[str, int], pd.DataFrame]:
    """Targets and ranks under ``budget_params`` trainable parameters (see the module docstring)."""
    frame = _geometry(layers)
    frame = frame[frame["kind"].isin(kinds) & (frame["status"] != "nonfinite")].copy()
    full_rank = frame[["out", "pairs"]].min(axis=1)  # the angle field's largest possible rank
    for column in ("angle_field_rank_90", "residual_rank_90"):
        if column in frame:
            needed = frame[column]
            break
    else:
        needed = pd.Series(float("nan"), index=frame.index)
    needed = needed.fillna((PAPER_RANK_FRACTION * full_rank).apply(math.ceil)).clip(lower=1)
    rounded = (needed / rank_multiple).apply(math.ceil) * rank_multiple
    frame["needed_rank"] = pd.concat([rounded, full_rank, pd.Series(max_rank, index=frame.index)], axis=1).min(axis=1)
    fit = frame["lorad_fit"].fillna(0).clip(lower=0) / 100 if "lorad_fit" in frame else 1.0
    frame["importance"] = (frame["direction_change_mean"].fillna(0) / 100 * frame["rows"] * fit)
    frame["density"] = frame["importance"] / (frame["needed_rank"] * frame["cost_per_rank"])
    frame = frame.sort_values(["density", "module"], ascending=[False, True])
    targets: dict[str, int] = {}
    spent = 0
    for row in frame.itertuples():
        if row.importance <= 0:
            break
        rank = int(row.needed_rank)
        if spent + rank * row.cost_per_rank > budget_params:
            rank = (budget_params - spent) // row.cost_per_rank // rank_multiple * rank_multiple
            if rank < 1:
                break
        targets[row.module] = rank
        spent += rank * row.cost_per_rank
    frame["planned_rank"] = frame["module"].map(targets).fillna(0).astype(int)
    return targets, frame


def plan_cost(layers: pd.DataFrame, targets: dict[str, int]) -> int:
    """Trainable parameters of LoRaD at ``targets``: sum of rank * cost_per_rank."""
    cost = _geometry(layers).set_index("module")["cost_per_rank"]
    return int(sum(rank * cost[module] for module, rank in targets.items()))


def write_plan(path: str | os.PathLike, targets: dict[str, int], **info) -> Path:
    return atomic_write_text(path, json.dumps({"format": PLAN_FORMAT, "version": 1, **info, "targets": targets},
                                              indent=2) + "\n")


def make_plan(comparison_dir: str | os.PathLike, out: str | os.PathLike, *, budget: float, preset: str | None = None,
              max_rank: int = 256, rank_multiple: int = 8, kinds: tuple[str, ...] = ("linear", "conv")) -> dict:
    """Read ``layers.csv``/``summary.json`` of a comparison and write a plan; returns the plan's content.

    ``budget`` is a fraction of the model's parameters (e.g. 0.1) or, if > 1, a parameter count.
    With ``preset``, the published placement is written instead (and the findings-based plan's cost
    is reported beside it for comparison). A folder that does not make a plan is a :class:`UserError`.
    """
    comparison_dir = Path(comparison_dir)
    check_plan_options(budget, max_rank, rank_multiple)
    layers, summary = read_comparison(comparison_dir, "a plan")
    check_output(out, [comparison_dir / name for name in COMPARISON_FILES], folder=False)
    probe_writable(out)
    for text in layers.loc[layers["kind"].isin(["linear", "conv"]), "shape"]:
        _shape(text, str(comparison_dir / "layers.csv"))
    model_params = _model_params(summary, layers, comparison_dir / "summary.json")
    budget_params = int(budget * model_params) if budget <= 1 else int(budget)
    findings, _ = plan_from_findings(layers, budget_params, max_rank=max_rank, rank_multiple=rank_multiple,
                                     kinds=kinds)
    targets = preset_plan(layers, preset) if preset else findings
    if not targets:
        raise UserError(f"no layer of {comparison_dir} fits a plan: the budget of {budget_params:,} parameters "
                        f"is too small, or no {'/'.join(kinds)} layer rotates" if not preset
                        else f"preset {preset} matches no layer of {comparison_dir}")
    info = {
        "method": f"preset {preset}" if preset else "findings (see wadi_analysis.plan)",
        "source": str(comparison_dir), "model_params": model_params, "budget_params": budget_params,
        "trainable_params": plan_cost(layers, targets), "findings_plan_params": plan_cost(layers, findings),
        "used_columns": [c for c in ("angle_field_rank_90", "residual_rank_90", "lorad_fit") if c in layers],
    }
    write_plan(out, targets, **info)
    return {**info, "targets": targets}
