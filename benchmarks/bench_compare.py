"""Benchmark ``wadi-analyze compare`` against a raw read of the files and a naive script.

What is measured, on a full-size teacher/student U-Net pair (random weights, fp16 safetensors,
every row of every >= 2-D weight rotated by |N(0, 5 deg)| and rescaled by 1 + N(0, 0.002)):

* ``raw floor``   one pass over the bytes of both files (numpy memmap, uint64 sum): the I/O floor;
* ``naive``       ``safetensors.torch.load_file`` both files, then a per-layer Python loop with
                  ``cosine_similarity`` -- the obvious script;
* ``compare``     ``wadi-analyze compare T S --out DIR --quiet``, the whole CLI process;
* ``cli --help``  ``wadi-analyze --help``: interpreter + import overhead included in ``compare``.

Each is a fresh child process: wall time is measured around it (best of ``--repeats``, after one
untimed warm-up run, page cache left warm) and peak RSS is the child's own ``ru_maxrss`` from
``os.wait4`` (what ``/usr/bin/time -f %M`` reports). Generation runs in a child too, so this process
stays small: a forked child starts out with its parent's maxrss. The script also checks that
compare's ``direction_change_mean`` matches the naive all-layer mean to 1e-3 relative.

Run:  python benchmarks/bench_compare.py [--model sdxl] [--keep] [--repeats 3] [--work DIR]
The pair is written to ``--work`` (about 2 x 1.7 GB for sd15, 2 x 5.1 GB for sdxl) with a streaming
writer: the model is built on the meta device, so memory stays at about one layer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"sd15": "sd15_unet", "sdxl": "sdxl_unet"}
NAIVE_LIMIT_BYTES = 20 * 2**30  # skip the naive script if it would need more than this


# ----------------------------------------------------------------------------- generation
def write_pair(model: str, teacher_path: Path, student_path: Path, seed: int = 0) -> None:
    """Stream a planted teacher/student pair to two fp16 safetensors files, one tensor at a time."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from wadi_analysis.examples import plant, real_config

    with init_empty_weights():
        meta = UNet2DConditionModel.from_config(real_config(CONFIGS[model]))
    shapes = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    total, done, start, next_report = offset, 0, time.perf_counter(), 0.0
    generator = torch.Generator().manual_seed(seed)
    print(f"generating {model} pair: {len(shapes)} tensors, {total / 1e9:.2f} GB per file", flush=True)
    with open(teacher_path, "wb") as tf, open(student_path, "wb") as sf:
        for fh in (tf, sf):
            fh.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            teacher = (torch.randn(shape, generator=generator) * 0.02).half()
            if len(shape) >= 2:
                angles = torch.deg2rad(5.0 * torch.randn(shape[0], generator=generator, dtype=torch.float64).abs())
                scales = 1 + 0.002 * torch.randn(shape[0], generator=generator, dtype=torch.float64)
                student = plant(teacher.float(), angles, scales, generator).half()
            else:
                student = teacher.clone()
            tf.write(teacher.numpy().tobytes())
            sf.write(student.numpy().tobytes())
            done += 2 * teacher.numel()
            if done / total >= next_report:
                print(f"  {100 * done / total:5.1f} %  {time.perf_counter() - start:7.1f} s", flush=True)
                next_report += 0.1
    print(f"generation took {time.perf_counter() - start:.1f} s", flush=True)


