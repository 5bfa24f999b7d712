"""LoRA export of runs on rectified-flow teachers (tiny real SD3, FLUX.1 and SANA pipelines): ``export --lora-rank``
writes the merged change of every changed Linear/Conv2d as a diffusers/peft file (``transformer.`` keys) that
``StableDiffusion3Pipeline.load_lora_weights`` / ``FluxPipeline.load_lora_weights`` load onto the teacher; the
loaded weights are the merged ones within the reported per-layer error, the teacher pipeline with the LoRA runs
one step to the export's output (full rank), and the report's one-step difference is what diffusers' loaded
LoRA gives. No kohya file for these families (diffusers reads none in diffusers' names). SANA (its pipeline's
own ``load_lora_weights``): weights and the reported difference; its depthwise ``conv_depth`` has no LoRA layout
and is reported instead; a run on the ``sana-`` presets (no depthwise conv) loaded onto the teacher pipeline with
a one-step ``FlowMatchEulerDiscreteScheduler`` in place of its DPM-Solver is ``sample`` of the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tests.support.pipelines import tiny_flux_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline
from tests.support.runs import lora_export_files
from tests.support.tensors import relative_difference
from wadi_distill import lora_export, lora_keys
from wadi_distill.cli import app
from wadi_distill.config import load_config
from wadi_distill.lora_export import LoRASettings
from wadi_distill.training.loop import train

PROMPTS = ["a photo of a bag", "a photo of a shirt"]
RUNS = ["sd3-lorad", "sd3-full", "flux-lorad", "flux-full", "sana-lorad"]
PIPELINES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "sana": tiny_sana_pipeline}
FULL_RANK = 10 ** 6


@pytest.fixture(scope="module", params=RUNS)
def run(request, tmp_path_factory):
    """(family, adapter, run folder, teacher folder): a finished 2-step run adapting every Linear and Conv2d of
    the transformer (SD3's patch-embedding conv, FLUX's embedders, adaLN, single-block proj_mlp/proj_out)."""
    from wadi_distill.teacher import load_denoiser

    family, adapter = request.param.split("-")
    root = tmp_path_factory.mktemp(request.param)
    teacher = PIPELINES[family](root / "pipe")
    plan = {n: 2 for n, m in load_denoiser(teacher).named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    guidance = {"vsd": {"guidance_real": 1.0, "guidance_fake": 1.0}} if family == "flux" else {}
    config = load_config(teacher=str(teacher), prompts=str(root / "prompts.txt"), out=str(root / "run"), steps=2,
                         batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(root / "cache"),
                         generator_lr=1e-3 if adapter == "full" else 1e-2, validate_every=100, adapter=adapter,
                         plan=str(root / "plan.json"), generator_preset=f"{family}-generator",
                         fake_preset=f"{family}-fake", **guidance)
    train(config, progress=False)
    return family, adapter, Path(config.out), teacher


def export(run, out: Path, **settings) -> tuple[Path, dict, list[dict]]:
    """(the export's lora folder, lora_report.json, lora_layers.csv rows) of the ``run`` fixture's run."""
    return lora_export_files(run[2], out, **settings)


def teacher_pipeline(family: str, teacher: Path):
    from diffusers import FluxPipeline, SanaPipeline, StableDiffusion3Pipeline

    kind = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "sana": SanaPipeline}[family]
    return kind.from_pretrained(teacher, local_files_only=True)


def with_lora(family: str, teacher: Path, folder: Path, fuse: bool):
    """The teacher pipeline with the LoRA folder loaded by diffusers' own ``load_lora_weights`` (no weight
    name: its default file name), fused into the weights (and the peft layers removed) when ``fuse``."""
    pipe = teacher_pipeline(family, teacher)
    pipe.load_lora_weights(folder)
    if fuse:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


def base_layer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A peft model's weights under plain names (``x.base_layer.weight`` -> ``x.weight``)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def test_diffusers_loads_the_lora_within_the_reported_error(run, tmp_path):
    from safetensors import safe_open

    from wadi_distill.teacher import load_denoiser

    family, adapter, _, teacher = run
    folder, report, rows = export(run, tmp_path / "export", rank=2)
    assert report["files"] == {"diffusers": lora_keys.PEFT_FILE, "kohya": None}
    assert not (folder / lora_keys.KOHYA_FILE).exists()
    with safe_open(folder / lora_keys.PEFT_FILE, "pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    original = load_denoiser(teacher)
    layers = [n for n, m in original.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    merged = load_denoiser(tmp_path / "export" / "transformer").state_dict()
    original = original.state_dict()
    changed = [n for n in layers if not torch.equal(merged[f"{n}.weight"], original[f"{n}.weight"])]
    depthwise = [n for n in changed if n.endswith("ff.conv_depth")]  # SANA's: reported, not in the LoRA
    assert [r["name"] for r in rows] == [n for n in changed if n not in depthwise]
    assert (family == "sana") == bool(depthwise)
    assert all(f"{n}.weight" in report["changes_not_in_lora"] for n in depthwise)
    # every layer trained but SD3's last add_q_proj: that context_pre_only block's context queries only reach
    # its context outputs, which it discards (no gradient); so the files hold every name they can need
    assert set(layers) - set(changed) == ({"transformer_blocks.1.attn.add_q_proj"} if family == "sd3" else set())
    assert any(r["kind"] == "conv" for r in rows) == (family != "flux")  # patch embeddings, SANA's 1x1 convs
    loaded = base_layer_state(with_lora(family, teacher, folder, fuse=True).transformer)
    assert loaded.keys() == merged.keys()
    errors = {r["name"]: float(r["relative_error"]) for r in rows}
    for key in merged:
        layer = key.removesuffix(".weight")
        if layer in errors:
            change = (merged[key].double() - original[key].double()).norm()
            measured = ((loaded[key].double() - merged[key].double()).norm() / change).item()
            rounding = torch.finfo(torch.float32).eps * merged[key].double().norm().item() / change.item()
            assert abs(measured - errors[layer]) <= 1e-3 * errors[layer] + rounding, key
        else:  # a bias, a norm, a depthwise conv: the teacher's
            assert torch.equal(loaded[key], original[key]), key
    assert {int(r["rank"]) for r in rows} <= {1, 2} and 0 < report["total_relative_error"] < 1
    # a full fine-tune also trains biases, which no LoRA holds: listed in the report
    assert (adapter == "full") == any(k.endswith(".bias") for k in report["changes_not_in_lora"])
    assert (family == "sana") == ("depth" in json.dumps(report["changes_not_in_lora"]))


@torch.no_grad()
def one_step_call(family: str, pipe, teacher, noise: torch.Tensor) -> torch.Tensor:
    """The pipeline's one-step latents from ``noise`` (B, C, H, W): SD3 without CFG; FLUX packed, at the
    teacher's guidance input, unpacked again."""
    call = dict(prompt=PROMPTS, num_inference_steps=1, output_type="latent")
    if family == "sd3":
        return pipe(latents=noise.clone(), guidance_scale=0.0, **call).images
    pixels = teacher.sample_size * pipe.vae_scale_factor
    out = pipe(latents=pipe._pack_latents(noise.clone(), *noise.shape), guidance_scale=teacher.guidance,
               height=pixels, width=pixels, **call).images
    return pipe._unpack_latents(out, pixels, pixels, pipe.vae_scale_factor)


