"""LoRaD math: low-rank rotation of weight direction (WaDi §2).

For a weight viewed as rows ``W`` of shape (out, in) — a Conv2d kernel (o, i, kh, kw) is flattened
row-major to (o, i*kh*kw) — adjacent input columns (2k, 2k+1) of every row are rotated by an angle
theta[i, k], with theta = A @ B (A: out x r, zero init; B: r x in//2, Xavier init)::

    W'[:, 2k]   = W[:, 2k] cos(theta) - W[:, 2k+1] sin(theta)
    W'[:, 2k+1] = W[:, 2k] sin(theta) + W[:, 2k+1] cos(theta)

Every row norm (and every pair norm) is preserved exactly: only directions move. With an odd
flattened width the last column has no partner and stays as it is. The pairing, theta's shape and the
cost per rank are :mod:`wadi_analysis.geometry`'s, shared with the analysis that measures LoRaD.

Where the rows' memory allows (an even width), a pair is a complex number and its rotation the product
(W[:, 2k] + i W[:, 2k+1]) (cos + i sin): one contiguous pass instead of four strided ones, equal to the
formulas above to rounding (about one ulp). Two autograd functions compute it, with the same
element-wise operations (so the same bits):

* :class:`PairRotation` (``rotate_rows``): (W, theta) -> W'. Saves W and theta, recomputes in backward.
  Merging, unmerging and the analysis use it.
* :class:`RotatedWeight` (``rotated_weight``): (W, A, B) -> W', what an adapted layer runs. For a
  large CPU weight, theta, cos and sin live in a reused per-thread workspace (by blocks of rows for
  the largest); W' is written into a buffer the caller passes (see :mod:`.model`: recycled on
  the CPU, never a fresh weight-sized allocation). Backward uses the saved W' itself: for loss L with
  G = dL/dW',

      dL/dtheta = G[:, 2k+1] * W'[:, 2k] - G[:, 2k] * W'[:, 2k+1]
      dL/dA = dL/dtheta @ B^T,   dL/dB = A^T @ dL/dtheta,   dL/dW = G rotated by -theta

  so no cos/sin at all unless W itself requires grad (a base in another dtype than the angles
  recomputes its float32 W' block by block instead, exactly as the forward made it).

On the CPU a large weight's temporaries live in a reused workspace (never reallocated), in blocks of
at most :data:`ROW_BLOCK_PAIRS` angles; other devices run one block. :data:`KERNELS` maps a device type to the
implementation (``rotate`` and ``grads``); another one, a fused GPU kernel, slots in there behind the
same autograd function. On the CPU :func:`set_rotation_kernel` (or ``WADI_ROTATION_KERNEL``) selects
the torch.compile implementation of :mod:`.compiled` instead (not the default: slower on CPU, measured);
``"triton"`` selects the Triton kernels of :mod:`.triton_rotation` on CUDA (opt-in, eager elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from wadi_analysis.decompose import rows
from wadi_analysis.geometry import angle_field_shape, paired_columns

# CPU: at most about this many (row, pair) angles per block: theta, cos and cos + i sin take 64 MiB at
# most. Cache-sized blocks (2**18) are ~15 % faster on one idle core, but every element-wise operation
# is an OpenMP parallel region, and on a loaded machine each one can wait a scheduler slice: a weight
# runs in as few operations as its workspace allows.
ROW_BLOCK_PAIRS = 1 << 22
WORKSPACE_MIN_PAIRS = 1 << 16  # CPU: weights with fewer angles use fresh temporaries (cheap at that size)


def _complex_pairs(x: torch.Tensor) -> torch.Tensor | None:
    """Rows (n, 2P) as (n, P) complex numbers x[:, 2k] + i x[:, 2k+1] (a view), where memory allows it."""
    if (x.dtype not in (torch.float32, torch.float64) or x.shape[1] % 2 or x.stride(1) != 1 or x.stride(0) % 2
            or x.storage_offset() % 2):
        return None
    return torch.view_as_complex(x.view(x.shape[0], x.shape[1] // 2, 2))


def _rotate_into(out: torch.Tensor, weight_rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 phase: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` <- the column pairs of ``weight_rows`` rotated. A pair is a complex number and the rotation
    a multiplication by cos + i sin (one contiguous pass; ``phase`` may hold that factor); widths or
    layouts a complex view cannot take are written straight into the strided halves instead."""
    weight_pairs, out_pairs = _complex_pairs(weight_rows), _complex_pairs(out)
    if weight_pairs is not None and out_pairs is not None:
        torch.mul(weight_pairs, torch.complex(cos, sin) if phase is None else torch.complex(cos, sin, out=phase),
                  out=out_pairs)
        return out
    even, odd, unpaired = paired_columns(weight_rows)
    out_even, out_odd, out_unpaired = paired_columns(out)
    torch.mul(even, cos, out=out_even).addcmul_(odd, sin, value=-1)
    torch.mul(even, sin, out=out_odd).addcmul_(odd, cos)
    if unpaired.shape[1]:
        out_unpaired.copy_(unpaired)
    return out