# ----------------------------------------------------------------------------- child modes
def raw_pass(*files: str) -> dict:
    """The I/O floor: touch every byte of every file once."""
    import numpy as np

    checksum = 0
    for file in files:
        data = np.memmap(file, dtype=np.uint8, mode="r")
        words = data[: len(data) // 8 * 8].view(np.uint64)
        checksum ^= int(words.sum())
        del words, data
    return {"checksum": checksum}


def naive_script(teacher_file: str, student_file: str) -> dict:
    """What a user would write: load both state dicts, loop over layers, cosine similarity per row."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    teacher, student = load_file(teacher_file), load_file(student_file)
    layers = []
    for name, t in teacher.items():
        if name not in student or t.ndim < 2:
            continue
        a = t.float().reshape(t.shape[0], -1)
        b = student[name].float().reshape(t.shape[0], -1)
        norm_t, norm_s = a.norm(dim=1), b.norm(dim=1)
        norm_change = 100 * (norm_s - norm_t).abs() / norm_t
        cos = F.cosine_similarity(a, b, dim=1)
        direction = 100 * (1 - cos)
        angle = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
        layers.append({"name": name, "norm_change_mean": norm_change.mean().item(),
                       "norm_change_std": norm_change.std(correction=0).item(),
                       "direction_change_mean": direction.mean().item(),
                       "direction_change_std": direction.std(correction=0).item(),
                       "angle_deg_mean": angle.mean().item()})
    mean = sum(layer["direction_change_mean"] for layer in layers) / len(layers)
    return {"n_layers": len(layers), "direction_change_mean": mean}


# ----------------------------------------------------------------------------- measuring
def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` once: (wall seconds, peak RSS in MB of that child alone, its output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # per-child rusage, unlike RUSAGE_CHILDREN
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 1024, output  # ru_maxrss is in KiB on Linux


def measure(label: str, cmd: list[str], repeats: int) -> dict:
    run_child(cmd)  # untimed warm-up (page cache, .pyc files)
    walls, rss, output = [], [], ""
    for _ in range(repeats):
        wall, peak, output = run_child(cmd)
        walls.append(wall)
        rss.append(peak)
    print(f"  {label:<12} walls {', '.join(f'{w:.2f}' for w in walls)} s, peak RSS {max(rss):.0f} MB", flush=True)
    return {"name": label, "wall": min(walls), "rss": max(rss), "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    parser.add_argument("--keep", action="store_true", help="reuse already generated files")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best wall is kept)")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    teacher, student = (args.work / f"{args.model}_{side}.safetensors" for side in ("teacher", "student"))
    if args.keep and teacher.is_file() and student.is_file():
        print(f"reusing {teacher} and {student}")
    else:  # in a child, so this process stays small: a forked child starts with its parent's maxrss
        subprocess.run(me + ["_generate", args.model, str(teacher), str(student)], check=True)
        os.sync()  # let write-back finish before timing anything
    file_bytes = teacher.stat().st_size + student.stat().st_size
    print(f"files: {file_bytes / 1e9:.2f} GB in all; load average {os.getloadavg()[0]:.2f}; "
          f"{os.cpu_count()} CPUs", flush=True)

    cli = Path(sys.executable).with_name("wadi-analyze")
    out_dir = args.work / f"{args.model}_compare_out"
    results = {"raw": measure("raw floor", me + ["_raw", str(teacher), str(student)], args.repeats)}
    if file_bytes + 2**30 <= NAIVE_LIMIT_BYTES:
        results["naive"] = measure("naive", me + ["_naive", str(teacher), str(student)], args.repeats)
    else:
        print(f"  naive skipped: it would need about {(file_bytes + 2**30) / 2**30:.1f} GiB")
    results["compare"] = measure("compare", [str(cli), "compare", str(teacher), str(student),
                                             "--out", str(out_dir), "--quiet"], args.repeats)
    results["help"] = measure("cli --help", [str(cli), "--help"], args.repeats)

    print(f"\n{args.model}: best of {args.repeats} wall times, warm page cache, peak RSS per child process")
    print(f"{'name':<14}{'wall s':>10}{'peak RSS MB':>14}")
    for r in results.values():
        print(f"{r['name']:<14}{r['wall']:>10.2f}{r['rss']:>14.0f}")
    compare, raw = results["compare"], results["raw"]
    print(f"compare minus import overhead: {compare['wall'] - results['help']['wall']:.2f} s")
    if "naive" in results:
        print(f"naive / compare: wall {results['naive']['wall'] / compare['wall']:.2f}x, "
              f"RSS {results['naive']['rss'] / compare['rss']:.2f}x")
        print(f"compare / naive: wall {compare['wall'] / results['naive']['wall']:.2f}x (issue 16 target: <= 0.40x)")
    print(f"compare / raw:   wall {compare['wall'] / raw['wall']:.2f}x, RSS {compare['rss'] / raw['rss']:.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (timings are wall times: a busy machine slows them)")

    ours = json.loads((out_dir / "summary.json").read_text())["direction_change_mean"]
    print(f"compare direction_change_mean = {ours:.6f} %")
    if "naive" in results:
        theirs = json.loads(results["naive"]["output"].strip().splitlines()[-1])["direction_change_mean"]
        rel = abs(ours - theirs) / abs(theirs)
        print(f"naive   direction_change_mean = {theirs:.6f} %  (relative difference {rel:.2e}: "
              f"{'OK' if rel <= 1e-3 else 'MISMATCH'} at 1e-3)")
        if rel > 1e-3:
            sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        write_pair(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] in ("_raw", "_naive"):
        mode, files = sys.argv[1], sys.argv[2:]
        print(json.dumps(raw_pass(*files) if mode == "_raw" else naive_script(*files)))
    else:
        main()
