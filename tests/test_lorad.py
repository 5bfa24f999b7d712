"""LoRaD: exactness, norm preservation, gradients, merging, switching, files, presets."""



import pytest
import torch
from accelerate import init_empty_weights
from torch import nn

from wadi_analysis.examples import real_config, tiny_sd15_config
from wadi_distill import adapters, lorad
from wadi_distill.lorad.rotation import PairRotation, rotate_rows


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_sd15_config()).eval()


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16, caption_channels=24, sample_size=8,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                    attention_bias=True, activation_fn="gelu-approximate",
                                    num_embeds_ada_norm=1000).eval()


def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 700]),
            torch.randn(2, 7, 64, generator=generator))


def pixart_inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=generator), timestep=torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 5, 24, generator=generator),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def run_unet(model):
    with torch.no_grad():
        return model(*unet_inputs()).sample


def run_pixart(model):
    with torch.no_grad():
        return model(**pixart_inputs()).sample


def randomize(model, name, scale=0.3, seed=0):
    """Give adapter ``name`` non-zero angles (A starts at zero, so theta would be 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lorad.adapter_parameters(model, name):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def everything_targets(model):
    return lorad.resolve_spec(model, lorad.TargetSpec(patterns=["*"], kinds=("linear", "conv"), rank=4))


# ----------------------------------------------------------------------------- the math
@pytest.mark.parametrize("shape", [(5, 8), (5, 7), (6, 3, 3, 3), (4, 5, 1, 1)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_row_and_pair_norms_are_preserved(shape, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator, dtype=dtype)
    width = weight[0].numel()
    theta = torch.randn(shape[0], width // 2, generator=generator, dtype=dtype) * 3
    rotated = rotate_rows(weight, theta)
    assert rotated.shape == weight.shape and rotated.dtype == dtype
    rows, new_rows = weight.reshape(shape[0], -1), rotated.reshape(shape[0], -1)
    assert torch.allclose(new_rows.norm(dim=1), rows.norm(dim=1), rtol=tolerance, atol=0)
    pairs = 2 * (width // 2)
    assert torch.allclose(new_rows[:, :pairs].unflatten(1, (-1, 2)).norm(dim=2),
                          rows[:, :pairs].unflatten(1, (-1, 2)).norm(dim=2), rtol=tolerance, atol=0)
    assert not torch.allclose(new_rows, rows)
    if width % 2:
        assert torch.equal(new_rows[:, -1], rows[:, -1])  # the unpaired column stays


def test_rotation_matches_the_equations():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    theta = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    c, s = torch.cos(theta[0]), torch.sin(theta[0])
    expected = torch.tensor([[1 * c[0] - 2 * s[0], 1 * s[0] + 2 * c[0], 3 * c[1] - 4 * s[1], 3 * s[1] + 4 * c[1], 5.0]],
                            dtype=torch.float64)
    assert torch.allclose(rotate_rows(weight, theta), expected, atol=1e-15)


@pytest.mark.parametrize("shape", [(4, 6), (3, 7), (4, 3, 3, 3), (2, 5, 1, 3)])
def test_gradients_are_exact(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(shape[0], weight[0].numel() // 2, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, t: PairRotation.apply(w.reshape(shape[0], -1), t), (weight, theta))


@pytest.mark.parametrize("layer", [nn.Linear(7, 5), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(5, 2, 1)])
def test_layer_gradients_through_the_adapter(layer):
    """gradcheck of the adapted module's own forward with respect to A and B (float64)."""
    model = nn.Sequential(layer).double()
    lorad.add_adapter(model, "a", {"0": 2})
    lorad.set_adapter(model, "a")
    model.double()
    x = torch.randn(2, 7, dtype=torch.float64) if isinstance(layer, nn.Linear) else \
        torch.randn(1, layer.in_channels, 4, 4, dtype=torch.float64)
    names = ["0.parametrizations.weight.0.adapters.a.A", "0.parametrizations.weight.0.adapters.a.B"]
    a = torch.randn(dict(model.named_parameters())[names[0]].shape, dtype=torch.float64, requires_grad=True)
    b = dict(model.named_parameters())[names[1]].detach().clone().requires_grad_(True)

    def forward(a, b):
        return torch.func.functional_call(model, {names[0]: a, names[1]: b}, (x,))

    assert torch.autograd.gradcheck(forward, (a, b))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("build,run", [(tiny_unet, run_unet), (tiny_pixart, run_pixart)])
