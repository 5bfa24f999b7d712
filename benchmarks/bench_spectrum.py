"""Benchmark the residual spectra: Gram eigenvalues (dsyrk + syevd, float64) vs a torch.linalg.svdvals loop.

On the SD1.5-config pair of ``bench_compare.py`` (fp16 safetensors, random weights, planted rotations),
for every weight with >= 2 dims, side by side on the very same residual tensors:

* ``gram``        ``wadi_analysis.spectrum.gram_eigenvalues`` (what ``compare --spectrum`` uses);
* ``svdvals f64`` ``torch.linalg.svdvals`` of the float64 residual (the exact reference);
* ``svdvals f32`` ``torch.linalg.svdvals`` of the float32 residual (what a quick script would do).

Each method gets the same threads (``--threads``, default 2). Energies in the top 30 % of the rank
are compared per layer (max abs difference, in percentage points). Then ``compare --spectrum`` end to
end, and the HTML+PDF report time for that SD1.5-size table.

Run:  python benchmarks/bench_spectrum.py [--layers N] [--threads 2] [--keep]
``--layers N`` times only every k-th layer so that N layers are measured (quick look); the default
measures all of them, which takes several minutes for the SVD loops.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compare import write_pair  # noqa: E402

from wadi_analysis import compare, open_checkpoint  # noqa: E402
from wadi_analysis.spectrum import gram_eigenvalues  # noqa: E402


def top_energy(squared: torch.Tensor, fraction: float = 0.3) -> float:
    squared = squared.sort(descending=True).values
    k = max(1, math.ceil(fraction * squared.numel()))
    return 100.0 * (squared[:k].sum() / squared.sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "_work")
    parser.add_argument("--layers", type=int, default=0, help="measure about this many layers (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="reuse the generated pair")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher_file, student_file = args.work / "sd15_teacher.safetensors", args.work / "sd15_student.safetensors"
    if not (args.keep and teacher_file.exists() and student_file.exists()):
        write_pair("sd15", teacher_file, student_file)
    torch.set_num_threads(args.threads)
    totals = {"gram": 0.0, "svdvals f64": 0.0, "svdvals f32": 0.0}
    worst = {"svdvals f64": 0.0, "svdvals f32": 0.0}
    with open_checkpoint(teacher_file) as teacher, open_checkpoint(student_file) as student, \
            threadpool_limits(args.threads):
        names = [n for n in teacher.names() if len(teacher.info(n).shape) >= 2]
        step = max(1, len(names) // args.layers) if args.layers else 1
        chosen = names[::step]
        print(f"{len(chosen)} of {len(names)} layers, {args.threads} threads", flush=True)
        for index, name in enumerate(chosen):
            residual = (student.tensor(name).double() - teacher.tensor(name).double()).reshape(
                teacher.info(name).shape[0], -1)
            start = time.perf_counter()
            reference = top_energy(gram_eigenvalues(residual))
            totals["gram"] += time.perf_counter() - start
            for label, dtype in (("svdvals f64", torch.float64), ("svdvals f32", torch.float32)):
                start = time.perf_counter()
                energy = top_energy(torch.linalg.svdvals(residual.to(dtype)).double().square())
                totals[label] += time.perf_counter() - start
                worst[label] = max(worst[label], abs(energy - reference))
            if index % 50 == 0:
                print(f"  {index}/{len(chosen)} {name}", flush=True)
    print(f"\n{'method':14s} {'seconds':>9s} {'vs gram':>8s} {'max |energy diff| (pp)':>24s}")
    for label, seconds in totals.items():
        diff = "reference" if label == "gram" else f"{worst[label]:.2e}"
        print(f"{label:14s} {seconds:9.2f} {seconds / totals['gram']:7.1f}x {diff:>24s}")

    start = time.perf_counter()
    result = compare(teacher_file, student_file, spectrum=True, workers=args.threads)
    elapsed = time.perf_counter() - start
    print(f"\ncompare --spectrum (weight + direction residual, all {len(result.layers)} layers, "
          f"{args.threads} workers): {elapsed:.1f} s; residual_energy_top30_mean "
          f"{result.summary['residual_energy_top30_mean']:.2f} %")
    out = args.work / "spectrum_report"
    result.write(out)
    try:
        from wadi_analysis.report import write_report
    except ImportError:
        print("report: wadi_analysis.report not available")
        return
    start = time.perf_counter()
    write_report(out, result.layers, result.summary)
    print(f"report.html + report.pdf for {len(result.layers)} layers: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
