"""The fused rotation as two Triton kernels on CUDA, with the eager path everywhere else.

Same contract as :class:`.rotation.EagerRotation` (``rotate`` and ``grads``), same math as
:mod:`.compiled`: theta = A @ B is a matmul (cuBLAS), and everything element-wise is one kernel per pass
over tiles of (rows x pairs). Forward, with base W cast to the angles' dtype inside the kernel::

    W'[:, 2k] = W[:, 2k] cos(theta) - W[:, 2k+1] sin(theta),  W'[:, 2k+1] = W[:, 2k] sin(theta) + W[:, 2k+1] cos(theta)

cos and sin computed in the same pass, W' written (cast) straight into the caller's buffer, an unpaired
last column copied. Backward, one kernel, from G = dL/dW' and the forward's W' (or W' recomputed inside
the kernel from W and theta where the base dtype is not the angles')::

    dL/dtheta = G[:, 2k+1] W'[:, 2k] - G[:, 2k] W'[:, 2k+1]
    dL/dW[:, 2k] = G[:, 2k] cos(theta) + G[:, 2k+1] sin(theta),  dL/dW[:, 2k+1] = G[:, 2k+1] cos(theta) - G[:, 2k] sin(theta)

(dL/dW is G rotated by -theta; an unpaired column's gradient is G's), then dL/dA = dL/dtheta B^T and
dL/dB = A^T dL/dtheta as matmuls. cos and sin are libdevice's (``__nv_cosf`` / ``__nv_sinf``, full
precision), so results equal the eager path's to rounding (about one ulp, far below 1e-6 relative).

Triton is optional: it is imported at the first rotation, never at import. The kernels run on CUDA
tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``: numpy, slow, for tests).
Anything else runs the eager path (:data:`.rotation.KERNELS`) and says why in
:attr:`TritonRotation.fallback_reason`: Triton not installed, or an exception from building or launching
a kernel (then eager for the rest of the process), or tensors on another device than CUDA (that call
only). Each reason is logged once at INFO; a user's run never fails because of it.
"""

from __future__ import annotations

import logging

import torch

LOG = logging.getLogger(__name__)

# Tile of one program: BLOCK_ROWS rows x BLOCK_PAIRS pairs (powers of two; tests shrink them).
BLOCK_ROWS = 8
BLOCK_PAIRS = 128

tl = libdevice = None  # triton.language and its libdevice, bound by _jit at the first use