def test_zero_angles_are_the_base_model_and_norms_are_kept(build, run):
    model = build()
    base = run(model)
    base_weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    targets = everything_targets(model)
    adapters.attach(model, "lorad", targets, "gen")
    assert torch.equal(run(model), base)  # theta = A @ B = 0 exactly
    randomize(model, "gen")
    assert not torch.allclose(run(model), base)
    modules = dict(model.named_modules())
    for name in targets:
        old, new = base_weights[name], modules[name].weight
        old_rows, new_rows = old.reshape(old.shape[0], -1), new.reshape(new.shape[0], -1)
        assert torch.allclose(new_rows.norm(dim=1), old_rows.norm(dim=1), rtol=1e-6, atol=0), name


@pytest.mark.parametrize("build,run", [(tiny_unet, run_unet), (tiny_pixart, run_pixart)])
def test_merged_equals_unmerged(build, run):
    model = build()
    base = run(model)
    adapters.attach(model, "lorad", everything_targets(model), "gen")
    randomize(model, "gen", scale=0.2)
    adapted = run(model)
    lorad.merge(model, "gen")
    assert torch.allclose(run(model), adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())
    lorad.unmerge(model)
    assert torch.allclose(run(model), adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())
    lorad.set_adapter(model, None)
    assert torch.allclose(run(model), base, rtol=1e-5, atol=1e-5 * base.abs().max().item())
    lorad.set_adapter(model, "gen")
    plain = lorad.merge_and_unload(model, "gen")
    assert type(plain) is type(build()) and not any("parametrizations" in k for k in plain.state_dict())
    assert torch.allclose(run(plain), adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())


def test_merged_model_is_a_plain_diffusers_model(tmp_path):
    from diffusers import UNet2DConditionModel

    model = tiny_unet()
    adapters.attach(model, "lorad", lorad.resolve_preset(model, "sd-unet-generator", rank=4), "gen")
    randomize(model, "gen")
    adapted = run_unet(model)
    lorad.merge_and_unload(model, "gen").save_pretrained(tmp_path / "merged")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(run_unet(reloaded), adapted, rtol=1e-5, atol=1e-6)


def test_switching_adapters_matches_single_adapter_models():
    """One frozen base as teacher (no adapter), generator (rank 8) and fake score (rank 2, attn + ff only)."""
    shared = tiny_unet()
    teacher_output = run_unet(shared)
    generator_targets = lorad.resolve_preset(shared, "sd-unet-generator", rank=8)
    fake_targets = lorad.resolve_preset(shared, "sd-unet-fake", rank=2)
    lorad.add_adapter(shared, "generator", generator_targets, seed=1)
    lorad.add_adapter(shared, "fake", fake_targets, seed=2)
    randomize(shared, "generator", seed=3)
    randomize(shared, "fake", seed=4)
    singles = {}
    for name, targets, seed in (("generator", generator_targets, 3), ("fake", fake_targets, 4)):
        single = tiny_unet()
        lorad.add_adapter(single, name, targets, seed=1)
        lorad.set_adapter(single, name)
        randomize(single, name, seed=seed)
        singles[name] = run_unet(single)
    for _ in range(2):  # switch back and forth
        for name in ("generator", None, "fake"):
            lorad.set_adapter(shared, name)
            expected = teacher_output if name is None else singles[name]
            assert torch.equal(run_unet(shared), expected), name
    assert not torch.allclose(singles["generator"], singles["fake"])