def _rotate(weight_rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rotate_into(torch.empty_like(weight_rows), weight_rows, cos, sin)


def _angle_grad_into(out: torch.Tensor, grad: torch.Tensor, rotated: torch.Tensor) -> torch.Tensor:
    """``out`` <- dL/dtheta = g_odd * W'_even - g_even * W'_odd."""
    even, odd, _ = paired_columns(rotated)
    grad_even, grad_odd, _ = paired_columns(grad)
    return torch.mul(grad_odd, even, out=out).addcmul_(grad_even, odd, value=-1)


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
            rotated = _rotate(weight_rows.to(theta.dtype), cos, sin)
            grad_theta = _angle_grad_into(torch.empty_like(theta), grad, rotated)
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


# ----------------------------------------------------------------------------- fused (W, A, B) -> W'
class _Workspace(threading.local):
    """Scratch tensors for the blocks of large CPU weights, reused from call to call (per thread)."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        key, numel = (name, dtype), shape[0] * shape[1]
        flat = self.tensors.get(key)
        if flat is None or flat.numel() < numel:
            flat = self.tensors[key] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)


_WORKSPACE = _Workspace()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return False


def _no_autocast(device_type: str):
    # float32 angles and rotation even inside autocast, which would run the matmuls in bf16/fp16
    return torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext()


def _rotation_into(out: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   scratch: _Workspace | None = None, sign: float = 1.0) -> torch.Tensor:
    """``out`` <- ``weight`` rotated by ``sign * (a @ b)``, in the angles' dtype; theta, cos and sin are
    fresh tensors, or the workspace's (a block of a large weight)."""
    if scratch is None:
        theta = torch.mm(a, b)
        cos, phase = torch.cos(theta), None
    else:
        shape = (a.shape[0], b.shape[1])
        theta = torch.mm(a, b, out=scratch.take("theta", shape, b.dtype))
        cos = torch.cos(theta, out=scratch.take("cos", shape, b.dtype))
        phase = scratch.take("phase", shape, torch.complex128 if b.dtype == torch.float64 else torch.complex64)
    sin = theta.sin_()
    if sign < 0:
        sin.neg_()
    return _rotate_into(out, weight, cos, sin, phase)


def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype, scratch: _Workspace | None, name: str) -> torch.Tensor:
    if tensor.dtype == dtype:
        return tensor
    if scratch is None:
        return tensor.to(dtype)
    return scratch.take(name, tuple(tensor.shape), dtype).copy_(tensor)


def _scratch(shape: tuple[int, int], like: torch.Tensor, scratch: _Workspace | None, name: str) -> torch.Tensor:
    """A temporary of ``shape`` in ``like``'s dtype: fresh, or the workspace's (blocks of large weights)."""
    if scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return scratch.take(name, shape, like.dtype)


def _rotate_block(out, weight_rows, a, b, scratch) -> None:
    weight = _in_dtype(weight_rows, a.dtype, scratch, "weight")
    if out.dtype == a.dtype:
        _rotation_into(out, weight, a, b, scratch)
    else:  # rotate in the angles' dtype, cast once
        out.copy_(_rotation_into(_scratch(tuple(weight.shape), a, scratch, "rotated"), weight, a, b, scratch))


