"""The reproduction's (arm, seed) runs in worker processes (``reproduce --jobs N``), each stored as it finishes.

One task is one (arm, seed): train with its validation curve, export, score at the final sample count, the
swaps of Fig 1c for its arm and seed, and — for the first seed — the weight comparison with the teacher.
Its result goes to the :class:`ResultStore` the moment it is back, so an interrupted reproduction keeps it.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from wadi_analysis.errors import UserError

from ..evaluation.benchmark import Benchmark
from .reproduce import Settings, analyse, plan_student, student_overrides, student_swaps, train_student
from .results_store import COMPARE, ResultStore


def worker_threads(jobs: int) -> int:
    """Torch threads of each of ``jobs`` workers: this process's torch threads (the cores, unless
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` said fewer) shared evenly, at least one."""
    import torch

    return max(1, torch.get_num_threads() // jobs)


def _init_worker(device: str, threads: int) -> None:
    """A worker process's setup, before it touches torch's devices: no GPU visible for ``cpu`` (accelerate
    trains on any GPU it sees), and ``threads`` torch threads."""
    import torch

    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(threads)


_BENCHMARKS: dict[int, Benchmark] = {}  # per worker process: the benchmark of each sample count, made once


def _benchmark(per_class: int) -> Benchmark:
    if per_class not in _BENCHMARKS:
        _BENCHMARKS[per_class] = Benchmark(per_class=per_class)
    return _BENCHMARKS[per_class]


def swaps_wanted(name: str, settings: Settings) -> bool:
    """Fig 1c is made for ``name``: every arm, unless ``settings.swap_students`` names some."""
    return settings.swap_students is None or name in settings.swap_students


def student_task(name: str, overrides: dict, seed: int, out: Path, settings: Settings) -> dict:
    """One (arm, seed) in a worker process, with the worker's benchmarks: {row, points (the curve), swaps,
    analysis (first seed only, else None), lines (its log)}."""
    lines: list[str] = []
    final = _benchmark(settings.final_per_class)
    row, points = train_student(name, overrides, seed, out, settings, _benchmark(settings.curve_per_class),
                                final, lines.append)
    swaps = student_swaps(out, final, name, seed) if swaps_wanted(name, settings) else []
    analysis = analyse(name, out, seed) if seed == settings.seeds[0] else None
    return {"row": row, "points": points, "swaps": swaps, "analysis": analysis, "lines": lines}


def _reusable(result: dict | None, name: str, seed: int, out: Path, settings: Settings) -> bool:
    """A stored result stands for its (arm, seed) here: it has what this call needs of it (the analysis and
    its ``compare/`` folder for the first seed, swaps where wanted)."""
    if result is None or not {"row", "points", "swaps", "analysis"} <= set(result):
        return False
    if seed == settings.seeds[0] and (result["analysis"] is None or not (out / COMPARE / name / "summary.json").is_file()):
        return False
    return bool(result["swaps"]) or not swaps_wanted(name, settings)


def train_students(out: Path, settings: Settings, log, store: ResultStore, jobs: int = 1, device: str = "cpu"):
    """Experiments 2–5: every (arm, seed) not already in ``store`` trained in a pool of ``jobs`` spawned
    worker processes (:func:`_init_worker`) and stored as it finishes. The plan arm starts once the full
    student's first-seed comparison and the published placement's budget exist. Returns (rows, curve
    rows, analysis rows, swap rows) in arm order — full, lorad-published, lorad-plan, then the rest — and
    seed order, whatever order the runs finish in."""
    from multiprocessing import get_context

    students = student_overrides(settings)
    order = ["full", "lorad-published", "lorad-plan"] + [n for n in students if n not in ("full", "lorad-published")]
    done: dict[tuple[str, int], dict] = {}
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(device, worker_threads(jobs)))
    pending = {}

    def start(name: str) -> None:
        for seed in settings.seeds:
            stored = store.load(store.piece(name, seed))
            if _reusable(stored, name, seed, out, settings):
                done[(name, seed)] = stored
                log(f"{name} seed {seed}: stored result reused ({store.path(store.piece(name, seed))})")
            else:
                pending[pool.submit(student_task, name, students[name], seed, out, settings)] = (name, seed)

    def start_plan_when_ready() -> None:
        published = [result["row"] for (name, _), result in done.items() if name == "lorad-published"]
        if "lorad-plan" not in students and ("full", settings.seeds[0]) in done and published:
            students["lorad-plan"] = plan_student(out, published[0]["trainable"])  # the same budget
            start("lorad-plan")

    try:
        for name in order:
            if name in students:
                start(name)
        start_plan_when_ready()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                name, seed = pending.pop(future)
                result = future.result()
                lines = result.pop("lines")
                store.save(store.piece(name, seed), result)
                done[(name, seed)] = result
                for line in lines:
                    log(line)
            start_plan_when_ready()
    except BrokenProcessPool:
        raise UserError(f"a reproduce worker process died (killed, or out of memory?) with --jobs {jobs}; "
                        "try fewer --jobs") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    ordered = [(name, seed) for name in order for seed in settings.seeds]
    rows = [done[key]["row"] for key in ordered]
    curves = [point for key in ordered for point in done[key]["points"]]
    analysis = [done[(name, settings.seeds[0])]["analysis"] for name in order]
    swaps = [swap for key in ordered for swap in done[key]["swaps"]]
    return rows, curves, analysis, swaps