@pytest.mark.parametrize("run", ["sd3-lorad", "sd3-full", "flux-lorad", "flux-full"], indirect=True)
def test_at_full_rank_the_teacher_pipeline_with_the_lora_runs_the_exports_one_step(run, tmp_path):
    """``export --lora-rank`` (CLI, its summary line), then ``load_lora_weights`` on the plain teacher pipeline
    (unfused peft layers) and one step: the export's own one-step pipeline's latents (adapter runs); a full
    fine-tune's biases are not in the LoRA, which the report's one-step difference shows. (SANA, whose
    DPM-Solver is no one-step Euler from sigma_max: ``test_the_sana_pipeline_with_the_lora_runs_sample``.)"""
    from diffusers import DiffusionPipeline

    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise

    family, adapter, run_dir, teacher = run
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--lora-rank", str(FULL_RANK)])
    assert result.exit_code == 0, result.output
    assert "total relative error" in result.output and "no kohya" in result.output
    report = lora_export.read_report(out / "lora")
    assert report["total_relative_error"] < 1e-6 and report["max_layer_relative_error"] < 1e-5
    if adapter == "full":
        assert report["one_step"]["latents_relative_max_difference"] > 1e-4
        return
    assert report["one_step"]["latents_relative_max_difference"] < 1e-5
    bundle = load_export(out).teacher
    noise = initial_noise(bundle, len(PROMPTS), seed=0)
    expected = one_step_call(family, DiffusionPipeline.from_pretrained(out, use_safetensors=True), bundle, noise)
    pipe = with_lora(family, teacher, out / "lora", fuse=False)
    pipe.scheduler.set_timesteps(1, **({"mu": 0.0} if pipe.scheduler.config.use_dynamic_shifting else {}))
    assert pipe.scheduler.sigmas.tolist() == [1.0, 0.0]  # the teacher's own scheduler: one step from sigma_max
    loaded = one_step_call(family, pipe, bundle, noise)
    assert relative_difference(loaded, expected) < 1e-5
    plain = one_step_call(family, teacher_pipeline(family, teacher), bundle, noise)
    assert relative_difference(plain, expected) > 1e-3  # the LoRA is what moves the teacher there


