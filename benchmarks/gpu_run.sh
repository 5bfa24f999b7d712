#!/usr/bin/env bash
# The GPU benchmarks in one go, for a lent GPU machine (see README, Benchmarks). From the repo root, with
# the wheels that the image lacks in .whl/ (diffusers; see below) carried along:
#
#   bash benchmarks/gpu_run.sh
#
# Writes directly under $OUT (default /tmp/wadi-gpu): gpu_run.log (everything printed), bench_distill.json,
# bench_lorad.json. Runs, each capped so that the whole script ends within ~6.5 minutes even if something hangs
# (expected: ~3.5 minutes on an H100):
#   1. benchmarks/bench_distill.py --gpu  (SD1.5 config, 64x64 latents, batch 4, bf16; shared / published /
#      lora / shared-theta32 / shared-triton, each in its own process, 90 s at most each)      cap 300 s
#   2. benchmarks/bench_lorad.py --gpu    (SD-sized transformer block, LoRA / LoRaD / hook, batches 2 and 8)  cap 60 s
# The repo is not pip-installed there: PYTHONPATH holds the repo root (the configs are package data that
# importlib.resources finds in the source tree).
#
# The wheels, fetched once on a machine with pip (pure Python, no GPU needed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/wadi-gpu}
mkdir -p "$OUT"

main() {
    echo "== $(date -u '+%F %T') UTC, $(hostname), $(nproc) cores"
    nvidia-smi -L || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "FAILED: pip install of the carried wheels"; return 1; }
        export PYTHONPATH=/tmp/site:$PWD
    else
        echo "no .whl/ here (carry it): using the image's packages only"
        export PYTHONPATH=$PWD
    fi
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    python3 - <<'PY' || { echo "FAILED: imports (see above); nothing benchmarked"; return 1; }
import importlib.metadata as md
import sys

import torch

names = ("torch", "diffusers", "peft", "transformers", "accelerate", "huggingface_hub", "numpy", "safetensors")
print("python", sys.version.split()[0], "|", ", ".join(f"{n} {md.version(n)}" for n in names))
try:  # optional: shared-triton runs eager without it (and says so)
    print("triton", md.version("triton"))
except md.PackageNotFoundError:
    print("triton not installed: shared-triton will run the eager path")
import diffusers  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402,F401
import wadi_analysis.examples  # noqa: E402
import wadi_distill.distill  # noqa: E402,F401
print("diffusers from", diffusers.__file__, "| wadi_analysis from", wadi_analysis.examples.__file__)
print("CUDA", torch.version.cuda, "available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
assert torch.cuda.is_available(), "no CUDA device"
PY
    local status=0 rc
    echo
    echo "== bench_distill --gpu ($(date -u +%T))"
    timeout -k 10 300 python3 benchmarks/bench_distill.py --gpu --child-timeout 90 --json "$OUT/bench_distill.json"
    rc=$?; echo "bench_distill exit $rc (124: hit the 300 s cap; the JSON holds the variants done)"; ((rc)) && status=1
    echo
    echo "== bench_lorad --gpu ($(date -u +%T))"
    timeout -k 10 60 python3 benchmarks/bench_lorad.py --gpu --json "$OUT/bench_lorad.json"
    rc=$?; echo "bench_lorad exit $rc"; ((rc)) && status=1
    echo
    echo "== done $(date -u +%T); files in \$OUT:"; ls -la "$OUT"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
    return $status
}

main 2>&1 | tee "$OUT/gpu_run.log"