def test_only_the_active_adapter_gets_gradients():
    model = tiny_unet()
    lorad.add_adapter(model, "generator", lorad.resolve_preset(model, "sd-unet-generator", rank=4))
    lorad.add_adapter(model, "fake", lorad.resolve_preset(model, "sd-unet-fake", rank=2))
    lorad.set_adapter(model, "fake")
    randomize(model, "fake")
    model(*unet_inputs()).sample.square().mean().backward()
    fake = {id(p) for p in lorad.adapter_parameters(model, "fake")}
    for name, param in model.named_parameters():
        if id(param) in fake:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_angles(dtype):
    layer = nn.Sequential(nn.Linear(16, 8)).to(dtype)
    lorad.add_adapter(layer, "a", {"0": 4})
    lorad.set_adapter(layer, "a")
    randomize(layer, "a")
    assert all(p.dtype == torch.float32 for p in lorad.adapter_parameters(layer, "a"))
    weight = layer[0].weight
    assert weight.dtype == dtype
    original = layer[0].parametrizations.weight.original
    theta = layer[0].parametrizations.weight[0].adapters["a"].theta()
    # The rotation runs in fp32 and is cast once: exactly the fp32 result rounded to the base dtype.
    assert torch.equal(weight, rotate_rows(original.float(), theta).to(dtype))
    out = layer(torch.randn(3, 16, dtype=dtype))
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lorad.adapter_parameters(layer, "a"))


# ----------------------------------------------------------------------------- files
def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_unet()
    targets = everything_targets(model)
    lorad.add_adapter(model, "gen", targets)
    lorad.set_adapter(model, "gen")
    randomize(model, "gen")
    expected = run_unet(model)
    path = lorad.save_adapter(model, "gen", tmp_path / "gen.safetensors")
    _, metadata = lorad.read_adapter(path)
    assert metadata["pairing"].startswith("adjacent columns") and metadata["base_dtype"] == "float32"
    fresh = tiny_unet()
    name = lorad.load_adapter(fresh, path)
    lorad.set_adapter(fresh, name)
    assert torch.equal(run_unet(fresh), expected)
    loaded = lorad.adapter_state_dict(fresh, "gen")
    for key, value in lorad.adapter_state_dict(model, "gen").items():
        assert torch.equal(loaded[key], value)


