"""The fused rotation through ``torch.compile`` (inductor), with the eager path as its fallback.

Same contract as :class:`.rotation.EagerRotation` (``rotate`` and ``grads``), same math: theta = A @ B is
a matmul (ATen's, into the eager path's workspace for large weights), and everything element-wise is one
compiled pass — forward, with theta = a @ b and base W (cast to the angles' dtype inside the pass)::

    W'[:, 2k] = W[:, 2k] cos(theta) - W[:, 2k+1] sin(theta),  W'[:, 2k+1] = W[:, 2k] sin(theta) + W[:, 2k+1] cos(theta)

written (cast) into the caller's buffer; backward, from G = dL/dW' and the forward's W' (or W' recomputed
inside the same pass from W and theta where the base dtype is not the angles')::

    dL/dtheta = G[:, 2k+1] W'[:, 2k] - G[:, 2k] W'[:, 2k+1],   dL/dW = G rotated by -theta

then dL/dA = dL/dtheta B^T and dL/dB = A^T dL/dtheta as matmuls. Results equal the eager path's to
rounding (cos/sin and the products may round differently: about one ulp, far below 1e-6 relative).

Compilation is lazy (at the first call, per dtype and layout; ``dynamic=True``, so not per shape). Any
exception from compiling or running a compiled pass (no C++ compiler, an unsupported backend, a dynamo
error) switches this kernel to the eager path for the rest of the process; the reason is kept in
:attr:`CompiledRotation.fallback_reason` (see :func:`.rotation.rotation_kernel_status`) and logged once
at INFO: a user's run never fails because of it.

Not the default: on the CPU it is slower than the eager path (one WaDi iteration 1.15x on the tiny U-Net,
1.16x on the SD1.5 config at 8x8, ``benchmarks/bench_distill.py --variants shared,shared-compiled,lora
--threads 1``; forward and backward passes alone 1.1-2x). Inductor's C++ backend does not vectorize the
stride-2 pair accesses, so cos/sin become scalar calls, where the eager path's complex multiply and
cos/sin run vectorized. The fused GPU kernels (Triton) are another implementation of this contract:
:mod:`.triton_rotation` (``set_rotation_kernel("triton")``).
"""

from __future__ import annotations

import logging

import torch

from .rotation import _WORKSPACE, EagerRotation

LOG = logging.getLogger(__name__)


