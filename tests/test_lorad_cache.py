"""The fused rotation and the reuse of rotated weights: the same numbers as the reference rotation, one
build where the factors did not change, never a stale weight, nothing on teacher passes."""

import copy

import pytest
import torch
from torch import nn

from wadi_analysis.examples import tiny_sd15_config
from wadi_distill import lorad
from wadi_distill.lorad import rotation
from wadi_distill.lorad.model import lorad_modules
from wadi_distill.lorad.rotation import PairRotation, rotate_rows, rotated_weight


def relative_error(x, y):
    return ((x.double() - y.double()).abs().max() / y.double().abs().max()).item()


@pytest.fixture
def counted(monkeypatch):
    """Counts the fused rotation's forward passes (each one a build of one rotated weight)."""
    calls = []
    original = rotation.kernel

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def rotate(self, out, weight_rows, a, b):
            calls.append(tuple(weight_rows.shape))
            return self.inner.rotate(out, weight_rows, a, b)

        def grads(self, *args):
            return self.inner.grads(*args)

    monkeypatch.setattr(rotation, "kernel", lambda device: Counting(original(device)))
    return calls


def factors(shape, rank=3, seed=0, scale=0.5, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    width = torch.Size(shape[1:]).numel()
    a = (torch.randn(shape[0], rank, generator=generator, dtype=dtype) * scale).requires_grad_()
    b = torch.randn(rank, width // 2, generator=generator, dtype=dtype).requires_grad_()
    return a, b


# ----------------------------------------------------------------------------- the fused function
@pytest.mark.parametrize("block_pairs", [rotation.ROW_BLOCK_PAIRS, 5])
@pytest.mark.parametrize("shape", [(6, 8), (5, 7), (6, 3, 3, 3), (300, 64), (512, 512)])
@pytest.mark.parametrize("base", [torch.float32, torch.bfloat16])
def test_fused_rotation_equals_the_reference(monkeypatch, block_pairs, shape, base):
    """Forward and gradients of (W, A, B) -> W' equal rotate_rows(W, A @ B)'s to 1e-6 (float32), in one
    block with fresh temporaries (bit for bit) or in many blocks with the workspace."""
    monkeypatch.setattr(rotation, "ROW_BLOCK_PAIRS", block_pairs)
    monkeypatch.setattr(rotation, "WORKSPACE_MIN_PAIRS", 0 if block_pairs < 1000 else rotation.WORKSPACE_MIN_PAIRS)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(base)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        a, b = factors(shape)
        out = rotated_weight(weight, a, b) if fused else rotate_rows(weight.float(), a @ b).to(base)
        (out.float() * grad).sum().backward()
        results.append((out, a.grad, b.grad))
    (ref, ref_a, ref_b), (new, new_a, new_b) = results
    assert new.dtype == base and new.shape == weight.shape
    if block_pairs > 1000:  # one block
        assert torch.equal(new, ref)
    assert relative_error(new.float(), ref.float()) <= (1e-6 if base == torch.float32 else 2 ** -8)
    assert relative_error(new_a, ref_a) <= 1e-6 and relative_error(new_b, ref_b) <= 1e-6


@pytest.mark.parametrize("shape", [(4, 6), (3, 7), (4, 3, 3, 3)])
def test_fused_gradients_are_exact(monkeypatch, shape):
    """gradcheck (float64) with respect to W, A and B, several blocks of rows in the workspace."""
    monkeypatch.setattr(rotation, "ROW_BLOCK_PAIRS", 4)
    monkeypatch.setattr(rotation, "WORKSPACE_MIN_PAIRS", 0)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    a, b = factors(shape, rank=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w, a, b: rotated_weight(w, a, b), (weight, a, b))


def test_fused_rotation_runs_in_float32_under_autocast():
    weight = torch.randn(8, 16)
    a, b = factors(weight.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = rotated_weight(weight, a, b)
    assert torch.equal(fused, PairRotation.apply(weight, (a @ b).detach()))


# ----------------------------------------------------------------------------- reuse on a model
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_sd15_config())


def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 700]),
            torch.randn(2, 7, 64, generator=generator))