def test_loading_onto_another_base_is_refused(tmp_path):
    model = tiny_unet()
    lorad.add_adapter(model, "gen", lorad.resolve_preset(model, "sd-unet-generator", rank=4))
    path = lorad.save_adapter(model, "gen", tmp_path / "gen.safetensors")
    other = tiny_unet()
    with torch.no_grad():
        other.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(1.01)
    with pytest.raises(lorad.AdapterFileError, match="other base weights"):
        lorad.load_adapter(other, path)
    assert lorad.adapter_names(other) == []
    from diffusers import UNet2DConditionModel

    config = dict(tiny_sd15_config(), cross_attention_dim=32)
    torch.manual_seed(0)
    with pytest.raises(lorad.AdapterFileError, match="shape"):
        lorad.load_adapter(UNet2DConditionModel(**config), path)
    with pytest.raises(lorad.AdapterFileError, match="does not have"):
        lorad.load_adapter(tiny_pixart(), path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(lorad.AdapterFileError, match="not a readable"):
        lorad.load_adapter(tiny_unet(), tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- targets and presets
PUBLISHED = [("sd15_unet", "sd-unet-generator", 83.80), ("sd21_unet", "sd-unet-generator", 94.43),
             ("pixart_alpha_xl2_transformer", "pixart-generator", 81.22)]


@pytest.mark.parametrize("config,preset,millions", PUBLISHED)
def test_preset_parameter_counts_equal_the_published_ones(config, preset, millions):
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    cls = PixArtTransformer2DModel if config.startswith("pixart") else UNet2DConditionModel
    with init_empty_weights():
        model = cls.from_config(real_config(config))
    count = adapters.attach(model, "lorad", lorad.resolve_preset(model, preset), "gen")
    assert round(count / 1e6, 2) == millions
    assert adapters.trainable_parameters(model) == count


def test_target_choices_resolve_to_module_ranks(tmp_path):
    model = tiny_unet()
    spec = lorad.TargetSpec(patterns=["*attn2*"], kinds=("linear",), rank=8, ranks={"*to_k": 2})
    targets = lorad.resolve_spec(model, spec)
    assert targets and all("attn2" in n for n in targets)
    assert {r for n, r in targets.items() if n.endswith("to_k")} == {2} and 8 in targets.values()
    convs = lorad.resolve_spec(model, lorad.TargetSpec(kinds=("conv",), rank=4))
    assert all(isinstance(dict(model.named_modules())[n], nn.Conv2d) for n in convs)
    lorad.write_plan(tmp_path / "plan.json", targets, source="test")
    assert lorad.read_plan(tmp_path / "plan.json") == targets
    fake = lorad.resolve_preset(model, "sd-unet-fake")
    assert set(fake.values()) == {32} and all(".attn" in n or ".ff." in n for n in fake)
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="format"):
        lorad.read_plan(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no module"):
        adapters.attach(model, "lorad", {"nope": 3})


# ----------------------------------------------------------------------------- baselines on the same targets
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_baselines_attach_to_the_same_targets(method):
    model = tiny_unet()
    base = run_unet(model)
    targets = lorad.resolve_preset(model, "sd-unet-generator", rank=8)
    ranks = adapters.lora_ranks_at_equal_budget(model, targets)
    count = adapters.attach(model, method, ranks, "gen")
    lorad_count = adapters.lorad_parameters(model, targets)
    assert abs(count - lorad_count) / lorad_count < 0.15 and adapters.trainable_parameters(model) == count
    wrapped = {n.removesuffix(".base_layer") for n, m in model.named_modules() if n.endswith(".base_layer")}
    assert wrapped == set(targets)
    assert torch.allclose(run_unet(model), base, atol=1e-6)  # LoRA starts at the teacher too
    adapters.activate(model, None)
    assert torch.allclose(run_unet(model), base, atol=1e-6)


def test_full_fine_tuning_trains_exactly_the_targets():
    model = tiny_unet()
    targets = lorad.resolve_preset(model, "sd-unet-fake", rank=1)
    count = adapters.attach(model, "full", targets)
    modules = dict(model.named_modules())
    assert count == sum(p.numel() for n in targets for p in modules[n].parameters())


# ----------------------------------------------------------------------------- command line
def test_cli_merges_an_adapter_and_refuses_a_wrong_base(tmp_path):
    from diffusers import UNet2DConditionModel
    from typer.testing import CliRunner

    from wadi_distill.cli import app

    model = tiny_unet()
    model.save_pretrained(tmp_path / "base")
    lorad.add_adapter(model, "gen", lorad.resolve_preset(model, "sd-unet-generator", rank=4))
    lorad.set_adapter(model, "gen")
    randomize(model, "gen")
    expected = run_unet(model)
    lorad.save_adapter(model, "gen", tmp_path / "gen.safetensors")
    runner = CliRunner()
    info = runner.invoke(app, ["adapter-info", str(tmp_path / "gen.safetensors")])
    assert info.exit_code == 0 and "'gen'" in info.output and "base_fingerprint" in info.output
    result = runner.invoke(app, ["merge", str(tmp_path / "base"), str(tmp_path / "gen.safetensors"),
                                 "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(run_unet(merged), expected, rtol=1e-5, atol=1e-6)
    # The merged model is another base: the adapter must not be applied to it twice.
    again = runner.invoke(app, ["merge", str(tmp_path / "merged"), str(tmp_path / "gen.safetensors"),
                                "--out", str(tmp_path / "twice")])
    assert again.exit_code == 2 and again.stderr.startswith("error: ") and "other base weights" in again.stderr
    assert again.stderr.count("\n") == 1 and not (tmp_path / "twice").exists()
    tiny_pixart().save_pretrained(tmp_path / "pixart")
    wrong = runner.invoke(app, ["merge", str(tmp_path / "pixart"), str(tmp_path / "gen.safetensors"),
                                "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and wrong.stderr.startswith("error: ") and "wrong base model" in wrong.stderr


def test_angles_stay_float32_under_autocast():
    """Autocast would run theta = A @ B in bf16; the angles are the adapter, so they stay float32."""
    from wadi_distill.lorad.rotation import RotationAdapter

    adapter = RotationAdapter(8, 16, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.A.normal_(generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta = adapter.theta()
    assert theta.dtype == torch.float32
    torch.testing.assert_close(theta, adapter.A @ adapter.B)
