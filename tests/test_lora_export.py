"""LoRA files from any generator (issue 15, part 2): ``export --lora-rank/--lora-energy`` writes the merged
change as a truncated-SVD LoRA that diffusers' own loaders (peft format, and kohya through diffusers' kohya
conversion) load onto the teacher, reproducing the merged weights within the reported error; exact at full
rank; the error falls with the rank; bad options are one error line and leave nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tests.support.runs import lora_export_files
from tests.test_pipeline_export import run_options
from wadi_distill import lora_export, lora_keys
from wadi_distill.cli import app
from wadi_distill.config import load_config
from wadi_distill.export import export_run
from wadi_distill.lora_export import LoRASettings
from wadi_distill.training.loop import train

RUNS = ["sd-lorad", "sd-lora", "sd-full", "sdxl-lorad", "pixart-lorad"]
FAMILY = {"sd": "sd-epsilon", "sdxl": "sdxl", "pixart": "pixart"}  # run_options' names
FULL_RANK = 10 ** 6


def every_layer_plan(teacher: Path, path: Path) -> Path:
    """A plan adapting every Linear and Conv2d of the teacher's denoiser at rank 2 (1×1 and k×k convs, strided
    down-samplers, conv_in/conv_out, the embeddings): every key name the LoRA files can need."""
    from wadi_distill.teacher import load_denoiser

    model = load_denoiser(teacher)
    path.write_text(json.dumps({n: 2 for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}))
    return path


@pytest.fixture(scope="module", params=RUNS)
def run(request, tmp_path_factory):
    """(family, adapter, run folder, teacher folder): a finished 2-step run adapting every layer."""
    family, adapter = request.param.split("-")
    root = tmp_path_factory.mktemp(request.param)
    options = run_options(FAMILY[family], root)
    options.update(adapter=adapter, plan=str(every_layer_plan(Path(options["teacher"]), root / "plan.json")))
    if adapter == "full":
        options.update(generator_lr=1e-3)
    config = load_config(**options)
    train(config, progress=False)
    return family, adapter, Path(config.out), Path(config.teacher)


def export(run, out: Path, **settings) -> tuple[Path, dict, list[dict]]:
    """(the export's lora folder, lora_report.json, lora_layers.csv rows) of the ``run`` fixture's run."""
    return lora_export_files(run[2], out, **settings)


def teacher_pipeline(family: str, teacher: Path):
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "pixart": PixArtAlphaPipeline}[family]
    return kind.from_pretrained(teacher, **({"safety_checker": None} if family == "sd" else {}))


def with_lora(family: str, teacher: Path, folder: Path, weight_name: str) -> nn.Module:
    """The teacher's denoiser with the LoRA file loaded by diffusers (``load_lora_weights``) and fused. diffusers
    0.42 has no LoRA loader for PixArt (neither its pipeline nor its transformer has one): there peft's own
    ``inject_adapter_in_model`` and ``set_peft_model_state_dict`` with the file's LoraConfig load it."""
    pipe = teacher_pipeline(family, teacher)
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(folder, weight_name=weight_name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return pipe.unet
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(folder / weight_name, "pt") as handle:
        state = {k.removeprefix("transformer."): handle.get_tensor(k) for k in handle.keys()}
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    model = pipe.transformer
    inject_adapter_in_model(LoraConfig(**{k.removeprefix("transformer."): v for k, v in config.items()}), model)
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    return model


def merged_and_teacher(export_folder: Path, teacher: Path, family: str) -> tuple[dict, dict]:
    from wadi_distill.teacher import load_denoiser

    component = "transformer" if family == "pixart" else "unet"
    return (load_denoiser(export_folder / component).state_dict(), load_denoiser(teacher).state_dict())


def base_layer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A fused peft model's weights under plain names (``x.base_layer.weight`` -> ``x.weight``)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def test_loaders_reproduce_the_merged_weights_within_the_reported_error(run, tmp_path):
    family, adapter, _, teacher = run
    folder, report, rows = export(run, tmp_path / "export", rank=2)
    merged, original = merged_and_teacher(tmp_path / "export", teacher, family)
    errors = {row["name"]: float(row["relative_error"]) for row in rows}
    files = [f for f in report["files"].values() if f]
    assert files == ([lora_keys.PEFT_FILE] if family == "pixart" else [lora_keys.PEFT_FILE, lora_keys.KOHYA_FILE])
    if family != "pixart":  # kohya's spelling: SD by diffusers names, SDXL by the original (sgm) ones
        from safetensors import safe_open

        with safe_open(folder / lora_keys.KOHYA_FILE, "pt") as handle:
            keys = list(handle.keys())
        assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                   for k in keys)
        blocks = "input_blocks" if family == "sdxl" else "down_blocks"
        assert any(k.startswith(f"lora_unet_{blocks}_") for k in keys)
    for weight_name in files:
        loaded = base_layer_state(with_lora(family, teacher, folder, weight_name))
        assert loaded.keys() == merged.keys()
        for key in merged:
            layer = key.removesuffix(".weight")
            if layer in errors:
                change = (merged[key].double() - original[key].double()).norm()
                measured = ((loaded[key].double() - merged[key].double()).norm() / change).item()
                # besides the LoRA's own error: float32 rounding of W + up @ down and of W', each <= eps/2 |w|
                rounding = torch.finfo(torch.float32).eps * merged[key].double().norm().item() / change.item()
                assert abs(measured - errors[layer]) <= 1e-3 * errors[layer] + rounding, (weight_name, key)
            else:  # unchanged by the LoRA: a bias, a norm, an untouched layer
                assert torch.equal(loaded[key], original[key]), (weight_name, key)
    assert len(rows) == report["layers"] and {int(r["rank"]) for r in rows} <= {1, 2}
    assert any(r["kind"] == "conv" and "x3x3" in r["shape"] for r in rows) == (family != "pixart")
    assert 0 < report["total_relative_error"] < 1
    not_in_lora = report["changes_not_in_lora"]
    # a full fine-tune also trains biases and norms, which no LoRA holds: listed, never a LoRA layer's weight
    assert (adapter == "full") == bool(not_in_lora)
    assert not {k.removesuffix(".weight") for k in not_in_lora} & set(errors)
    assert adapter != "full" or any(k.endswith(".bias") for k in not_in_lora)


def test_at_full_rank_the_lora_is_the_merged_model(run, tmp_path):
    family, adapter, _, teacher = run
    folder, report, rows = export(run, tmp_path / "export", rank=FULL_RANK)
    assert all(int(r["rank"]) == int(r["full_rank"]) for r in rows)
    assert report["total_relative_error"] < 1e-6 and report["max_layer_relative_error"] < 1e-5
    one_step = report["one_step"]
    if adapter == "full":  # its biases and norms changed too, and are not in the LoRA: the report says so
        assert one_step["latents_relative_max_difference"] > 1e-4
        return
    assert one_step["latents_relative_max_difference"] < 1e-5 and one_step["image_max_abs_difference"] <= 1
    if family != "pixart":  # and the same through diffusers: its loaded LoRA in the exported one-step pipeline
        assert_pipeline_with_lora_matches(tmp_path / "export", teacher, family, folder, tolerance=1e-5)


@torch.no_grad()
def assert_pipeline_with_lora_matches(export_folder: Path, teacher: Path, family: str, folder: Path,
                                      tolerance: float) -> None:
    from diffusers import DiffusionPipeline

    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise

    prompts = ["a photo of a bag", "a photo of a shirt"]
    noise = initial_noise(load_export(export_folder).teacher, len(prompts), seed=0)
    pipe = DiffusionPipeline.from_pretrained(export_folder, use_safetensors=True)
    call = dict(latents=noise, output_type="latent", num_inference_steps=1, guidance_scale=0.0)
    merged = pipe(prompts, **call).images
    pipe.unet = with_lora(family, teacher, folder, lora_keys.PEFT_FILE)
    loaded = pipe(prompts, **call).images
    assert ((loaded - merged).abs().max() / merged.abs().max()).item() < tolerance


@pytest.mark.parametrize("run", ["sd-lorad", "sd-full", "sdxl-lorad"], indirect=True)
def test_the_reported_one_step_difference_is_what_diffusers_gives(run, tmp_path):
    """The report's latents difference, recomputed with the kohya file as diffusers loads it onto the teacher
    (a full fine-tune: the teacher's biases and norms, which the LoRA does not change)."""
    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise, one_step_sample

    family, _, _, teacher = run
    folder, report, _ = export(run, tmp_path / "export", rank=1)
    model = load_export(tmp_path / "export")
    prompts = report["one_step"]["prompts"]
    noise = initial_noise(model.teacher, len(prompts), report["one_step"]["seed"])
    conditioning = model.teacher.encode(prompts)
    with torch.no_grad():
        merged = one_step_sample(model.teacher, model.generator.eval(), noise, conditioning, model.vsd)
        loaded = one_step_sample(model.teacher, with_lora(family, teacher, folder, lora_keys.KOHYA_FILE).eval(),
                                 noise, conditioning, model.vsd)
    difference = (loaded - merged).abs()
    assert difference.max().item() == pytest.approx(report["one_step"]["latents_max_abs_difference"], rel=1e-3)
    assert difference.mean().item() == pytest.approx(report["one_step"]["latents_mean_abs_difference"], rel=1e-3)
    assert difference.max().item() > 0


@pytest.mark.parametrize("run", ["sd-lorad"], indirect=True)
def test_the_lora_folder_alone_loads_the_diffusers_file(run, tmp_path):
    """``pipe.load_lora_weights(EXPORT / "lora")``, no weight name: diffusers picks its own default file name."""
    family, _, _, teacher = run
    folder, _, _ = export(run, tmp_path / "export", rank=2)
    pipe = teacher_pipeline(family, teacher)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    named = with_lora(family, teacher, folder, lora_keys.PEFT_FILE).state_dict()
    assert all(torch.equal(v, named[k]) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize("run", ["sd-lorad"], indirect=True)
def test_the_error_falls_with_the_rank(run, tmp_path):
    results = [export(run, tmp_path / f"r{rank}", rank=rank) for rank in (1, 2, 4, FULL_RANK)]
    totals = [report["total_relative_error"] for _, report, _ in results]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4 and totals[-1] < 1e-6
    per_layer = [[float(r["relative_error"]) for r in rows] for _, _, rows in results]
    for lower, higher in zip(per_layer, per_layer[1:]):
        assert all(b <= a + 1e-9 for a, b in zip(lower, higher))


@pytest.mark.parametrize("run", ["sd-lorad"], indirect=True)
def test_energy_ranks_alone_and_capped(run, tmp_path):
    _, energy, energy_rows = export(run, tmp_path / "energy", energy=0.9)
    _, both, both_rows = export(run, tmp_path / "both", energy=0.9, rank=3)
    assert energy["criterion"] == {"rank": None, "energy": 0.9} and both["criterion"] == {"rank": 3, "energy": 0.9}
    assert all(float(r["energy_kept"]) >= 0.9 for r in energy_rows)
    assert all(math.sqrt(1 - float(r["energy_kept"])) == pytest.approx(float(r["relative_error"]), abs=1e-5)
               for r in energy_rows)
    assert [int(r["rank"]) for r in both_rows] == [min(3, int(r["rank"])) for r in energy_rows]
    assert len({int(r["rank"]) for r in energy_rows}) > 1  # a rank per layer


def test_energy_rank_is_the_smallest_that_keeps_the_share():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1, 0: shares 9/14, 13/14, 1, 1
    assert [lora_export.energy_rank(s, e) for e in (0.5, 9 / 14, 0.65, 13 / 14, 0.99)] == [1, 1, 2, 2, 3]
    assert lora_export.energy_rank(s, 1.0) == 4  # 1: every value, the full rank (exact)
    assert lora_export.energy_rank(torch.tensor([1.0, 1e-9]), 1.0) == 2  # though 1e-18 of the energy rounds away
    assert lora_export.choose_rank(s, LoRASettings(rank=10)) == 4
    assert lora_export.choose_rank(s, LoRASettings(rank=1, energy=0.99)) == 1


def test_truncation_of_a_planted_low_rank_change_is_exact_at_its_rank():
    generator = torch.Generator().manual_seed(0)
    change = torch.randn(12, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, 20, generator=generator, dtype=torch.float64)
    for rank, exact in ((2, False), (3, True), (5, True)):
        up, down, kept = lora_export.truncated_factors(change, LoRASettings(rank=rank))
        error = ((up.double() @ down.double() - change).norm() / change.norm()).item()
        assert (error < 1e-6) == exact and (kept == pytest.approx(1.0)) == exact and up.shape == (12, min(rank, 12))


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_a_conv_lora_is_down_conv_then_a_1x1_up_conv(stride, padding):
    """The conv reshape: (o, i, kh, kw) as (o, i·kh·kw); down (r, i, kh, kw) with the layer's stride and padding,
    then up (o, r, 1, 1), computes the conv with the kernel up @ down, as peft's and kohya's conv LoRAs do."""
    generator = torch.Generator().manual_seed(0)
    change = torch.randn(6, 4, 3, 3, generator=generator)
    up, down, _ = lora_export.truncated_factors(lora_export.as_matrix(change), LoRASettings(rank=FULL_RANK))
    up, down = lora_export.factor_shapes(up, down, change.shape)
    assert up.shape == (6, 6, 1, 1) and down.shape == (6, 4, 3, 3)
    x = torch.randn(2, 4, 9, 9, generator=generator)
    two = nn.functional.conv2d(nn.functional.conv2d(x, down, stride=stride, padding=padding), up)
    one = nn.functional.conv2d(x, change, stride=stride, padding=padding)
    assert torch.allclose(two, one, atol=1e-4)


@pytest.mark.parametrize("maker", ["sd", "sdxl"])
def test_original_names_map_back_under_diffusers_converter(maker, tmp_path):
    """Every parameter of the tiny SD and SDXL U-Nets gets an LDM name that diffusers' converter maps back."""
    from tests.support.pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
    from wadi_distill.teacher import load_denoiser

    folder = (tiny_sd_pipeline if maker == "sd" else tiny_sdxl_pipeline)(tmp_path / "pipe")
    names = lora_keys.ldm_names(load_denoiser(folder))
    assert names["conv_in.weight"] == "input_blocks.0.0.weight" and names["conv_out.weight"] == "out.2.weight"
    assert names["down_blocks.0.downsamplers.0.conv.weight"].endswith(".0.op.weight")


@pytest.mark.parametrize("architecture", ["sd15_unet", "sd21_unet", "sdxl_unet"])
def test_original_names_of_the_real_architectures(architecture):
    """On the exact SD1.5, SD2.1 and SDXL U-Nets (meta device): every name maps back under diffusers' converter,
    and SDXL's kohya names are sd-scripts' own (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``...)."""
    from types import SimpleNamespace

    from tests.test_layers import meta_model

    model = meta_model(architecture)
    lora_keys.ldm_names(model)
    if architecture != "sdxl_unet":
        return
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "down_blocks.1.resnets.0.conv1": "input_blocks_4_0_in_layers_2",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
        "up_blocks.2.resnets.2.time_emb_proj": "output_blocks_8_0_emb_layers_1",
        "add_embedding.linear_1": "label_emb_0_0", "time_embedding.linear_2": "time_embed_2",
        "conv_in": "input_blocks_0_0", "conv_out": "out_2"}
    layers = [SimpleNamespace(name=name) for name in expected]
    assert lora_keys.kohya_names("sdxl", model, layers) == {k: "lora_unet_" + v for k, v in expected.items()}


@pytest.mark.parametrize("run", ["sd-lorad"], indirect=True)
def test_export_with_lora_prints_the_error(run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(run[2]), "--out", str(tmp_path / "e"), "--lora-rank", "2"])
    assert result.exit_code == 0, result.output
    assert "lora: " in result.output and "total relative error" in result.output and "grey levels" in result.output
    assert (tmp_path / "e" / "lora" / lora_keys.PEFT_FILE).is_file()


@pytest.mark.parametrize("run", ["sd-lorad"], indirect=True)
@pytest.mark.parametrize("options", [
    ["--lora-rank", "0"], ["--lora-rank", "-2"], ["--lora-rank", "x"], ["--lora-rank", "2.5"],
    ["--lora-energy", "0"], ["--lora-energy", "1.5"], ["--lora-energy", "-0.1"], ["--lora-energy", "nan"],
    ["--lora-energy", "inf"], ["--lora-energy", "most"], ["--lora-rank", "0", "--lora-energy", "0.9"],
])
def test_bad_lora_options_are_one_error_line_and_touch_nothing(run, tmp_path, options):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    for out in (tmp_path / "new", mine):
        result = CliRunner().invoke(app, ["export", str(run[2]), "--out", str(out), *options])
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.output
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "the user's"


@pytest.mark.parametrize("run", ["sd-lorad"], indirect=True)
def test_a_failure_while_writing_the_lora_leaves_the_earlier_export(run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export_run(run[2], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_keys, "write_kohya", broken)
    result = CliRunner().invoke(app, ["export", str(run[2]), "--out", str(out), "--lora-rank", "2"])
    assert result.exit_code == 2 and "No space left" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and not (out / "lora").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