def _block_grads(grad, weight_rows, a, b, rotated, needs, scratch):
    need_weight, need_a, need_b = needs
    grad = _in_dtype(grad, a.dtype, scratch, "grad")
    grad_weight = grad_a = grad_b = None
    if need_a or need_b:
        if rotated.dtype != a.dtype:  # W' in the angles' dtype, exactly as the forward made it
            weight = _in_dtype(weight_rows, a.dtype, scratch, "weight")
            rotated = _rotation_into(_scratch(tuple(weight.shape), a, scratch, "rotated"), weight, a, b, scratch)
        grad_theta = _angle_grad_into(_scratch((a.shape[0], b.shape[1]), a, scratch, "grad_theta"), grad, rotated)
        grad_a = grad_theta.mm(b.t()) if need_a else None
        grad_b = a.t().mm(grad_theta) if need_b else None
    if need_weight:
        back = _rotation_into(_scratch(tuple(grad.shape), a, scratch, "back"), grad, a, b, scratch, sign=-1.0)
        grad_weight = back.to(weight_rows.dtype)
    return grad_weight, grad_a, grad_b


@dataclass(frozen=True)
class EagerRotation:
    """The fused rotation in PyTorch operations: a weight of :data:`WORKSPACE_MIN_PAIRS` angles or more
    runs with reused scratch tensors, in blocks of rows of at most ``block_pairs()`` angles (``None``:
    always one block, fresh temporaries)."""

    block_pairs: Callable[[], int | None]

    def _blocks(self, out_rows: int, pairs: int) -> list[slice] | None:
        """Row blocks of a weight large enough for the workspace (None: one block, fresh temporaries)."""
        limit = self.block_pairs()
        if limit is None or out_rows * pairs < WORKSPACE_MIN_PAIRS:
            return None
        step = max(1, limit // max(pairs, 1))
        return [slice(start, min(start + step, out_rows)) for start in range(0, out_rows, step)]

    def rotate(self, out_rows: torch.Tensor, weight_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``out_rows`` <- ``weight_rows`` rotated by theta = a @ b; the rotation runs in the angles'
        dtype and is cast once into ``out_rows`` (the base dtype)."""
        blocks = self._blocks(weight_rows.shape[0], b.shape[1])
        if blocks is None:
            return _rotate_block(out_rows, weight_rows, a, b, None)
        for block in blocks:
            _rotate_block(out_rows[block], weight_rows[block], a[block], b, _WORKSPACE)

    def grads(self, grad: torch.Tensor, weight_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              rotated: torch.Tensor, needs: tuple[bool, bool, bool]):
        """(dL/dW, dL/dA, dL/dB) (None where not needed) from G = ``grad`` and the forward's W'."""
        blocks = self._blocks(weight_rows.shape[0], b.shape[1])
        if blocks is None:
            return _block_grads(grad, weight_rows, a, b, rotated, needs, None)
        need_weight, need_a, need_b = needs
        grad_weight = torch.empty_like(weight_rows) if need_weight else None
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.zeros_like(b) if need_b else None
        for block in blocks:
            gw, ga, gb = _block_grads(grad[block], weight_rows[block], a[block], b, rotated[block], needs, _WORKSPACE)
            if need_weight:
                grad_weight[block].copy_(gw)
            if need_a:
                grad_a[block].copy_(ga)
            if need_b:
                grad_b.add_(gb)
        return grad_weight, grad_a, grad_b


# Device type -> implementation; any other device runs EagerRotation in one block. The Triton kernels
# (same rotate/grads contract) are selected by name ("triton", below), not by device: opt-in.
KERNELS = {"cpu": EagerRotation(lambda: ROW_BLOCK_PAIRS)}
ONE_BLOCK = EagerRotation(lambda: None)

# Which CPU implementation runs: "eager" (default: measured faster on CPU, see README Benchmarks) or
# "compiled" (:mod:`.compiled`, torch.compile with the eager path as fallback) or "triton"
# (:mod:`.triton_rotation`, Triton kernels for CUDA tensors, the eager path for others). Environment
# variable, read at the first rotation, or :func:`set_rotation_kernel`.
ROTATION_KERNEL_ENV = "WADI_ROTATION_KERNEL"
ROTATION_KERNELS = ("eager", "compiled", "triton")
_SELECTION: dict = {"name": None, "note": None, "compiled": None, "triton": None}


def set_rotation_kernel(name: str) -> None:
    """Run the CPU rotation as ``"eager"`` PyTorch operations or ``"compiled"`` (torch.compile, falling
    back to eager where compilation is unavailable), or every rotation of CUDA tensors as ``"triton"``
    kernels (eager where Triton or CUDA is unavailable); see :func:`rotation_kernel_status`."""
    if name not in ROTATION_KERNELS:
        raise ValueError(f"rotation kernel must be one of {', '.join(ROTATION_KERNELS)}, got {name!r}")
    _SELECTION.update(name=name, note=None)


def _selected() -> str:
    if _SELECTION["name"] is None:
        name = os.environ.get(ROTATION_KERNEL_ENV, "eager").strip().lower() or "eager"
        if name not in ROTATION_KERNELS:  # a bad environment never stops a run: eager, and why
            _SELECTION["note"] = f"{ROTATION_KERNEL_ENV}={name!r} is not one of {', '.join(ROTATION_KERNELS)}"
            name = "eager"
        _SELECTION["name"] = name
    return _SELECTION["name"]


def _compiled_cpu():
    if _SELECTION["compiled"] is None:
        from .compiled import CompiledRotation  # imports this module: loaded on first use only

        _SELECTION["compiled"] = CompiledRotation(KERNELS["cpu"])
    return _SELECTION["compiled"]


def _triton():
    if _SELECTION.get("triton") is None:
        from .triton_rotation import TritonRotation  # imports this module; Triton itself at the first rotation

        _SELECTION["triton"] = TritonRotation(lambda device: KERNELS.get(device.type, ONE_BLOCK))
    return _SELECTION["triton"]


def rotation_kernel_status() -> dict:
    """{"selected": what was asked, "cpu": what runs on the CPU ("compiled" until a compilation failed;
    for "triton": what the latest rotation ran, "triton" or "eager"), "fallback_reason": why compiled or
    triton fell back (or why the environment's choice was ignored), else None}."""
    selected = _selected()
    compiled = _SELECTION.get(selected) if selected in ("compiled", "triton") else None
    reason = compiled.fallback_reason if compiled is not None else None
    return {"selected": selected, "cpu": compiled.active if compiled is not None else selected,
            "fallback_reason": reason or _SELECTION["note"]}


def kernel(device: torch.device):
    """The rotation implementation for ``device`` (``rotate`` and ``grads``; see :class:`EagerRotation`)."""
    if device.type == "cpu" and _selected() == "compiled":
        return _compiled_cpu()
    if _selected() == "triton":
        return _triton()
    return KERNELS.get(device.type, ONE_BLOCK)


class RotatedWeight(torch.autograd.Function):
    """(W rows, A, B, out, ready) -> W' (an alias of ``out``, the base dtype). ``ready``: ``out`` already
    holds the rotation of these factors (built earlier, e.g. without grad) and is not recomputed."""

    @staticmethod
    def forward(ctx, weight_rows, a, b, out, ready):
        if not ready:
            device_type = a.device.type
            if _autocast_on(device_type):
                with torch.autocast(device_type, enabled=False):
                    kernel(a.device).rotate(out, weight_rows, a, b)
            else:
                kernel(a.device).rotate(out, weight_rows, a, b)
        result = out.detach()  # shares ``out``'s memory and version counter
        ctx.save_for_backward(weight_rows, a, b, result)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight_rows, a, b, rotated = ctx.saved_tensors
        with _no_autocast(a.device.type):
            grads = kernel(a.device).grads(grad, weight_rows, a, b, rotated, ctx.needs_input_grad[:3])
        return grads[0], grads[1], grads[2], None, None


def fused_rotation(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                   ready: bool = False) -> torch.Tensor:
    """:func:`rotated_weight` without its checks (the adapter's own shapes; ``out`` given)."""
    if weight.dim() == 2:
        return RotatedWeight.apply(weight, a, b, out, ready)
    weight_rows = rows(weight)
    return RotatedWeight.apply(weight_rows, a, b, out.view(weight_rows.shape), ready).view(weight.shape)


def rotated_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
                   ready: bool = False) -> torch.Tensor:
    """``weight`` rotated by theta = a @ b (fused; see the module docstring), shaped and typed like
    ``weight``. ``out`` (``weight``'s shape and dtype, contiguous) receives the result and is returned
    as an alias; with ``ready`` it already holds it."""
    if (a.shape[0], b.shape[1]) != angle_field_shape(weight.shape) or a.shape[1] != b.shape[0]:
        raise ValueError(f"A @ B must be {angle_field_shape(weight.shape)}, got {tuple(a.shape)} @ {tuple(b.shape)}")
    if out is None:
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    return fused_rotation(weight, a, b, out, ready)


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
        with _no_autocast(self.A.device.type):
            return self.A @ self.B
