"""LoRaD math: low-rank rotation of weight direction (WaDi §2).

For a weight viewed as rows ``W`` of shape (out, in) — a Conv2d kernel (o, i, kh, kw) is flattened
row-major to (o, i*kh*kw) — adjacent input columns (2k, 2k+1) of every row are rotated by an angle
theta[i, k], with theta = A @ B (A: out x r, zero init; B: r x in//2, Xavier init)::

    W'[:, 2k]   = W[:, 2k] cos(theta) - W[:, 2k+1] sin(theta)
    W'[:, 2k+1] = W[:, 2k] sin(theta) + W[:, 2k+1] cos(theta)

Every row norm (and every pair norm) is preserved exactly: only directions move. With an odd
flattened width the last column has no partner and stays as it is. The pairing, theta's shape and the
cost per rank are :mod:`wadi_analysis.geometry`'s, shared with the analysis that measures LoRaD.

The rotation runs as a custom autograd function that saves only W and theta (not cos/sin or the
rotated weight) and recomputes in backward: for loss L with G = dL/dW',

    dL/dtheta = G[:, 2k+1] * W'[:, 2k] - G[:, 2k] * W'[:, 2k+1]
    dL/dW     = G rotated by -theta
"""

from __future__ import annotations

import torch
from torch import nn

from wadi_analysis.decompose import rows
from wadi_analysis.geometry import angle_field_shape, paired_columns


def _rotate(weight_rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the column pairs, writing straight into the strided halves of the output (no stack/cat)."""
    out = torch.empty_like(weight_rows)
    even, odd, unpaired = paired_columns(weight_rows)
    out_even, out_odd, out_unpaired = paired_columns(out)
    torch.mul(even, cos, out=out_even).addcmul_(odd, sin, value=-1)
    torch.mul(even, sin, out=out_odd).addcmul_(odd, cos)
    out_unpaired.copy_(unpaired)
    return out


class PairRotation(torch.autograd.Function):
    """W (out, in), theta (out, in//2) -> W' in theta's dtype (float32, or float64 for checks)."""

    @staticmethod
    def forward(ctx, weight_rows: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_rows, theta)
        return _rotate(weight_rows.to(theta.dtype), torch.cos(theta), torch.sin(theta))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight_rows, theta = ctx.saved_tensors
        cos, sin = torch.cos(theta), torch.sin(theta)
        grad_weight = grad_theta = None
        if ctx.needs_input_grad[1]:
            # dL/dtheta = g_odd * W'_even - g_even * W'_odd, with W' recomputed pair by pair.
            even, odd, _ = paired_columns(weight_rows.to(theta.dtype))
            grad_even, grad_odd, _ = paired_columns(grad)
            rotated_even = (even * cos).addcmul_(odd, sin, value=-1)
            rotated_odd = (even * sin).addcmul_(odd, cos)
            grad_theta = (grad_odd * rotated_even).addcmul_(grad_even, rotated_odd, value=-1)
        if ctx.needs_input_grad[0]:
            grad_weight = _rotate(grad, cos, -sin).to(weight_rows.dtype)
        return grad_weight, grad_theta


def rotate_rows(weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``weight`` (Linear or Conv kernel) with each row's adjacent column pairs rotated by ``theta``.

    The result has ``weight``'s shape and ``theta``'s dtype (compute in float32, cast once by the caller).
    """
    if theta.shape != angle_field_shape(weight.shape):
        raise ValueError(f"theta must be {angle_field_shape(weight.shape)}, got {tuple(theta.shape)}")
    return PairRotation.apply(rows(weight), theta).reshape(weight.shape)


class RotationAdapter(nn.Module):
    """One adapter's angle factors for one weight: theta = A @ B, kept in float32."""

    def __init__(self, out_rows: int, width: int, rank: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("rank must be >= 1")
        _, pairs = angle_field_shape((out_rows, width))
        if pairs < 1:
            raise ValueError("a weight needs at least two input columns to rotate")
        self.A = nn.Parameter(torch.zeros(out_rows, rank, dtype=torch.float32, device=device))
        b = torch.empty(rank, pairs, dtype=torch.float32, device=device)
        self.B = nn.Parameter(nn.init.xavier_uniform_(b, generator=generator))

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def theta(self) -> torch.Tensor:
        # float32 even inside autocast, which would otherwise run this matmul in bf16/fp16
        with torch.autocast(self.A.device.type, enabled=False):
            return self.A @ self.B