def randomize(model, name, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lorad.adapter_parameters(model, name):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def expected_weights(model, name):
    """Every adapted weight as rotate_rows (the reference) makes it from the current factors."""
    out = {}
    with torch.no_grad():
        for module_name, module, p in lorad_modules(model):
            original = module.parametrizations.weight.original
            if name in p.adapters and p.merged != name:
                out[module_name] = rotate_rows(original.float(), p.adapters[name].theta()).to(original.dtype)
            else:
                out[module_name] = original.clone()
    return out


def assert_weights_current(model, name):
    expected = expected_weights(model, name)
    for module_name, module, _ in lorad_modules(model):
        assert torch.allclose(module.weight, expected[module_name], rtol=1e-6, atol=1e-7), module_name


@pytest.fixture
def two_adapters(monkeypatch):
    monkeypatch.setattr(lorad.model, "REUSE_MIN_BYTES", 0)  # these small layers too
    model = nn.Sequential(nn.Linear(16, 12), nn.Conv2d(4, 6, 3), nn.Linear(12, 16))
    lorad.add_adapter(model, "generator", {"0": 3, "1": 2, "2": 3}, seed=1)
    lorad.add_adapter(model, "fake", {"0": 2, "2": 2}, seed=2)
    randomize(model, "generator", seed=3)
    randomize(model, "fake", seed=4)
    return model


def test_a_weight_built_without_grad_serves_the_training_step(two_adapters, counted):
    """The fake score's pattern: built under no_grad, then used with grad: one build, and the same
    gradients as a fresh build."""
    model = two_adapters
    lorad.set_adapter(model, "fake")
    x = torch.randn(5, 16)
    with torch.no_grad():
        model[2](model[0](x))
    assert len(counted) == 2
    loss = model[2](model[0](x)).square().sum()
    assert len(counted) == 2  # served, not rebuilt
    loss.backward()
    reused = [p.grad.clone() for p in lorad.adapter_parameters(model, "fake")]
    for p in lorad.adapter_parameters(model, "fake"):
        p.grad = None
    lorad.set_rotation_reuse(model, False)
    model[2](model[0](x)).square().sum().backward()
    assert len(counted) == 4
    for p, g in zip(lorad.adapter_parameters(model, "fake"), reused):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True), lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), lambda ps: torch.optim.SGD(ps, lr=1e-2)])
def test_never_stale_after_an_optimizer_step(two_adapters, optimizer):
    model = two_adapters
    lorad.set_adapter(model, "fake")
    params = lorad.adapter_parameters(model, "fake")
    opt = optimizer(params)
    x = torch.randn(5, 16)
    for _ in range(3):
        with torch.no_grad():
            model[2](model[0](x))  # kept
        model[2](model[0](x)).square().sum().backward()  # served
        opt.step()
        opt.zero_grad()
        assert_weights_current(model, "fake")


def test_never_stale_after_other_writes(two_adapters, tmp_path):
    """.data writes, a changed base, a written handed-out weight, a checkpoint load, merge and unmerge."""
    model = two_adapters
    lorad.set_adapter(model, "generator")
    a = model[0].parametrizations.weight[0].adapters["generator"].A
    with torch.no_grad():
        model[0].weight  # kept
    a.data.mul_(2)  # no version counter moves: the kept copy of the values sees it
    assert_weights_current(model, "generator")
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(0.5)  # the base changes
    assert_weights_current(model, "generator")
    with torch.no_grad():
        model[0].weight.zero_()  # someone writes into the handed-out weight
    assert_weights_current(model, "generator")
    state = copy.deepcopy(model.state_dict())  # a checkpoint of these factors
    randomize(model, "generator", seed=9)
    with torch.no_grad():
        model[0].weight  # kept for the randomized factors
    model.load_state_dict(state)  # resume: the factors are written back in place
    assert_weights_current(model, "generator")
    copied = copy.deepcopy(model)  # a copy starts with nothing kept and its own, empty buffers
    assert all(not p.kept and not p.pool.by_shape for _, _, p in lorad_modules(copied))
    path = lorad.save_adapter(model, "generator", tmp_path / "g.safetensors")
    lorad.load_adapter(copied, path, "loaded", strict_base=False)
    lorad.set_adapter(copied, "loaded")
    with torch.no_grad():
        assert torch.allclose(copied[0].weight, expected_weights(model, "generator")["0"], rtol=1e-6, atol=1e-7)
    for merge in (True, False):
        if merge:
            lorad.merge(model, "generator")
        else:
            lorad.unmerge(model)
        assert_weights_current(model, "generator")


def test_a_buffer_a_graph_still_holds_is_not_overwritten(two_adapters):
    """Other builds of the same shape while a graph is alive go to other buffers: the graph's weight and
    gradients stay right."""
    model = two_adapters
    lorad.set_adapter(model, "generator")
    x = torch.randn(5, 16)
    params = lorad.adapter_parameters(model, "generator")[:2]
    expected = torch.autograd.grad(model[0](x).square().sum(), params)
    held = model[0].weight
    values = held.detach().clone()
    first = model[0](x).square().sum()
    lorad.set_adapter(model, "fake")
    with torch.no_grad():
        for _ in range(2):
            model[0].weight  # same shape, other factors
    lorad.set_adapter(model, "generator")
    assert torch.equal(held, values)
    got = torch.autograd.grad(first, params)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_teacher_passes_do_no_rotation_work(two_adapters, counted):
    model = two_adapters
    lorad.set_adapter(model, None)
    x = torch.randn(5, 16)
    model[2](model[0](x))
    assert model[0].weight is model[0].parametrizations.weight.original and not counted