def _pairs(x: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The even and odd columns of the first 2 * ``pairs`` columns of rows ``x`` (views)."""
    split = x[:, : 2 * pairs].unflatten(1, (pairs, 2))
    return split[..., 0], split[..., 1]


def _rotated(weight_rows: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """W' of the paired columns, interleaved (n, 2P), in theta's dtype (one fused expression)."""
    even, odd = _pairs(weight_rows, theta.shape[1])
    even, odd = even.to(theta.dtype), odd.to(theta.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(1)


def rotate_pass(out: torch.Tensor, weight_rows: torch.Tensor, theta: torch.Tensor) -> None:
    """``out`` <- ``weight_rows`` with its column pairs rotated by ``theta`` (cast to ``out``'s dtype);
    an unpaired last column is copied."""
    paired = 2 * theta.shape[1]
    out[:, :paired].copy_(_rotated(weight_rows, theta))
    if weight_rows.shape[1] > paired:
        out[:, paired:].copy_(weight_rows[:, paired:])


def angle_grad_pass(out: torch.Tensor, grad: torch.Tensor, rotated: torch.Tensor) -> None:
    """``out`` <- dL/dtheta = G_odd W'_even - G_even W'_odd, in ``out``'s dtype."""
    even, odd = _pairs(rotated, out.shape[1])
    grad_even, grad_odd = _pairs(grad, out.shape[1])
    out.copy_(grad_odd.to(out.dtype) * even.to(out.dtype) - grad_even.to(out.dtype) * odd.to(out.dtype))


def angle_grad_from_weight_pass(out: torch.Tensor, grad: torch.Tensor, weight_rows: torch.Tensor,
                                theta: torch.Tensor) -> None:
    """:func:`angle_grad_pass` with W' recomputed in theta's dtype from W (a base in another dtype)."""
    rotated = _rotated(weight_rows, theta)
    even, odd = _pairs(rotated, theta.shape[1])
    grad_even, grad_odd = _pairs(grad, theta.shape[1])
    out.copy_(grad_odd.to(theta.dtype) * even - grad_even.to(theta.dtype) * odd)


def unrotate_pass(out: torch.Tensor, grad: torch.Tensor, theta: torch.Tensor) -> None:
    """``out`` <- ``grad`` rotated by -theta (dL/dW), cast to ``out``'s dtype."""
    rotate_pass(out, grad, -theta)


PASSES = {f.__name__: f for f in (rotate_pass, angle_grad_pass, angle_grad_from_weight_pass, unrotate_pass)}


class CompiledRotation:
    """:class:`EagerRotation`'s contract with the element-wise work compiled; ``eager`` gives the row
    blocks (so the same workspace bounds hold) and is the fallback."""

    def __init__(self, eager: EagerRotation, compile_fn=None) -> None:
        self.eager = eager
        self.compile_fn = compile_fn  # None: torch.compile, looked up at the first call (tests patch it)
        self.passes: dict | None = None
        self.fallback_reason: str | None = None

    # ------------------------------------------------------------------ compilation and fallback
    def _compiled(self) -> dict | None:
        if self.fallback_reason is not None:
            return None
        if self.passes is None:
            try:
                compile_fn = self.compile_fn or torch.compile
                self.passes = {name: compile_fn(f, dynamic=True) for name, f in PASSES.items()}
            except Exception as exc:  # noqa: BLE001 - any failure means: run eager
                self._fall_back(exc)
                return None
        return self.passes

    def _fall_back(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()
        self.fallback_reason = f"{type(exc).__name__}: {first[0][:300] if first else ''}"
        self.passes = None
        LOG.info("LoRaD rotation: torch.compile unavailable, running the eager path (%s)", self.fallback_reason)

    @property
    def active(self) -> str:
        """What runs now: "compiled" (or not yet tried) or "eager" (fallen back)."""
        return "eager" if self.fallback_reason is not None else "compiled"

    # ------------------------------------------------------------------ the contract
    def rotate(self, out_rows: torch.Tensor, weight_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``out_rows`` <- ``weight_rows`` rotated by theta = a @ b (see the module docstring)."""
        passes = self._compiled()
        if passes is not None:
            try:
                for block, theta in self._thetas(weight_rows.shape[0], a, b):
                    passes["rotate_pass"](out_rows[block], weight_rows[block], theta)
                return
            except Exception as exc:  # noqa: BLE001 - the eager path below rewrites all of out_rows
                self._fall_back(exc)
        self.eager.rotate(out_rows, weight_rows, a, b)

    def grads(self, grad: torch.Tensor, weight_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              rotated: torch.Tensor, needs: tuple[bool, bool, bool]):
        """(dL/dW, dL/dA, dL/dB) (None where not needed) from G = ``grad`` and the forward's W'."""
        passes = self._compiled()
        if passes is not None:
            try:
                return self._compiled_grads(passes, grad, weight_rows, a, b, rotated, needs)
            except Exception as exc:  # noqa: BLE001 - the eager path recomputes every gradient
                self._fall_back(exc)
        return self.eager.grads(grad, weight_rows, a, b, rotated, needs)

    def _thetas(self, out_rows: int, a: torch.Tensor, b: torch.Tensor):
        """(row block, theta of the block) pairs: fresh theta for small weights, the workspace's else."""
        blocks = self.eager._blocks(out_rows, b.shape[1])
        if blocks is None:
            yield slice(None), torch.mm(a, b)
            return
        for block in blocks:
            rows_a = a[block]
            yield block, torch.mm(rows_a, b, out=_WORKSPACE.take("theta", (rows_a.shape[0], b.shape[1]), b.dtype))

    def _compiled_grads(self, passes, grad, weight_rows, a, b, rotated, needs):
        need_weight, need_a, need_b = needs
        grad_weight = torch.empty_like(weight_rows) if need_weight else None
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.zeros_like(b) if need_b else None
        same_dtype = rotated.dtype == a.dtype
        for block, theta in self._thetas(weight_rows.shape[0], a, b):
            if need_a or need_b:
                grad_theta = torch.empty_like(theta) if block == slice(None) else \
                    _WORKSPACE.take("grad_theta", tuple(theta.shape), theta.dtype)
                if same_dtype:
                    passes["angle_grad_pass"](grad_theta, grad[block], rotated[block])
                else:  # W' in the angles' dtype, exactly as the forward made it
                    passes["angle_grad_from_weight_pass"](grad_theta, grad[block], weight_rows[block], theta)
                if need_a:
                    torch.mm(grad_theta, b.t(), out=grad_a[block])
                if need_b:
                    grad_b.addmm_(a[block].t(), grad_theta)
            if need_weight:
                passes["unrotate_pass"](grad_weight[block], grad[block], theta)
        return grad_weight, grad_a, grad_b
