"""The Triton rotation (wadi_distill.lorad.triton_rotation): the eager path's values and gradients to 1e-6
(float32) under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors: the kernels' own code, run by
numpy), and a recorded fallback to eager whenever Triton, CUDA or a kernel is unavailable. Tests that run
the kernels are skipped where Triton is not installed; the fallback tests run everywhere."""

import sys

import pytest
import torch

from tests.support.tensors import adapted_model_pass
from wadi_distill.lorad import rotation, triton_rotation
from wadi_distill.lorad.rotation import rotated_weight, rotation_kernel_status, set_rotation_kernel
from wadi_distill.lorad.triton_rotation import TritonRotation

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton)")


def relative_error(x, y):
    return ((x.double() - y.double()).abs().max() / y.double().abs().max()).item()


@pytest.fixture
def selection(monkeypatch):
    """A fresh selection (nothing chosen, no kernel object yet) for this test only."""
    fresh = {"name": None, "note": None, "compiled": None, "triton": None}
    monkeypatch.setattr(rotation, "_SELECTION", fresh)
    monkeypatch.delenv(rotation.ROTATION_KERNEL_ENV, raising=False)
    return fresh


@pytest.fixture
def interpreter(selection, monkeypatch):
    """Triton's interpreter on, and tiles of 4 rows x 4 pairs, so that small weights span many programs
    in both grid dimensions with partial tiles at the edges."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_rotation, "BLOCK_ROWS", 4)
    monkeypatch.setattr(triton_rotation, "BLOCK_PAIRS", 4)
    return selection


def build_and_backward(kind, shape, base=torch.float32, dtype=torch.float32, rank=3, needs=(True, True, True),
                       summed=False):
    """W' and (dL/dW, dL/dA, dL/dB) of one fused rotation run by kernel ``kind`` (None where not asked);
    ``summed``: the loss is W'.sum(), whose gradient reaches the kernel as an expanded (stride 0) tensor."""
    set_rotation_kernel(kind)
    generator = torch.Generator().manual_seed(0)
    width = torch.Size(shape[1:]).numel()
    weight = torch.randn(shape, generator=generator, dtype=dtype).to(base).requires_grad_(needs[0])
    a = (torch.randn(shape[0], rank, generator=generator, dtype=dtype) * 0.5).requires_grad_(needs[1])
    b = torch.randn(rank, width // 2, generator=generator, dtype=dtype).requires_grad_(needs[2])
    grad = torch.randn(shape, generator=generator, dtype=dtype).to(base)
    out = rotated_weight(weight, a, b)
    if summed:
        out.sum().backward()
    else:
        out.backward(grad)
    return out.detach(), weight.grad, a.grad, b.grad


def assert_equal_to_eager(shape, **kwargs):
    eager = build_and_backward("eager", shape, **kwargs)
    fused = build_and_backward("triton", shape, **kwargs)
    for got, want in zip(fused, eager):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.shape == want.shape and got.dtype == want.dtype
            assert relative_error(got, want) < 1e-6
    assert rotation_kernel_status() == {"selected": "triton", "cpu": "triton", "fallback_reason": None}


@needs_triton
@pytest.mark.parametrize("shape, rank", [((6, 8), 3), ((5, 7), 3), ((11, 13), 1), ((9, 3, 3, 3), 2), ((3, 2), 1)])
def test_triton_equals_eager(interpreter, shape, rank):
    """Values and every gradient equal the eager path's to 1e-6 (float32): even and odd widths (the
    unpaired column), a rank-1 theta, rows and pairs not multiples of the tile, a conv kernel, one pair."""
    assert_equal_to_eager(shape, rank=rank)


@needs_triton
@pytest.mark.parametrize("needs", [(False, True, True), (True, False, False), (False, True, False)])
def test_triton_with_some_gradients_only(interpreter, needs):
    """A frozen base (no dL/dW), frozen angles (dL/dW only), one factor only: the flags of the backward
    kernel; the gradient arrives expanded (stride 0) in one case."""
    assert_equal_to_eager((7, 9), needs=needs)
    assert_equal_to_eager((7, 9), needs=needs, summed=True)


@needs_triton
@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16])
def test_triton_with_a_half_precision_base(interpreter, base):
    """A bf16/fp16 base with float32 angles: the rotation runs in float32 and is cast once, as eager (at
    most one rounding step of the base dtype apart where float32 ulps differ); the angle gradients, from
    W' recomputed in float32 inside the backward kernel, equal eager's to 1e-6."""
    shape = (9, 15)
    eager = build_and_backward("eager", shape, base=base)
    fused = build_and_backward("triton", shape, base=base)
    step = 2 ** -7 if base == torch.bfloat16 else 2 ** -10
    for got, want in zip(fused[:2], eager[:2]):
        assert got.dtype == base
        assert ((got.float() - want.float()).abs() <= step * want.float().abs()).all()
    for got, want in zip(fused[2:], eager[2:]):
        assert got.dtype == torch.float32 and relative_error(got, want) < 1e-6
    assert rotation_kernel_status()["cpu"] == "triton"