@pytest.mark.parametrize("run", ["sd3-lorad", "flux-lorad", "flux-full", "sana-lorad"], indirect=True)
def test_the_reported_one_step_difference_is_what_diffusers_gives(run, tmp_path):
    """At rank 1 the report's latents difference, recomputed with the transformer diffusers' loader gives (the
    LoRA fused into the teacher) against the merged generator, on the report's prompts and seed (SANA: with the
    teacher's depthwise convs, which the LoRA does not change)."""
    from wadi_distill.runs import load_export
    from wadi_distill.sampling import initial_noise, one_step_sample

    family, _, _, teacher = run
    folder, report, _ = export(run, tmp_path / "export", rank=1)
    model = load_export(tmp_path / "export")
    prompts = report["one_step"]["prompts"]
    noise = initial_noise(model.teacher, len(prompts), report["one_step"]["seed"])
    conditioning = model.teacher.encode(prompts)
    transformer = with_lora(family, teacher, folder, fuse=True).transformer.eval()
    with torch.no_grad():
        merged = one_step_sample(model.teacher, model.generator.eval(), noise, conditioning, model.vsd)
        loaded = one_step_sample(model.teacher, transformer, noise, conditioning, model.vsd)
    difference = (loaded - merged).abs()
    assert difference.max().item() == pytest.approx(report["one_step"]["latents_max_abs_difference"], rel=1e-3)
    assert difference.mean().item() == pytest.approx(report["one_step"]["latents_mean_abs_difference"], rel=1e-3)
    assert difference.max().item() > 0


def test_a_grouped_conv_change_is_reported_not_exported():
    """A depthwise conv (SANA's GLUMBConv ``conv_depth``) has no LoRA layout: its change is listed among the
    changes not in the LoRA; the 1x1 conv beside it gets its LoRA."""
    torch.manual_seed(0)
    teacher_model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    merged = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    teacher = lora_export.teacher_weights(teacher_model)
    layers = lora_export.build(teacher, merged, LoRASettings(rank=FULL_RANK))
    assert [layer.name for layer in layers] == ["0"] and layers[0].relative_error < 1e-6
    assert "1.weight" in lora_export.other_changes(teacher_model, merged, teacher)
    assert lora_export.other_changes(merged, merged, lora_export.teacher_weights(teacher_model)) == ["1.weight"]