def test_training_iterations_recycle_their_buffers_and_build_the_fake_once(counted, monkeypatch):
    """WaDi's iteration on the tiny U-Net: per iteration each adapted layer is built once per adapter,
    and after the first iteration no new rotation buffer is allocated."""
    monkeypatch.setattr(lorad.model, "REUSE_MIN_BYTES", 0)  # recycle and keep even the tiny model's weights
    model = tiny_unet()
    gen_targets = lorad.resolve_preset(model, "sd-unet-generator", rank=4)
    fake_targets = lorad.resolve_preset(model, "sd-unet-fake", rank=2)
    lorad.add_adapter(model, "generator", gen_targets, seed=0)
    lorad.add_adapter(model, "fake", fake_targets, seed=1)
    inputs = unet_inputs()
    optimizers = {n: torch.optim.AdamW(lorad.adapter_parameters(model, n), lr=1e-3) for n in ("generator", "fake")}
    memory = []
    for _ in range(2):
        counted.clear()
        lorad.set_adapter(model, "generator")
        loss = model(*inputs).sample.square().mean()
        with torch.no_grad():
            lorad.set_adapter(model, None)
            model(*inputs)
            lorad.set_adapter(model, "fake")
            model(*inputs)
        lorad.set_adapter(model, "generator")
        loss.backward()
        optimizers["generator"].step()
        lorad.set_adapter(model, "fake")
        model(*inputs).sample.square().mean().backward()
        optimizers["fake"].step()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        assert len(counted) == len(gen_targets) + len(fake_targets)
        memory.append(lorad.rotation_memory(model))
    assert memory[0] > 0 and memory[1] == memory[0]


def test_inference_mode_and_state_dict(two_adapters):
    model = two_adapters
    keys = set(model.state_dict())
    lorad.set_adapter(model, "generator")
    x = torch.randn(5, 16)
    with torch.inference_mode():
        inferred = model[0](x)
    trained = model[0](x)
    trained.square().sum().backward()
    assert torch.allclose(inferred, trained.detach(), rtol=1e-6, atol=1e-7)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("features,builds", [((512, 256), 1), ((16, 12), 2)])
def test_only_weights_worth_it_are_kept(counted, features, builds):
    """At the default threshold a 512 KiB weight built without grad serves the next call; a small one is
    rebuilt (cheaper than keeping a copy of its factors and comparing them)."""
    model = nn.Sequential(nn.Linear(*features))
    lorad.add_adapter(model, "a", {"0": 4})
    lorad.set_adapter(model, "a")
    with torch.no_grad():
        model[0].weight
    model[0].weight.sum().backward()
    assert len(counted) == builds


def test_reuse_changes_no_bit_of_training(tmp_path, monkeypatch):
    """WaDi iterations (generator and fake steps, AdamW) with every rotated weight kept and served, and
    with none: bit-identical adapters, so a resumed run (which starts with nothing kept) continues
    exactly as an uninterrupted one."""
    from tests.support.pipelines import tiny_sd_pipeline
    from wadi_distill.distill import FAKE, GENERATOR, VSDConfig, fake_step, generator_step
    from wadi_distill.teacher import load_teacher

    monkeypatch.setattr(lorad.model, "REUSE_MIN_BYTES", 0)
    folder = tiny_sd_pipeline(tmp_path / "pipe")
    final = {}
    for reuse in (True, False):
        teacher = load_teacher(folder)
        model = teacher.denoiser
        lorad.add_adapter(model, GENERATOR, lorad.resolve_preset(model, "sd-unet-generator", rank=4), seed=0)
        lorad.add_adapter(model, FAKE, lorad.resolve_preset(model, "sd-unet-fake", rank=2), seed=1)
        lorad.set_rotation_reuse(model, reuse)
        optimizers = {n: torch.optim.AdamW(lorad.adapter_parameters(model, n), lr=1e-2) for n in (GENERATOR, FAKE)}
        conditioning, null = teacher.encode(["a photo of a sneaker", "a bag"]), teacher.encode([""])
        rng = torch.Generator().manual_seed(0)
        for _ in range(2):
            loss, x0 = generator_step(teacher, model, conditioning, null, VSDConfig(), rng)
            loss.backward()
            optimizers[GENERATOR].step()
            fake_step(teacher, model, x0, conditioning, null, VSDConfig(), rng).backward()
            optimizers[FAKE].step()
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
        kept = sum(len(p.kept) for _, _, p in lorad_modules(model))
        assert (kept > 0) == reuse
        final[reuse] = {f"{role}/{key}": value.clone() for role in (GENERATOR, FAKE)
                        for key, value in lorad.adapter_state_dict(model, role).items()}
    assert final[True].keys() == final[False].keys()
    assert all(torch.equal(final[True][k], final[False][k]) for k in final[True])
