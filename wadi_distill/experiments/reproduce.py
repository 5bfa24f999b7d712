"""The paper's experiments at small scale on the embedded teacher (``wadi-distill reproduce``).

1. Teacher quality at 1, 4 and 25 DDIM steps, and the teacher used as a one-step generator.
2. VSD students at equal trainable budget (~9 % of the U-Net): LoRaD with the published placement,
   LoRaD with the analysis-derived plan, LoRA and DoRA (peft), full fine-tuning; metrics every
   ``validate_every`` steps (convergence) and at the end, over ``seeds``.
3. ``wadi_analysis.compare`` of the teacher with each student: norm vs direction change (Fig 1a),
   direction/norm ratios, residual energy at 30 % rank (Fig 1b).
4. Swaps (Fig 1c) for every student family and seed: the student with the teacher's norms, and with the
   teacher's directions.
5. LoRaD rank ablation, and LoRaD with Conv2d targets.

Every number is measured by this code; nothing is tuned towards the paper's values.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import embedded
from ..evaluation.benchmark import Benchmark
from ..evaluation.intervals import bootstrap_interval, flattened_at
from ..runs import ONE_STEP_INFO, load_sampler


@dataclass
class Settings:
    steps: int = 600
    batch_size: int = 8
    generator_lr: float = 2e-3        # LoRaD / LoRA / DoRA
    full_lr: float = 2e-4             # full fine-tuning (every weight moves; ten times lower)
    validate_every: int = 100
    curve_per_class: int = 30         # samples per class for convergence points
    final_per_class: int = 100        # samples per class for final scores
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # >= 5 seeds: bootstrap intervals over seeds (issue 14)
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    published_rank: int = 16          # the published placement at ~9 % of the U-Net
    teacher_steps: tuple[int, ...] = (1, 4, 25)
    guidance: float = 1.5
    flat_window: int = 3              # convergence: relative FD improvement over the last K points ...
    flat_threshold: float = 0.02      # ... below this (wadi_distill.evaluation.intervals.flattened_at)
    swap_students: tuple[str, ...] | None = None  # Fig 1c for these arms; None: every student family
    extra: dict = field(default_factory=dict)


QUICK = Settings(steps=20, validate_every=10, curve_per_class=5, final_per_class=10, seeds=(0,), ranks=(4, 16),
                 teacher_steps=(1, 4))


def student_overrides(settings: Settings) -> dict[str, dict]:
    """Run options of every student, by name (the plan student is added once its plan exists)."""
    generator = {"generator_preset": "sd-unet-generator", "generator_rank": settings.published_rank}
    students = {
        "full": {"adapter": "full", "generator_lr": settings.full_lr},
        "lorad-published": {"adapter": "lorad", **generator},
        "lora": {"adapter": "lora", **generator},     # peft ranks chosen for the same parameter count
        "dora": {"adapter": "dora", **generator},
    }
    for rank in settings.ranks:
        if rank != settings.published_rank:
            students[f"lorad-r{rank}"] = {"adapter": "lorad", "generator_preset": "sd-unet-generator",
                                          "generator_rank": rank}
    students["lorad-conv-r8"] = {"adapter": "lorad", "generator_preset": "sd-unet-generator-conv", "generator_rank": 8}
    return students


def train_student(name: str, overrides: dict, seed: int, out: Path, settings: Settings, curve: Benchmark,
            final: Benchmark, log) -> tuple[dict, list[dict]]:
    """One student: train with convergence points, export, score. Returns (final row, curve rows)."""
    from ..config import load_config
    from ..export import export_run
    from ..training.loop import train

    run_dir = out / "runs" / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    options = {"out": str(run_dir), "seed": seed, "steps": settings.steps, "batch_size": settings.batch_size,
               "generator_lr": settings.generator_lr, "validate_every": settings.validate_every,
               "checkpoint_every": settings.steps, "keep_checkpoints": 1, "cache_dir": str(out / "cache"),
               **settings.extra, **overrides}
    config = load_config(**options)
    points = []

    def record(step, teacher, model, vsd):
        scores = curve.evaluate_model(teacher, model, vsd)["scores"]
        points.append({"student": name, "seed": seed, "step": step, **scores})

    started = time.perf_counter()
    summary = train(config, on_validate=record)
    seconds = time.perf_counter() - started
    export_run(run_dir, run_dir / "export", ema=config.ema_decay is not None)  # an EMA run is its average
    scores = final.evaluate_model(*load_sampler(run_dir / "export"))["scores"]
    log(f"{name} seed {seed}: FD {scores['frechet_distance']:.3f}, {seconds:.0f} s")
    return ({"experiment": "students", "model": name, "seed": seed, "trainable": summary["trainable"]["generator"],
             "train_seconds": round(seconds, 1), **scores}, points)


def arm_intervals(results, metric: str = "frechet_distance") -> list[dict]:
    """Per student arm and per swap hybrid: mean of ``metric`` over seeds, percentile-bootstrap 95 % interval."""
    arms = results[results["experiment"].isin(("students", "swap"))]
    return [{"experiment": experiment, "model": name, "metric": metric,
             **bootstrap_interval(group[metric].tolist())}
            for (experiment, name), group in arms.groupby(["experiment", "model"], sort=False)]


def convergence_rows(curves, settings: Settings, metric: str = "frechet_distance") -> list[dict]:
    """Per arm and seed: whether the validation curve flattened (``flattened_at``) and at which step."""
    rows = []
    for (name, seed), group in curves.groupby(["student", "seed"], sort=False):
        group = group.sort_values("step")
        index = flattened_at(group[metric].tolist(), settings.flat_window, settings.flat_threshold)
        rows.append({"model": name, "seed": seed, "converged": index is not None,
                     "converged_step": None if index is None else int(group["step"].iloc[index]),
                     "window": settings.flat_window, "threshold": settings.flat_threshold})
    return rows


def teacher_rows(settings: Settings, final: Benchmark) -> list[dict]:
    """Experiment 1: the teacher at several step counts, and as a one-step generator without guidance."""
    teacher, model, _ = load_sampler(embedded.teacher_path())
    rows = []
    for steps, guidance in [(1, 1.0)] + [(s, settings.guidance) for s in settings.teacher_steps]:
        scores = final.evaluate_model(teacher, model, None, steps=steps, guidance_scale=guidance)["scores"]
        rows.append({"experiment": "teacher", "model": f"teacher {steps} step{'s' * (steps > 1)}, cfg {guidance}",
                     "seed": 0, "steps": steps, **scores})
    return rows


def analyse(name: str, out: Path) -> dict:
    """Experiment 3: compare the teacher's U-Net with a student's (exported, merged) U-Net."""
    from wadi_analysis.compare import compare

    comparison = compare(embedded.teacher_path(), out / "runs" / f"{name}-seed0" / "export", component="unet",
                         spectrum=True, fit=True)
    comparison.write(out / "compare" / name)
    keys = ("direction_change_mean", "norm_change_mean", "direction_to_norm_mean_ratio",
            "direction_to_norm_std_ratio", "angle_deg_mean", "radial_change_mean", "tangential_change_mean",
            "rotation_share_mean", "angle_to_norm_mean_ratio", "norms_preserved_at_rounding",
            "residual_energy_top30_mean", "lorad_fit_mean")
    return {"model": name, **{k: comparison.summary.get(k) for k in keys}}


SWAP_LABELS = (("teacher norms + student directions", "teacher", "student"),
               ("student norms + teacher directions", "student", "teacher"))


def swap_rows(out: Path, final: Benchmark, students, seeds) -> list[dict]:
    """Experiment 4 (Fig 1c) for every student family and seed: hybrids of the exported student and the
    teacher, one with the teacher's row norms, one with the teacher's row directions."""
    from wadi_analysis.swap import swap

    rows = []
    for name in students:
        for seed in seeds:
            student = out / "runs" / f"{name}-seed{seed}" / "export"
            for label, norm_from, direction_from in SWAP_LABELS:
                hybrid = out / "swaps" / f"{name}-seed{seed}-norm-{norm_from}-direction-{direction_from}"
                shutil.rmtree(hybrid, ignore_errors=True)
                swap(embedded.teacher_path(), student, hybrid, norm_from=norm_from,
                     direction_from=direction_from, component="unet")
                shutil.copy(student / ONE_STEP_INFO, hybrid / ONE_STEP_INFO)
                rows.append({"experiment": "swap", "model": f"{name}: {label}", "student": name, "seed": seed,
                             **final.evaluate_model(*load_sampler(hybrid))["scores"]})
                shutil.rmtree(hybrid)  # a full U-Net per hybrid: keep the scores, not the weights
    return rows


def plan_student(out: Path, budget: int) -> dict:
    """The analysis-derived placement: ``wadi_analysis.plan`` on the full student's comparison."""
    from wadi_analysis.plan import make_plan

    plan = out / "plan.json"
    make_plan(out / "compare" / "full", plan, budget=budget, rank_multiple=2, kinds=("linear",))
    return {"adapter": "lorad", "plan": str(plan)}


