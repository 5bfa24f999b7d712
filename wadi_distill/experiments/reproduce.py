"""The paper's experiments at small scale on the embedded teacher (``wadi-distill reproduce``).

1. Teacher quality at 1, 4 and 25 DDIM steps, and the teacher used as a one-step generator.
2. VSD students at equal trainable budget (~9 % of the U-Net): LoRaD with the published placement,
   LoRaD with the analysis-derived plan, LoRA, DoRA and DoRA with frozen magnitude (peft), full
   fine-tuning; metrics every ``validate_every`` steps (convergence) and at the end, over ``seeds``.
   Each (arm, seed) trains until its validation curve has flattened (:func:`curve_flattened`), at most
   ``steps`` iterations; with ``jobs`` > 1 the (arm, seed) runs go to that many worker processes.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wadi_analysis.errors import UserError

from .. import embedded
from ..config import EMBEDDED_DEFAULTS, PAPER_OBJECTIVE, merge_options
from ..evaluation.benchmark import Benchmark
from ..evaluation.intervals import bootstrap_interval, flattened_at
from ..runs import ONE_STEP_INFO, load_sampler
from .results_store import COMPARE, PLAN, RESULTS


@dataclass
class Settings:
    # the recipe: `wadi-distill run`'s defaults (its budget is the cap; an arm stops earlier once flat)
    steps: int = EMBEDDED_DEFAULTS["steps"]
    batch_size: int = EMBEDDED_DEFAULTS["batch_size"]
    generator_lr: float = EMBEDDED_DEFAULTS["generator_lr"]  # LoRaD / LoRA / DoRA
    full_lr: float = 2e-5             # full fine-tuning: the recipe sweep's better rate (4.22 against 5.46 at 1e-4)
    validate_every: int = 100
    curve_per_class: int = 30         # samples per class for convergence points
    final_per_class: int = 100        # samples per class for final scores
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # >= 5 seeds: bootstrap intervals over seeds (issue 14)
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    published_rank: int = 16          # the published placement at ~9 % of the U-Net
    teacher_steps: tuple[int, ...] = (1, 4, 25)
    guidance: float = 1.5
    flat_window: int = 3              # convergence: relative FD improvement of the last K points' mean ...
    flat_threshold: float = 0.02      # ... over the K before, below this (evaluation.intervals.flattened_at)
    early_stop: bool = True           # an arm stops once its curve has flattened; ``steps`` is the cap
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
        "dora-frozen": {"adapter": "dora-frozen", **generator},  # DoRA with frozen magnitude (the paper's extra arm)
    }
    for rank in settings.ranks:
        if rank != settings.published_rank:
            students[f"lorad-r{rank}"] = {"adapter": "lorad", "generator_preset": "sd-unet-generator",
                                          "generator_rank": rank}
    students["lorad-conv-r8"] = {"adapter": "lorad", "generator_preset": "sd-unet-generator-conv", "generator_rank": 8}
    return students


CURVE_METRIC = "frechet_distance"  # the validation curve that convergence and early stopping read


def curve_flattened(values, settings: Settings) -> int | None:
    """The evaluation index where a validation curve has flattened (:func:`flattened_at` with the
    settings' window and threshold), or None: the one criterion of convergence.csv and early stopping."""
    return flattened_at(values, settings.flat_window, settings.flat_threshold)


def student_config(name: str, overrides: dict, seed: int, out: Path, settings: Settings):
    """The run options of one (arm, seed): the paper's objective (VSD alone: ``config.PAPER_OBJECTIVE``, whatever
    `run` defaults to), the settings' budget, batch and rate, then ``settings.extra`` and the arm's own."""
    from ..config import load_config

    options = {"out": str(out / "runs" / f"{name}-seed{seed}"), "seed": seed, "steps": settings.steps,
               "batch_size": settings.batch_size, "generator_lr": settings.generator_lr,
               "validate_every": settings.validate_every, "checkpoint_every": settings.steps, "keep_checkpoints": 1,
               "cache_dir": str(out / "cache")}
    return load_config(**merge_options(PAPER_OBJECTIVE, options, settings.extra, overrides))


def train_student(name: str, overrides: dict, seed: int, out: Path, settings: Settings, curve: Benchmark,
            final: Benchmark, log) -> tuple[dict, list[dict]]:
    """One student: train with convergence points, export, score. Returns (final row, curve rows).

    With ``settings.early_stop`` training ends at the first validation point where the curve has
    flattened (:func:`curve_flattened`), else at ``settings.steps``; the row's ``trained_steps`` and
    ``stopped_early`` say which."""
    from ..export import export_run
    from ..training.loop import train

    config = student_config(name, overrides, seed, out, settings)
    run_dir = Path(config.out)
    shutil.rmtree(run_dir, ignore_errors=True)
    points = []

    def record(step, teacher, model, vsd) -> bool:
        with _on_cpu(model):  # the benchmark samples on the CPU, where the teacher's text encoder and VAE are
            scores = curve.evaluate_model(teacher, model, vsd)["scores"]
        points.append({"student": name, "seed": seed, "step": step, **scores})
        return settings.early_stop and curve_flattened([p[CURVE_METRIC] for p in points], settings) is not None

    started = time.perf_counter()
    summary = train(config, on_validate=record)  # record returning True stops the run there
    seconds = time.perf_counter() - started
    export_run(run_dir, run_dir / "export", ema=config.ema_decay is not None)  # an EMA run is its average
    scores = final.evaluate_model(*load_sampler(run_dir / "export"))["scores"]
    stopped = summary["steps"] < config.steps
    log(f"{name} seed {seed}: FD {scores['frechet_distance']:.3f}, {summary['steps']} steps"
        f"{' (curve flattened)' if stopped else ''}, {seconds:.0f} s")
    return ({"experiment": "students", "model": name, "seed": seed, "trainable": summary["trainable"]["generator"],
             "trained_steps": summary["steps"], "stopped_early": stopped, "train_seconds": round(seconds, 1),
             **scores}, points)


@contextmanager
def _on_cpu(model):
    """Within: ``model`` on the CPU (a no-op for a model already there); after: back on its device (the
    parameters stay the same objects, so the optimisers keep them)."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        yield model
        return
    model.to("cpu")
    try:
        yield model
    finally:
        model.to(device)


def arm_intervals(results, metric: str = "frechet_distance") -> list[dict]:
    """Per student arm and per swap hybrid: mean of ``metric`` over seeds, percentile-bootstrap 95 % interval."""
    arms = results[results["experiment"].isin(("students", "swap"))]
    return [{"experiment": experiment, "model": name, "metric": metric,
             **bootstrap_interval(group[metric].tolist())}
            for (experiment, name), group in arms.groupby(["experiment", "model"], sort=False)]


def convergence_rows(curves, settings: Settings, trained_steps: dict | None = None) -> list[dict]:
    """Per arm and seed: whether the validation curve flattened (:func:`curve_flattened`) and at which
    step, and — from ``trained_steps`` {(arm, seed): steps trained} — whether training stopped there
    early (``stopped_step``) or ran to the cap ``settings.steps``."""
    rows = []
    trained_steps = trained_steps or {}
    for (name, seed), group in curves.groupby(["student", "seed"], sort=False):
        group = group.sort_values("step")
        index = curve_flattened(group[CURVE_METRIC].tolist(), settings)
        trained = trained_steps.get((name, seed))
        stopped = trained is not None and trained < settings.steps
        rows.append({"model": name, "seed": seed, "converged": index is not None,
                     "converged_step": None if index is None else int(group["step"].iloc[index]),
                     "stopped_early": stopped, "stopped_step": trained if stopped else None,
                     "trained_steps": trained, "step_cap": settings.steps,
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


def analyse(name: str, out: Path, seed: int = 0) -> dict:
    """Experiment 3: compare the teacher's U-Net with a student's (exported, merged) U-Net, into
    ``compare/<name>``."""
    from wadi_analysis.compare import compare

    comparison = compare(embedded.teacher_path(), out / "runs" / f"{name}-seed{seed}" / "export", component="unet",
                         spectrum=True, fit=True)
    comparison.write(out / COMPARE / name)
    keys = ("direction_change_mean", "norm_change_mean", "direction_to_norm_mean_ratio",
            "direction_to_norm_std_ratio", "angle_deg_mean", "radial_change_mean", "tangential_change_mean",
            "rotation_share_mean", "angle_to_norm_mean_ratio", "norms_preserved_at_rounding",
            "residual_energy_top30_mean", "lorad_fit_mean")
    return {"model": name, **{k: comparison.summary.get(k) for k in keys}}


SWAP_LABELS = (("teacher norms + student directions", "teacher", "student"),
               ("student norms + teacher directions", "student", "teacher"))


def student_swaps(out: Path, final: Benchmark, name: str, seed: int) -> list[dict]:
    """Experiment 4 (Fig 1c) for one student and seed: hybrids of the exported student and the teacher,
    one with the teacher's row norms, one with the teacher's row directions."""
    from wadi_analysis.swap import swap

    rows = []
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

    plan = out / PLAN
    make_plan(out / COMPARE / "full", plan, budget=budget, rank_multiple=2, kinds=("linear",))
    return {"adapter": "lorad", "plan": str(plan)}


DEVICES = ("cpu", "cuda")


def check_execution(jobs: int, device: str) -> None:
    """``jobs`` an integer >= 1 and ``device`` one of :data:`DEVICES`, cuda only where torch sees a GPU."""
    import torch

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be an integer >= 1 (got {jobs!r})")
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                        "use --device cpu")


def reproduce(out: str | Path, settings: Settings | None = None, log=print, overwrite: bool = False,
              jobs: int = 1, device: str = "cpu", resume: bool = True) -> Path:
    """Run every experiment; write CSVs, the figures and report.html/report.pdf into ``out`` (a new folder,
    one an earlier reproduction wrote, or with ``overwrite`` any).

    Each finished piece (the teacher's rows, every (arm, seed) with its curve, swaps and comparison) is
    stored in ``out/results/`` as it finishes (:class:`~.results_store.ResultStore`); with ``resume`` a
    later call reuses the pieces made with the same settings and teacher and trains only the rest. A failed
    or interrupted call removes what it added to ``out`` except those stored pieces and what they need.

    The students train in ``jobs`` worker processes (:func:`.pool.train_students`) on ``device``: ``cpu``
    (each worker with an equal share of the cores as torch threads, no GPU visible) or ``cuda`` (all
    on the one GPU); a student's results do not depend on ``jobs``."""
    from wadi_analysis.outputs import check_output

    from ..runs import RunFolder
    from .results_store import KEPT_ON_FAILURE, ResultStore, settings_tag

    settings = settings or Settings()
    check_execution(jobs, device)
    out = check_output(out, [embedded.teacher_path()], folder=True, replace=True, overwrite=overwrite,
                       ours=_is_reproduction)
    folder = RunFolder(out)  # only for its undo of a failed call: remove what this call added
    before = folder.entries()
    store = ResultStore(out, settings_tag(settings, embedded.teacher_path(), PAPER_OBJECTIVE), resume=resume)
    try:
        return _reproduce(out, settings, log, store, jobs, device)
    except BaseException:
        folder.remove_new_entries(before, keep=KEPT_ON_FAILURE if store.has_results() else ())
        raise


REPRODUCTION_FILES = ("settings.json", "results.csv", "report.html", "runs", "cache", RESULTS)


def _is_reproduction(folder: Path) -> bool:
    """A folder an earlier ``reproduce`` wrote into (it may write there again)."""
    return any((folder / name).exists() for name in REPRODUCTION_FILES)


def _reproduce(out: Path, settings: Settings, log, store, jobs: int = 1, device: str = "cpu") -> Path:
    import pandas as pd

    from .pool import train_students
    from .report import write_reproduction_report

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    curve, final = Benchmark(per_class=settings.curve_per_class), Benchmark(per_class=settings.final_per_class)
    stored = store.load("teacher")
    rows = stored["rows"] if stored else teacher_rows(settings, final)
    if not stored:
        store.save("teacher", {"rows": rows})
    log(f"teacher {'rows reused' if stored else 'evaluated'} ({time.perf_counter() - started:.0f} s)")
    student_rows, curves, analysis, swaps = train_students(out, settings, log, store, jobs, device)
    rows += student_rows + swaps
    real = {"experiment": "real", "model": "real vs real (floor)", "seed": 0, **final.real_vs_real}
    results = pd.DataFrame(rows + [real])
    results.to_csv(out / "results.csv", index=False)
    curves = pd.DataFrame(curves)
    curves.to_csv(out / "curves.csv", index=False)
    pd.DataFrame(arm_intervals(results)).to_csv(out / "intervals.csv", index=False)
    steps = {(r["model"], r["seed"]): r["trained_steps"] for r in student_rows}
    pd.DataFrame(convergence_rows(curves, settings, steps)).to_csv(out / "convergence.csv", index=False)
    pd.DataFrame(analysis).to_csv(out / "analysis.csv", index=False)
    info = {"settings": asdict(settings), "jobs": jobs, "device": device, "seconds": round(time.perf_counter() - started),
            "curve_real_vs_real": curve.real_vs_real}
    (out / "settings.json").write_text(json.dumps(info, indent=2) + "\n")
    write_reproduction_report(out)
    shutil.rmtree(out / "cache", ignore_errors=True)
    log(f"done in {info['seconds']} s: {out / 'report.html'}")
    return out