@pytest.fixture(scope="module")
def sana_preset_run(tmp_path_factory):
    """(run folder, teacher folder): a 2-step LoRaD run on the ``sana-`` presets (attention Linears and the 1x1
    GLUMBConv convs; the depthwise conv left out, so a LoRA can hold the whole change)."""
    root = tmp_path_factory.mktemp("sana-presets")
    teacher = tiny_sana_pipeline(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = load_config(teacher=str(teacher), prompts=str(root / "prompts.txt"), out=str(root / "run"), steps=2,
                         batch_size=2, generator_rank=2, fake_rank=2, cache_dir=str(root / "cache"),
                         generator_lr=1e-2, validate_every=100, generator_preset="sana-generator",
                         fake_preset="sana-fake")
    train(config, progress=False)
    return Path(config.out), teacher


def sana_sample_pngs(source: Path, out: Path, *args: str):
    """``wadi-distill sample SOURCE`` on PROMPTS, one image each (seed 0), as integer pixels (B, H, W, 3)."""
    import numpy as np
    from PIL import Image

    result = CliRunner().invoke(app, ["sample", str(source), *sum((["-p", p] for p in PROMPTS), []), "--n", "1",
                                      "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("[0-9]*.png"))]).astype(int)


def test_the_sana_pipeline_with_the_lora_runs_sample(sana_preset_run, tmp_path):
    """Plain diffusers on the SANA teacher: ``SanaPipeline.from_pretrained(teacher)``, ``load_lora_weights`` of the
    full-rank LoRA (unfused peft layers), its DPM-Solver replaced by the ``FlowMatchEulerDiscreteScheduler`` of the
    same sigmas (``shift = flow_shift``, as the project's SANA export does), one step from sigma_max: the run's
    one-step latents (relative 1e-5) and ``sample`` of the run to one grey level, unguided and at
    ``guidance_scale=2.5`` (``sample --guidance 2.5``)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from wadi_distill.runs import load_one_step
    from wadi_distill.sampling import initial_noise, one_step_sample

    run_dir, teacher = sana_preset_run
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--lora-rank", str(FULL_RANK)])
    assert result.exit_code == 0, result.output
    report = lora_export.read_report(out / "lora")
    assert report["total_relative_error"] < 1e-6 and report["changes_not_in_lora"] == []
    pipe = with_lora("sana", teacher, out / "lora", fuse=False)
    shift = pipe.scheduler.config.flow_shift
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.sigmas.tolist() == [1.0, 0.0]  # one step from sigma_max
    model = load_one_step(run_dir)
    noise = initial_noise(model.teacher, len(PROMPTS), seed=0)
    pixels = model.teacher.sample_size * pipe.vae_scale_factor

    @torch.no_grad()
    def one_step(sana, guidance: float, output_type: str):
        return sana(PROMPTS, latents=noise.clone(), num_inference_steps=1, guidance_scale=guidance, height=pixels,
                    width=pixels, output_type=output_type).images

    with torch.no_grad():
        ours = one_step_sample(model.teacher, model.generator.eval(), noise, model.teacher.encode(PROMPTS), model.vsd)
    plain = teacher_pipeline("sana", teacher)
    plain.scheduler = pipe.scheduler
    assert relative_difference(one_step(pipe, 0.0, "latent"), ours) < 1e-5
    assert relative_difference(one_step(plain, 0.0, "latent"), ours) > 1e-3  # the LoRA moves the teacher there
    pngs = {g: sana_sample_pngs(run_dir, tmp_path / f"sample-{g}", *(["--guidance", str(g)] if g else []))
            for g in (0.0, 2.5)}
    for guidance, sampled in pngs.items():
        images = (one_step(pipe, guidance, "np") * 255).round().astype(int)
        assert np.abs(images - sampled).max() <= 1 and sampled.std() > 5, guidance
    assert np.abs(pngs[2.5] - pngs[0.0]).max() > 1  # the guided call is another image