def reproduce(out: str | Path, settings: Settings | None = None, log=print, overwrite: bool = False) -> Path:
    """Run every experiment; write CSVs, the figures and report.html/report.pdf into ``out`` (a new folder,
    one an earlier reproduction wrote, or with ``overwrite`` any). A failed call removes what it added to ``out``."""
    from wadi_analysis.outputs import check_output

    from ..runs import RunFolder

    settings = settings or Settings()
    out = check_output(out, [embedded.teacher_path()], folder=True, replace=True, overwrite=overwrite,
                       ours=_is_reproduction)
    folder = RunFolder(out)  # only for its undo of a failed call: remove what this call added
    before = folder.entries()
    try:
        return _reproduce(out, settings, log)
    except BaseException:
        folder.remove_new_entries(before)
        raise


REPRODUCTION_FILES = ("settings.json", "results.csv", "report.html", "runs", "cache")


def _is_reproduction(folder: Path) -> bool:
    """A folder an earlier ``reproduce`` wrote into (it may write there again)."""
    return any((folder / name).exists() for name in REPRODUCTION_FILES)


def _reproduce(out: Path, settings: Settings, log) -> Path:
    import pandas as pd

    from .report import write_reproduction_report

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    curve, final = Benchmark(per_class=settings.curve_per_class), Benchmark(per_class=settings.final_per_class)
    rows, curves, analysis = teacher_rows(settings, final), [], []
    log(f"teacher evaluated ({time.perf_counter() - started:.0f} s)")
    students = student_overrides(settings)
    order = ["full", "lorad-published"] + [n for n in students if n not in ("full", "lorad-published")]
    for name in order:
        for seed in settings.seeds:
            row, points = train_student(name, students[name], seed, out, settings, curve, final, log)
            rows.append(row)
            curves += points
        analysis.append(analyse(name, out))
        if name == "lorad-published":  # the plan student gets the published placement's budget
            budget = next(r["trainable"] for r in rows if r["model"] == "lorad-published")
            plan = plan_student(out, budget)
            for seed in settings.seeds:
                row, points = train_student("lorad-plan", plan, seed, out, settings, curve, final, log)
                rows.append(row)
                curves += points
            analysis.append(analyse("lorad-plan", out))
    trained = list(dict.fromkeys(r["model"] for r in rows if r["experiment"] == "students"))
    rows += swap_rows(out, final, settings.swap_students or trained, settings.seeds)
    real = {"experiment": "real", "model": "real vs real (floor)", "seed": 0, **final.real_vs_real}
    results = pd.DataFrame(rows + [real])
    results.to_csv(out / "results.csv", index=False)
    curves = pd.DataFrame(curves)
    curves.to_csv(out / "curves.csv", index=False)
    pd.DataFrame(arm_intervals(results)).to_csv(out / "intervals.csv", index=False)
    pd.DataFrame(convergence_rows(curves, settings)).to_csv(out / "convergence.csv", index=False)
    pd.DataFrame(analysis).to_csv(out / "analysis.csv", index=False)
    info = {"settings": asdict(settings), "seconds": round(time.perf_counter() - started),
            "curve_real_vs_real": curve.real_vs_real}
    (out / "settings.json").write_text(json.dumps(info, indent=2) + "\n")
    write_reproduction_report(out)
    shutil.rmtree(out / "cache", ignore_errors=True)
    log(f"done in {info['seconds']} s: {out / 'report.html'}")
    return out