@needs_triton
def test_triton_gradients_pass_gradcheck(interpreter):
    """float64 gradcheck of (W, A, B) -> W' through both kernels (odd width)."""
    set_rotation_kernel("triton")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    a = torch.randn(5, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, x, y: rotated_weight(w, x, y), (weight, a, b))
    assert rotation_kernel_status()["fallback_reason"] is None


@needs_triton
def test_a_layer_trains_the_same(interpreter):
    """An adapted Linear + Conv2d model: output and adapter gradients equal eager's to 1e-6."""
    def run(kind):
        return adapted_model_pass(kind, channels=3, size=4, out_features=6, ranks={"0": 2, "2": 1})

    fused = run("triton")
    assert rotation_kernel_status()["cpu"] == "triton"
    for got, want in zip(fused, run("eager")):
        assert relative_error(got, want) < 1e-6


# ----------------------------------------------------------------------------- fallbacks
def assert_runs_eager_bit_for_bit(shape=(5, 7)):
    eager = build_and_backward("eager", shape)
    fused = build_and_backward("triton", shape)
    for got, want in zip(fused, eager):
        assert torch.equal(got, want)


def test_falls_back_when_triton_is_absent(selection, monkeypatch):
    """No Triton installed (``import triton`` fails): eager results bit for bit, the reason recorded,
    nothing raised."""
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # what an absent package looks like to import
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert_runs_eager_bit_for_bit()
    status = rotation_kernel_status()
    assert status["selected"] == "triton" and status["cpu"] == "eager"
    assert status["fallback_reason"].startswith(("ModuleNotFoundError", "ImportError"))
    assert "triton" in status["fallback_reason"]


@needs_triton
def test_falls_back_on_cpu_tensors_without_the_interpreter(selection, monkeypatch):
    """CPU tensors and no interpreter: eager, bit for bit, and why; the reason is that call's only (the
    same kernel object runs Triton once the tensors can take it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert_runs_eager_bit_for_bit()
    status = rotation_kernel_status()
    assert status["cpu"] == "eager" and "tensors on cpu" in status["fallback_reason"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    build_and_backward("triton", (5, 7))
    assert rotation_kernel_status() == {"selected": "triton", "cpu": "triton", "fallback_reason": None}


def test_falls_back_for_good_when_a_kernel_fails(selection, monkeypatch):
    """A kernel failing at its launch (e.g. no ptxas, an unsupported GPU): the forward and the backward
    still run (eager, bit for bit), the reason recorded; later calls stay eager without retrying."""
    launches = []

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                raise RuntimeError("PTX assembly failed")
            return launch

    monkeypatch.setattr(triton_rotation, "_interpreting", lambda: True)
    monkeypatch.setattr(triton_rotation, "_jit", lambda interpret: {"rotate": Broken(), "grads": Broken(),
                                                                    "cdiv": lambda n, d: -(-n // d)})
    for _ in range(2):
        assert_runs_eager_bit_for_bit()
    assert len(launches) == 1  # tried once, then eager for good
    status = rotation_kernel_status()
    assert status["cpu"] == "eager" and status["fallback_reason"] == "RuntimeError: PTX assembly failed"


def test_selection_by_environment(selection, monkeypatch):
    """WADI_ROTATION_KERNEL=triton selects one TritonRotation for every device; its eager fallback is the
    device's own (the CPU's blocked workspace, one block elsewhere)."""
    monkeypatch.setenv(rotation.ROTATION_KERNEL_ENV, "triton")
    kernel = rotation.kernel(torch.device("cpu"))
    assert isinstance(kernel, TritonRotation) and rotation.kernel(torch.device("meta")) is kernel
    assert kernel.eager_for(torch.device("cpu")) is rotation.KERNELS["cpu"]
    assert kernel.eager_for(torch.device("cuda")) is rotation.ONE_BLOCK
    assert rotation_kernel_status() == {"selected": "triton", "cpu": "triton", "fallback_reason": None}
    with pytest.raises(ValueError, match="eager, compiled, triton"):
        set_rotation_kernel("fast")
