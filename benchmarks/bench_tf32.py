"""May LoRaD's angle product theta = A @ B run on tensor cores (TF32)? Measured against the base's rounding.

A TF32 matmul rounds both inputs to a 10-bit mantissa (unit roundoff 2**-11) and accumulates in float32.
The product's error is not bounded by 2**-11 relative *per entry*: rows of A and columns of B of mixed
sign cancel, so the error is measured, on the CPU, by emulating the input rounding exactly
(round-to-nearest-even to 10 mantissa bits, then a float32 matmul) and comparing with a float64
reference. Rotating a column pair by an angle off by delta moves that pair by |delta| times its norm,
so max |delta| (radians) is directly the relative weight error the rounding of theta causes; it is
set beside the unit roundoff of the base dtype the rotated weight is cast to (bf16 2**-8, fp16 2**-11,
fp32 2**-24). TF32 pays only where its error is well below that rounding (the verdict asks for 1/8).

Shapes: the SD1.5 U-Net's adapted Linear layers at the published ranks (generator 256, fake score 32);
factors drawn so theta has a given RMS (A ~ N(0, 1), B scaled), at RMS angles from 0.001 to 0.1 rad
(0.06 to 5.7 degrees, past anything a distilled student rotates; see ``wadi-analyze compare``).
float32 itself is measured too (its error is the floor any GPU path has).

Run:  python benchmarks/bench_tf32.py [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24}
MARGIN = 8  # TF32 is allowed for a base dtype only if its worst angle error is below 1/MARGIN of its roundoff
SHAPES = {  # (rows, pairs) of SD1.5 U-Net Linear layers: attention 320/640/1280 wide, ff 2560/5120 in
    "attn 320": (320, 160), "attn 1280": (1280, 640), "cross-attn k 768 in": (1280, 384),
    "ff out 5120 in": (1280, 2560), "ff in 1280 -> 10240": (10240, 640),
}


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest value with a 10-bit mantissa (ties to even), as TF32 tensor cores read it."""
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0x0FFF + lsb) & ~0x1FFF
    return rounded.view(torch.float32)


def angle_errors(rows: int, pairs: int, rank: int, rms: float, rng: torch.Generator) -> dict[str, float]:
    """Max |theta - theta_ref| in radians for float32 and for emulated TF32 inputs."""
    a = torch.randn(rows, rank, generator=rng)
    b = torch.randn(rank, pairs, generator=rng) * (rms / rank**0.5)
    reference = a.double() @ b.double()
    fp32 = a @ b
    tf32 = round_to_tf32(a) @ round_to_tf32(b)
    return {"fp32": (fp32.double() - reference).abs().max().item(),
            "tf32": (tf32.double() - reference).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = torch.Generator().manual_seed(args.seed)
    worst = {"fp32": 0.0, "tf32": 0.0}
    print(f"{'layer':22} {'rank':>4} {'rms rad':>8} {'fp32 max err':>13} {'tf32 max err':>13} "
          f"{'tf32 / bf16 u':>13} {'tf32 / fp16 u':>13}")
    for layer, (rows, pairs) in SHAPES.items():
        for rank in (32, 256):
            for rms in (1e-3, 1e-2, 1e-1):
                errors = angle_errors(rows, pairs, rank, rms, rng)
                worst = {k: max(worst[k], errors[k]) for k in worst}
                print(f"{layer:22} {rank:>4} {rms:>8.3f} {errors['fp32']:>13.2e} {errors['tf32']:>13.2e} "
                      f"{errors['tf32'] / UNIT_ROUNDOFF['bf16']:>13.2e} {errors['tf32'] / UNIT_ROUNDOFF['fp16']:>13.2e}")
    print(f"\nworst angle error: fp32 {worst['fp32']:.2e} rad, tf32 {worst['tf32']:.2e} rad")
    for dtype, roundoff in UNIT_ROUNDOFF.items():
        ratio = worst["tf32"] / roundoff
        verdict = "TF32 below its rounding" if ratio < 1 / MARGIN else "keep float32"
        print(f"  base {dtype}: unit roundoff {roundoff:.2e}, tf32 error / roundoff = {ratio:.2e} -> {verdict}")


if __name__ == "__main__":
    main()
