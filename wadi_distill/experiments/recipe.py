"""The VSD recipe sweep on the embedded teacher (``wadi-distill recipe``): which settings make VSD with
LoRaD on one shared frozen base converge, measured, not guessed.

Every candidate is a set of ``wadi-distill run`` options over the published objective on the embedded
defaults (``config.PAPER_OBJECTIVE``: VSD alone, LoRaD r16 on the Linear layers, guidance 1.5 — the embedded
defaults until the sweep chose new ones, so every row means what it meant when it was made); each is trained
with its validation curve (one-step FD at ``curve_per_class`` × 10 samples every ``validate_every``
iterations), exported and scored at ``final_per_class`` × 10 samples. The teacher rows beside them
are the targets of issue 13: DDIM at 25 and 4 steps at each candidate's real-score guidance, and the teacher
used as a one-step generator at guidance 1, 1.5, 2 and 3. ``table.csv`` holds every configuration
tried with its final scores, its stability (the largest validation FD over the last 40 % of training
over the last one) and which targets it meets; ``curves.csv`` and ``curves.png`` its curve.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import embedded
from ..evaluation.benchmark import Benchmark
from ..runs import load_sampler
from .reproduce import Settings, student_config, train_student

# Candidates: options over config.PAPER_OBJECTIVE on the embedded defaults; "vsd" is the [vsd] table.
CANDIDATES: dict[str, dict] = {
    "defaults": {},
    "generator-lr-3e-4": {"generator_lr": 3e-4},
    "generator-lr-3e-3": {"generator_lr": 3e-3},
    "fake-lr-1e-3": {"fake_lr": 1e-3},
    "fake-lr-3e-3": {"fake_lr": 3e-3},
    "fake-steps-2": {"fake_steps_per_generator_step": 2},
    "fake-steps-4": {"fake_steps_per_generator_step": 4},
    "batch-32": {"batch_size": 32},
    "batch-8": {"batch_size": 8},
    "guidance-real-1": {"vsd": {"guidance_real": 1.0}},
    "guidance-real-2.5": {"vsd": {"guidance_real": 2.5}},
    "guidance-fake-1": {"vsd": {"guidance_fake": 1.0}},
    "guidance-1.25": {"vsd": {"guidance_real": 1.25, "guidance_fake": 1.25}},
    "fake-rank-16": {"fake_rank": 16},
    "fake-rank-1": {"fake_rank": 1},
    "ema-0.99": {"ema_decay": 0.99},
    "warmup-100": {"warmup_steps": 100},
    "grad-clip-0.1": {"grad_clip": 0.1},
    "grad-clip-10": {"grad_clip": 10.0},
    "t-range-200-980": {"vsd": {"t_min": 200, "t_max": 980}},
    "t-range-20-500": {"vsd": {"t_min": 20, "t_max": 500}},
    "dropout-per-batch": {"vsd": {"prompt_dropout_scope": "batch"}},
    # the generator's capacity: Conv2d targets at the same budget (rank 8), and four times the rank
    "generator-conv-r8": {"generator_preset": "sd-unet-generator-conv", "generator_rank": 8},
    "generator-rank-64": {"generator_rank": 64},
    # the upper bound of capacity: the generator a full copy of the U-Net (the fake score stays LoRaD)
    "generator-full": {"adapter": "full", "generator_lr": 1e-4},
    "generator-full-lr-2e-5": {"adapter": "full", "generator_lr": 2e-5},
    # LoRA (peft) at the LoRaD budget on the same Linear + Conv2d targets: the regression probe's best adapter
    "generator-lora-conv": {"adapter": "lora", "generator_preset": "sd-unet-generator-conv", "generator_rank": 8},
    "generator-conv-r32": {"generator_preset": "sd-unet-generator-conv", "generator_rank": 32},
    # the fake score's capacity: on the students' samples its denoising error at t = 50 is four times the
    # teacher's on real latents (reports/recipe/denoising_gap.csv), and its preset adapts only attention and
    # feed-forward; here every Linear and Conv2d of the blocks, at its rank 4 and at 16
    "fake-conv": {"fake_preset": "sd-unet-generator-conv"},
    "fake-conv-r16": {"fake_preset": "sd-unet-generator-conv", "fake_rank": 16},
    # DMD's regression onto the teacher's DDIM pairs beside VSD (wadi_distill/regression.py)
    "regression-1": {"regression_weight": 1.0},
    "regression-0.25": {"regression_weight": 0.25},
    # prompt accuracy: the best longer setting stays at 0.86-0.88 against the 25-step teacher's 0.96, and a
    # stronger real-score guidance raised it most of any single change (guidance-real-2.5: 0.90 vs 0.83);
    # the pairs are then made at that guidance too
    "regression-1-guidance-real-2.5": {"regression_weight": 1.0, "vsd": {"guidance_real": 2.5}},
    "regression-1-guidance-real-3.5": {"regression_weight": 1.0, "vsd": {"guidance_real": 3.5}},
    # prompt accuracy again: at 5,000 iterations guidance 2.5 meets every target but accuracy (0.95 against
    # 0.97); DMD scores the fake with no guidance, and guidance-fake-1 raised accuracy most among the first runs
    "regression-1-guidance-real-2.5-fake-1": {"regression_weight": 1.0,
                                              "vsd": {"guidance_real": 2.5, "guidance_fake": 1.0}},
    # ... a heavier pull towards the teacher's 25-step samples (accuracy 0.99), and guidance between 2.5 and 3.5
    "regression-4-guidance-real-2.5": {"regression_weight": 4.0, "vsd": {"guidance_real": 2.5}},
    "regression-1-guidance-real-3": {"regression_weight": 1.0, "vsd": {"guidance_real": 3.0}},
    # the weighting of the two losses over t (vsd.GENERATOR_WEIGHTINGS, vsd.FAKE_WEIGHTINGS)
    "weighting-dmd": {"vsd": {"generator_weighting": "dmd"}},
    "fake-weighting-uniform": {"vsd": {"fake_weighting": "uniform"}},
    # the three best single changes of the first 23 runs together
    "combined-best": {"generator_preset": "sd-unet-generator-conv", "generator_rank": 8,
                      "vsd": {"generator_weighting": "dmd", "guidance_fake": 1.0}},
}
STABLE_WINDOW = 0.4   # the last 40 % of training ...
STABLE_RATIO = 1.5    # ... has no validation FD above 1.5 × the final one


@dataclass
class SweepSettings:
    steps: int = 1000
    validate_every: int = 100
    curve_per_class: int = 30      # 300 samples per validation point
    final_per_class: int = 100     # 1,000 samples for the final scores
    seeds: tuple[int, ...] = (0,)
    candidates: tuple[str, ...] = tuple(CANDIDATES)
    single_step_guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    base: str = ""                 # a candidate applied under every one (rows are named base+candidate)
    teacher: str = ""              # another teacher of the embedded data (e.g. `flow-teacher`); "": the embedded one


# LoRaD presets of the transformer families, for a teacher other than the embedded SD (wadi_analysis.plan)
FAMILY_PRESETS = {"sd3": ("sd3-generator", "sd3-fake"), "flux": ("flux-generator", "flux-fake"),
                  "sana": ("sana-generator", "sana-fake")}


def teacher_options(teacher: str) -> dict:
    """Run options that put the embedded recipe on ``teacher``, a teacher of the same data and captions (such
    as `wadi-distill flow-teacher`'s): its folder, the embedded prompts and defaults, and its family's LoRaD
    presets; none for the embedded teacher ("")."""
    if not teacher:
        return {}
    from ..config import PAPER_OBJECTIVE, embedded_defaults, merge_options
    from ..teacher import load_teacher

    # the sweep's own settings (steps, validation and checkpoint intervals, out) stay the sweep's
    options = {k: v for k, v in embedded_defaults().items()
               if k not in ("out", "steps", "validate_every", "checkpoint_every")}
    family = load_teacher(teacher, text=False).family
    presets = dict(zip(("generator_preset", "fake_preset"), FAMILY_PRESETS[family])) if family in FAMILY_PRESETS else {}
    return merge_options(options, PAPER_OBJECTIVE, {"teacher": str(teacher), **presets})


def run_label(name: str, settings: SweepSettings) -> str:
    """A row's name: the candidate, after its base (``base+name``), and ``@steps`` for a budget other than
    the sweep's default (a longer run of a candidate is another row, not the same one)."""
    label = f"{settings.base}+{name}" if settings.base and name != settings.base else name
    return label if settings.steps == SweepSettings.steps else f"{label}@{settings.steps}"


def teacher_targets(final: Benchmark, settings: SweepSettings, guidance: float | None) -> list[dict]:
    """The teacher's rows: DDIM 25 and 4 steps at ``guidance`` (the real score's), and (``guidance`` None) one
    step at each of ``settings.single_step_guidance``."""
    teacher, model, _ = load_sampler(settings.teacher or embedded.teacher_path())
    runs = [(25, guidance), (4, guidance)] if guidance is not None else \
        [(1, g) for g in settings.single_step_guidance]
    rows = []
    for steps, scale in runs:
        scores = final.evaluate_model(teacher, model, None, steps=steps, guidance_scale=scale)["scores"]
        rows.append({"model": f"teacher {steps} step{'s' * (steps > 1)}, cfg {scale}", "steps": steps,
                     "guidance": scale, **scores})
    return rows


def stability(points: list[dict], steps: int) -> float:
    """max validation FD over the last ``STABLE_WINDOW`` of training / the final validation FD."""
    late = [p["frechet_distance"] for p in points if p["step"] >= (1 - STABLE_WINDOW) * steps]
    return max(late) / points[-1]["frechet_distance"]


def targets_met(row: dict, teacher: list[dict]) -> dict:
    """Issue 13's targets for one student row, each True or False: against the teacher's 25 and 4 steps at
    the row's real-score guidance (where the row and the teacher rows say one) and its best single step."""
    by_steps = {r["steps"]: r for r in teacher
                if r["steps"] > 1 and ("guidance" not in row or r.get("guidance") == row["guidance"])}
    best_single = min(r["frechet_distance"] for r in teacher if r["steps"] == 1)
    return {"fd_le_teacher_4_steps": row["frechet_distance"] <= by_steps[4]["frechet_distance"],
            "fd_le_half_best_single_step": row["frechet_distance"] <= 0.5 * best_single,
            "recall_ge_0.6x_teacher_25": row["recall"] >= 0.6 * by_steps[25]["recall"],
            "accuracy_ge_teacher_25_minus_0.02": row["prompt_accuracy"] >= by_steps[25]["prompt_accuracy"] - 0.02,
            "stable": row["stability"] <= STABLE_RATIO}


def sweep(out: str | Path, settings: SweepSettings | None = None, log=print) -> Path:
    """Train every candidate of ``settings`` on the embedded teacher and write the sweep's tables and
    figure into ``out`` (created; candidates already in its ``table.csv`` are kept, not retrained)."""
    import pandas as pd

    from ..config import merge_options

    settings = settings or SweepSettings()
    unknown = [name for name in (*settings.candidates, settings.base or "defaults") if name not in CANDIDATES]
    if unknown:
        from wadi_analysis.errors import InvalidValue
        raise InvalidValue(f"unknown candidate {unknown[0]!r} (known: {', '.join(CANDIDATES)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, curves = _read(out / "table.csv"), _read(out / "curves.csv")
    curve, final = Benchmark(per_class=settings.curve_per_class), Benchmark(per_class=settings.final_per_class)
    on_teacher = teacher_options(settings.teacher)
    teacher = _read(out / "teacher.csv") or teacher_targets(final, settings, None)
    pd.DataFrame(teacher).to_csv(out / "teacher.csv", index=False)
    for name in settings.candidates:
        for seed in settings.seeds:
            label = run_label(name, settings)
            if any(r["candidate"] == label and r["seed"] == seed for r in table):
                continue
            options = merge_options(on_teacher, CANDIDATES[settings.base] if settings.base else {}, CANDIDATES[name])
            config = student_config(label, options, seed, out, Settings())  # as train_student will train it
            guidance = config.vsd.guidance_real
            if not any(r["steps"] > 1 and r["guidance"] == guidance for r in teacher):  # this guidance's targets
                teacher += teacher_targets(final, settings, guidance)
                pd.DataFrame(teacher).to_csv(out / "teacher.csv", index=False)
            run_settings = Settings(steps=settings.steps, batch_size=config.batch_size, generator_lr=config.generator_lr,
                                    validate_every=settings.validate_every, extra={},
                                    early_stop=False)  # candidates are compared at one fixed budget
            started = time.perf_counter()
            row, points = train_student(label, options, seed, out, run_settings, curve, final, log)
            row = {"candidate": label, "options": json.dumps(options), "seed": seed, "steps": settings.steps,
                   "guidance": guidance,
                   "seconds": round(time.perf_counter() - started), **_scores(row),
                   "stability": stability(points, settings.steps)}
            table.append({**row, **targets_met(row, teacher)})
            curves += [{"candidate": label, **p} for p in points]
            pd.DataFrame(table).to_csv(out / "table.csv", index=False)  # after every run: a sweep is hours
            pd.DataFrame(curves).to_csv(out / "curves.csv", index=False)
    info = {"settings": asdict(settings), "curve_real_vs_real": curve.real_vs_real,
            "final_real_vs_real": final.real_vs_real}
    (out / "settings.json").write_text(json.dumps(info, indent=2) + "\n")
    write_summary(out)
    return out


def write_summary(out: str | Path) -> None:
    """``curves.png`` and ``table.md`` of a sweep folder from its CSV files (also after merging the
    tables of sweeps run side by side)."""
    import pandas as pd

    out = Path(out)
    real = json.loads((out / "settings.json").read_text())["final_real_vs_real"]
    _figure(pd.read_csv(out / "curves.csv"), out / "curves.png")
    (out / "table.md").write_text(markdown(pd.read_csv(out / "table.csv"), pd.read_csv(out / "teacher.csv"), real))


TARGET_COLUMNS = {"fd_le_teacher_4_steps": "FD ≤ 4-step", "fd_le_half_best_single_step": "FD ≤ ½ best 1-step",
                  "recall_ge_0.6x_teacher_25": "recall", "accuracy_ge_teacher_25_minus_0.02": "accuracy",
                  "stable": "stable"}


def markdown(table, teacher, real: dict) -> str:
    """The sweep as Markdown: the teacher's rows and the real-vs-real floor, then every candidate (mean
    over its seeds, ± the standard deviation where there are several) with the targets it meets."""
    lines = ["| model | FD | precision | recall | prompt acc. |", "|---|---|---|---|---|"]
    for row in teacher.to_dict("records"):
        lines.append(f"| {row['model']} | {row['frechet_distance']:.3f} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row['prompt_accuracy']:.3f} |")
    lines.append(f"| real vs real (floor) | {real['frechet_distance']:.3f} | {real['precision']:.3f} | "
                 f"{real['recall']:.3f} | {real['prompt_accuracy']:.3f} |")
    lines += ["", "| candidate | seeds | FD | precision | recall | prompt acc. | stability | targets met |",
              "|---|---|---|---|---|---|---|---|"]
    for name, part in table.groupby("candidate", sort=False):
        fd = f"{part['frechet_distance'].mean():.3f}" + (
            f" ± {part['frechet_distance'].std():.3f}" if len(part) > 1 else "")
        met = [label for key, label in TARGET_COLUMNS.items() if part[key].astype(bool).all()]
        lines.append(f"| {name} | {len(part)} | {fd} | {part['precision'].mean():.3f} | {part['recall'].mean():.3f} | "
                     f"{part['prompt_accuracy'].mean():.3f} | {part['stability'].max():.2f} | "
                     f"{', '.join(met) or '—'} |")
    return "\n".join(lines) + "\n"


def sweep_from_options(out, candidates: str | None, seeds: str, steps: int, base: str | None, log=print,
                       teacher: str | None = None) -> Path:
    """:func:`sweep` from command-line text: comma-separated candidates and seeds, a base candidate, a teacher
    folder (None: the embedded teacher)."""
    from wadi_analysis.errors import InvalidValue

    names = tuple(c.strip() for c in candidates.split(",")) if candidates else tuple(CANDIDATES)
    try:
        seed_values = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise InvalidValue(f"--seeds must be comma-separated integers, not {seeds!r}") from None
    if base is not None and base not in CANDIDATES:
        raise InvalidValue(f"--base {base!r} is not a candidate (known: {', '.join(CANDIDATES)})")
    return sweep(out, SweepSettings(steps=steps, seeds=seed_values, candidates=names, base=base or "",
                                    teacher=str(teacher) if teacher else ""), log)


def _scores(row: dict) -> dict:
    keys = ("frechet_distance", "kid", "precision", "recall", "prompt_accuracy", "train_seconds")
    return {k: row[k] for k in keys}


def _read(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path).to_dict("records") if path.is_file() else []


def _figure(curves, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    for name, part in curves.groupby("candidate", sort=False):
        mean = part.groupby("step")["frechet_distance"].mean()
        ax.plot(mean.index, mean.values, marker="o", ms=2, lw=1, label=name)
    ax.set(xlabel="iteration", ylabel="one-step FD, 300 samples", yscale="log")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
