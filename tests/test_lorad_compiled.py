"""The torch.compile rotation (wadi_distill.lorad.compiled): the eager path's values and gradients to
1e-6, selected by a function or the environment, and a silent, recorded fallback to eager whenever
compiling or running the compiled pass fails."""

import pytest
import torch

from tests.support.tensors import adapted_model_pass
from wadi_distill.lorad import rotation
from wadi_distill.lorad.compiled import CompiledRotation
from wadi_distill.lorad.rotation import rotated_weight, rotation_kernel_status, set_rotation_kernel


def relative_error(x, y):
    return ((x.double() - y.double()).abs().max() / y.double().abs().max()).item()


@pytest.fixture
def selection(monkeypatch):
    """A fresh selection (nothing chosen, no compiled kernel yet) for this test only."""
    fresh = {"name": None, "note": None, "compiled": None}
    monkeypatch.setattr(rotation, "_SELECTION", fresh)
    monkeypatch.delenv(rotation.ROTATION_KERNEL_ENV, raising=False)
    return fresh


def factors(shape, rank=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    width = torch.Size(shape[1:]).numel()
    a = (torch.randn(shape[0], rank, generator=generator, dtype=dtype) * 0.5).requires_grad_()
    b = torch.randn(rank, width // 2, generator=generator, dtype=dtype).requires_grad_()
    return a, b


def build_and_backward(kind, shape, base=torch.float32, dtype=torch.float32):
    """W' and (dL/dW, dL/dA, dL/dB) of one fused rotation run by kernel ``kind``."""
    set_rotation_kernel(kind)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(base).requires_grad_()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype).to(base)
    a, b = factors(shape, dtype=dtype)
    out = rotated_weight(weight, a, b)
    out.backward(grad)
    return out.detach(), weight.grad, a.grad, b.grad


@pytest.mark.parametrize("shape, many_blocks", [((6, 8), False), ((5, 7), False), ((6, 3, 3, 3), True)])
def test_compiled_equals_eager(selection, monkeypatch, shape, many_blocks):
    """Values and every gradient equal the eager path's to 1e-6 (float32): even and odd widths, a conv
    kernel, one block or many blocks over the workspace; and the compiled pass really ran."""
    if many_blocks:
        monkeypatch.setattr(rotation, "ROW_BLOCK_PAIRS", 5)
        monkeypatch.setattr(rotation, "WORKSPACE_MIN_PAIRS", 0)
    eager = build_and_backward("eager", shape)
    compiled = build_and_backward("compiled", shape)
    for got, want in zip(compiled, eager):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert relative_error(got, want) < 1e-6
    status = rotation_kernel_status()
    assert status == {"selected": "compiled", "cpu": "compiled", "fallback_reason": None}
    assert isinstance(selection["compiled"], CompiledRotation) and selection["compiled"].passes is not None


def test_compiled_with_a_bf16_base(selection):
    """A bf16 base: the rotation runs in float32 and is cast once, as eager (at most one bf16 rounding
    step apart where float32 ulps differ); the angle gradients equal eager's to 1e-6."""
    shape = (8, 16)
    eager = build_and_backward("eager", shape, base=torch.bfloat16)
    compiled = build_and_backward("compiled", shape, base=torch.bfloat16)
    assert compiled[0].dtype == torch.bfloat16
    assert ((compiled[0].float() - eager[0].float()).abs() <= 2 ** -7 * eager[0].float().abs()).all()
    for got, want in zip(compiled[1:], eager[1:]):
        assert relative_error(got, want) < 1e-6
    assert rotation_kernel_status()["cpu"] == "compiled"


def test_compiled_gradients_pass_gradcheck(selection):
    """float64 gradcheck of (W, A, B) -> W' through the compiled pass."""
    set_rotation_kernel("compiled")
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a, b = factors((4, 6), rank=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w, x, y: rotated_weight(w, x, y), (weight, a, b))
    assert rotation_kernel_status()["fallback_reason"] is None


def test_a_layer_trains_the_same(selection):
    """An adapted Linear + Conv2d model: output and adapter gradients equal eager's to 1e-6."""
    def run(kind):
        return adapted_model_pass(kind, channels=4, size=5, out_features=10, ranks={"0": 2, "2": 3})

    for got, want in zip(run("compiled"), run("eager")):
        assert relative_error(got, want) < 1e-6


def test_falls_back_when_torch_compile_raises(selection, monkeypatch):
    """torch.compile itself failing (no backend): eager results, bit for bit, and the reason recorded."""
    def broken(*args, **kwargs):
        raise RuntimeError("no inductor backend here")

    monkeypatch.setattr(torch, "compile", broken)
    eager = build_and_backward("eager", (5, 7))
    compiled = build_and_backward("compiled", (5, 7))
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)
    status = rotation_kernel_status()
    assert status["selected"] == "compiled" and status["cpu"] == "eager"
    assert "no inductor backend here" in status["fallback_reason"]


def test_falls_back_when_the_first_compiled_call_fails(selection):
    """Compilation failing at the first call (what a missing C++ compiler does): the forward and the
    backward still run (eager), equal to eager bit for bit, the reason recorded; later calls stay eager."""
    calls = []

    def compile_failing_at_call(fn, **kwargs):
        def call(*args):
            calls.append(fn.__name__)
            raise OSError("C++ compiler not found")
        return call

    selection["compiled"] = CompiledRotation(rotation.KERNELS["cpu"], compile_fn=compile_failing_at_call)
    eager = build_and_backward("eager", (6, 8))
    for _ in range(2):
        compiled = build_and_backward("compiled", (6, 8))
        for got, want in zip(compiled, eager):
            assert torch.equal(got, want)
    assert calls == ["rotate_pass"]  # tried once, then eager for good
    assert rotation_kernel_status()["cpu"] == "eager"
    assert rotation_kernel_status()["fallback_reason"] == "OSError: C++ compiler not found"


def test_selection_by_environment_and_bad_values(selection, monkeypatch):
    monkeypatch.setenv(rotation.ROTATION_KERNEL_ENV, "compiled")
    assert isinstance(rotation.kernel(torch.device("cpu")), CompiledRotation)
    assert rotation.kernel(torch.device("meta")) is rotation.ONE_BLOCK  # other devices: eager, one block
    selection.update(name=None)
    monkeypatch.setenv(rotation.ROTATION_KERNEL_ENV, "fused")  # a bad environment never stops a run
    assert rotation.kernel(torch.device("cpu")) is rotation.KERNELS["cpu"]
    status = rotation_kernel_status()
    assert status["cpu"] == "eager" and "'fused'" in status["fallback_reason"]
    with pytest.raises(ValueError, match="eager, compiled"):
        set_rotation_kernel("fast")
    set_rotation_kernel("eager")
    assert rotation_kernel_status() == {"selected": "eager", "cpu": "eager", "fallback_reason": None}