# ----------------------------------------------------------------------------- kernels (Triton source)
# Plain functions here; ``_jit`` wraps them with ``triton.jit`` at the first use, after putting ``tl`` and
# ``libdevice`` into this module's globals (Triton resolves names there), so that importing this module
# never imports Triton.
def rotate_kernel(weight_ptr, theta_ptr, out_ptr, n_rows, pairs,
                  weight_row_stride, weight_col_stride, theta_row_stride, out_row_stride, out_col_stride,
                  UNPAIRED: tl.constexpr, PRECISE: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """out <- W rotated by theta for one tile, in theta's dtype, cast to out's (the forward pass)."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pair = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    row64 = row.to(tl.int64)[:, None]  # int64 offsets: weights over 2**31 elements
    even = 2 * pair[None, :]
    mask = (row[:, None] < n_rows) & (pair[None, :] < pairs)
    theta = tl.load(theta_ptr + row64 * theta_row_stride + pair[None, :], mask=mask, other=0.0)
    if PRECISE:
        cos, sin = libdevice.cos(theta), libdevice.sin(theta)
    else:
        cos, sin = tl.cos(theta), tl.sin(theta)
    weight = weight_ptr + row64 * weight_row_stride
    w_even = tl.load(weight + even * weight_col_stride, mask=mask, other=0.0).to(theta.dtype)
    w_odd = tl.load(weight + (even + 1) * weight_col_stride, mask=mask, other=0.0).to(theta.dtype)
    out = out_ptr + row64 * out_row_stride
    out_ty = out_ptr.dtype.element_ty
    tl.store(out + even * out_col_stride, (w_even * cos - w_odd * sin).to(out_ty), mask=mask)
    tl.store(out + (even + 1) * out_col_stride, (w_even * sin + w_odd * cos).to(out_ty), mask=mask)
    if UNPAIRED:
        if tl.program_id(1) == 0:  # the last column, once per row tile
            last_row = row.to(tl.int64)
            last = tl.load(weight_ptr + last_row * weight_row_stride + 2 * pairs * weight_col_stride,
                           mask=row < n_rows, other=0.0)
            tl.store(out_ptr + last_row * out_row_stride + 2 * pairs * out_col_stride, last.to(out_ty),
                     mask=row < n_rows)


def grads_kernel(grad_ptr, rotated_ptr, weight_ptr, theta_ptr, grad_theta_ptr, grad_weight_ptr, n_rows, pairs,
                 grad_row_stride, grad_col_stride, rotated_row_stride, rotated_col_stride,
                 weight_row_stride, weight_col_stride, theta_row_stride, grad_weight_row_stride,
                 grad_weight_col_stride,
                 NEED_THETA: tl.constexpr, NEED_WEIGHT: tl.constexpr, RECOMPUTE: tl.constexpr,
                 UNPAIRED: tl.constexpr, PRECISE: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """dL/dtheta (into grad_theta, theta's dtype) and dL/dW (into grad_weight, cast) for one tile. With
    RECOMPUTE, W' comes from W and theta (as the forward made it) instead of rotated_ptr. Pointers a pass
    does not need are placeholders, never read (theta_ptr always has the angles' dtype)."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pair = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    row64 = row.to(tl.int64)[:, None]
    even = 2 * pair[None, :]
    mask = (row[:, None] < n_rows) & (pair[None, :] < pairs)
    angle_ty = theta_ptr.dtype.element_ty
    grad = grad_ptr + row64 * grad_row_stride
    g_even = tl.load(grad + even * grad_col_stride, mask=mask, other=0.0).to(angle_ty)
    g_odd = tl.load(grad + (even + 1) * grad_col_stride, mask=mask, other=0.0).to(angle_ty)
    if NEED_WEIGHT or RECOMPUTE:
        theta = tl.load(theta_ptr + row64 * theta_row_stride + pair[None, :], mask=mask, other=0.0)
        if PRECISE:
            cos, sin = libdevice.cos(theta), libdevice.sin(theta)
        else:
            cos, sin = tl.cos(theta), tl.sin(theta)
    if NEED_THETA:
        if RECOMPUTE:
            weight = weight_ptr + row64 * weight_row_stride
            w_even = tl.load(weight + even * weight_col_stride, mask=mask, other=0.0).to(angle_ty)
            w_odd = tl.load(weight + (even + 1) * weight_col_stride, mask=mask, other=0.0).to(angle_ty)
            r_even = w_even * cos - w_odd * sin
            r_odd = w_even * sin + w_odd * cos
        else:
            rotated = rotated_ptr + row64 * rotated_row_stride
            r_even = tl.load(rotated + even * rotated_col_stride, mask=mask, other=0.0).to(angle_ty)
            r_odd = tl.load(rotated + (even + 1) * rotated_col_stride, mask=mask, other=0.0).to(angle_ty)
        tl.store(grad_theta_ptr + row64 * theta_row_stride + pair[None, :], g_odd * r_even - g_even * r_odd,
                 mask=mask)
    if NEED_WEIGHT:
        out = grad_weight_ptr + row64 * grad_weight_row_stride
        out_ty = grad_weight_ptr.dtype.element_ty
        tl.store(out + even * grad_weight_col_stride, (g_even * cos + g_odd * sin).to(out_ty), mask=mask)
        tl.store(out + (even + 1) * grad_weight_col_stride, (g_odd * cos - g_even * sin).to(out_ty), mask=mask)
        if UNPAIRED:
            if tl.program_id(1) == 0:
                last_row = row.to(tl.int64)
                last = tl.load(grad_ptr + last_row * grad_row_stride + 2 * pairs * grad_col_stride,
                               mask=row < n_rows, other=0.0)
                tl.store(grad_weight_ptr + last_row * grad_weight_row_stride + 2 * pairs * grad_weight_col_stride,
                         last.to(angle_ty).to(out_ty), mask=row < n_rows)


def _jit(interpret: bool) -> dict:
    """The two kernels wrapped by ``triton.jit`` (which reads TRITON_INTERPRET when it wraps: hence one
    set per mode)."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    globals().update(tl=tl, libdevice=libdevice)
    return {"rotate": triton.jit(rotate_kernel), "grads": triton.jit(grads_kernel), "cdiv": triton.cdiv}


def _interpreting() -> bool:
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _options(compiled: bool) -> dict:
    # a*b + c fused into FMAs, Triton's default so far, stated so that Triton 3.9+ does not warn at each
    # process (the interpreter takes no compiler options)
    return {"enable_fp_fusion": True} if compiled else {}


# ----------------------------------------------------------------------------- the contract
class TritonRotation:
    """:class:`EagerRotation`'s contract through the kernels above; ``eager_for(device)`` gives the
    fallback (the eager implementation of that device type)."""

    def __init__(self, eager_for) -> None:
        self.eager_for = eager_for
        self.kernels: dict[bool, dict] = {}
        self.failure: str | None = None  # set once: Triton missing or a kernel failed; eager from then on
        self.fallback_reason: str | None = None  # why the latest call ran eager (None: it ran Triton)
        self._logged: set[str] = set()

    @property
    def active(self) -> str:
        """What the latest call ran: "triton" (or none yet) or "eager"."""
        return "eager" if self.fallback_reason is not None else "triton"

    def _record(self, reason: str | None) -> None:
        self.fallback_reason = reason
        if reason is not None and reason not in self._logged:
            self._logged.add(reason)
            LOG.info("LoRaD rotation: Triton kernel not used, running the eager path (%s)", reason)

    def _fail(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()
        self.failure = f"{type(exc).__name__}: {first[0][:300] if first else ''}"
        self._record(self.failure)

    def _ready(self, device: torch.device) -> tuple[dict, bool] | None:
        """(kernels, precise cos/sin) for tensors on ``device``, or None (reason recorded): run eager."""
        if self.failure is None:
            try:
                interpret = _interpreting()
            except ImportError as exc:
                self._fail(exc)
        if self.failure is not None:
            self._record(self.failure)
            return None
        if device.type != "cuda" and not (interpret and device.type == "cpu"):
            self._record(f"tensors on {device.type}: the Triton kernel runs on CUDA tensors "
                         "(or CPU ones with TRITON_INTERPRET=1)")
            return None
        if interpret not in self.kernels:
            try:
                self.kernels[interpret] = _jit(interpret)
            except Exception as exc:  # noqa: BLE001 - any failure means: run eager
                self._fail(exc)
                return None
        return self.kernels[interpret], not interpret  # libdevice is not in the interpreter

    def rotate(self, out_rows: torch.Tensor, weight_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``out_rows`` <- ``weight_rows`` rotated by theta = a @ b (see the module docstring)."""
        ready = self._ready(a.device)
        if ready is not None:
            try:
                self._rotate(*ready, out_rows, weight_rows, torch.mm(a, b).contiguous())
                self._record(None)
                return
            except Exception as exc:  # noqa: BLE001 - the eager path below rewrites all of out_rows
                self._fail(exc)
        self.eager_for(a.device).rotate(out_rows, weight_rows, a, b)

    def grads(self, grad: torch.Tensor, weight_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              rotated: torch.Tensor, needs: tuple[bool, bool, bool]):
        """(dL/dW, dL/dA, dL/dB) (None where not needed) from G = ``grad`` and the forward's W'."""
        ready = self._ready(a.device)
        if ready is not None:
            try:
                result = self._grads(*ready, grad, weight_rows, a, b, rotated, needs)
                self._record(None)
                return result
            except Exception as exc:  # noqa: BLE001 - the eager path recomputes every gradient
                self._fail(exc)
        return self.eager_for(a.device).grads(grad, weight_rows, a, b, rotated, needs)

    # ------------------------------------------------------------------ launches
    @staticmethod
    def _grid(kernels: dict, n_rows: int, pairs: int) -> tuple[int, int]:
        return kernels["cdiv"](n_rows, BLOCK_ROWS), kernels["cdiv"](pairs, BLOCK_PAIRS)

    def _rotate(self, kernels, precise, out_rows, weight_rows, theta) -> None:
        n_rows, pairs = theta.shape
        if n_rows * pairs == 0:
            return
        kernels["rotate"][self._grid(kernels, n_rows, pairs)](
            weight_rows, theta, out_rows, n_rows, pairs, weight_rows.stride(0), weight_rows.stride(1),
            theta.stride(0), out_rows.stride(0), out_rows.stride(1),
            UNPAIRED=weight_rows.shape[1] > 2 * pairs, PRECISE=precise, BLOCK_ROWS=BLOCK_ROWS, BLOCK_PAIRS=BLOCK_PAIRS,
            **_options(precise))

    def _grads(self, kernels, precise, grad, weight_rows, a, b, rotated, needs):
        need_weight, need_a, need_b = needs
        need_theta = need_a or need_b
        recompute = need_theta and rotated.dtype != a.dtype  # W' in the angles' dtype, as the forward made it
        n_rows, pairs = a.shape[0], b.shape[1]
        # theta itself only where cos/sin are needed; else ``a`` stands in (its dtype is the angles')
        theta = torch.mm(a, b).contiguous() if need_weight or recompute else a
        grad_theta = torch.empty((n_rows, pairs), dtype=a.dtype, device=a.device) if need_theta else None
        grad_weight = torch.empty_like(weight_rows) if need_weight else None
        if (need_theta or need_weight) and n_rows * pairs:
            placeholder_rows = grad  # never read where it stands in
            rotated_in = placeholder_rows if recompute or not need_theta else rotated
            weight_in = weight_rows if recompute else placeholder_rows
            grad_weight_out = grad_weight if need_weight else placeholder_rows
            kernels["grads"][self._grid(kernels, n_rows, pairs)](
                grad, rotated_in, weight_in, theta, grad_theta if need_theta else theta, grad_weight_out,
                n_rows, pairs, grad.stride(0), grad.stride(1), rotated_in.stride(0), rotated_in.stride(1),
                weight_in.stride(0), weight_in.stride(1), pairs, grad_weight_out.stride(0), grad_weight_out.stride(1),
                NEED_THETA=need_theta, NEED_WEIGHT=need_weight, RECOMPUTE=recompute,
                UNPAIRED=weight_rows.shape[1] > 2 * pairs, PRECISE=precise,
                BLOCK_ROWS=BLOCK_ROWS, BLOCK_PAIRS=BLOCK_PAIRS, **_options(precise))
        grad_a = grad_theta.mm(b.t()) if need_a else None
        grad_b = a.t().mm(grad_theta) if need_b else None
        return grad_weight, grad_a, grad_b
