"""``wadi-distill``: thin typer commands over the library — parse, one library call, print.

Errors are the shared boundary's (:mod:`wadi_analysis.cli_boundary`): bad input ends in one
``error: ...`` line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from wadi_analysis.cli_boundary import App, main as run_app
from wadi_analysis.errors import UserError

from .config import ADAPTERS, EMBEDDED_DEFAULTS, PRECISIONS, RunConfig
from .embedded.teacher_training import TeacherConfig
from .embedded.flow_teacher_training import FlowTeacherConfig
from .embedded.controlnet_training import ControlNetConfig
from .embedded.vae_training import VAEConfig
from .published import PUBLISHED_ALPHA_T

# ValueError: validation of options and files; ImportError: an optional extra (peft, torchmetrics) missing
app = App(expected=(ValueError, ImportError), help="LoRaD adapters and one-step VSD distillation (WaDi, CVPR 2026).")
console = Console(soft_wrap=True)  # one result per line, never re-wrapped
TEACHER = TeacherConfig()  # the defaults `wadi-distill teacher` shows: TeacherConfig owns them
FLOW_TEACHER = FlowTeacherConfig()  # and those of `wadi-distill flow-teacher`
VAE = VAEConfig()  # and those of `wadi-distill vae`
CONTROLNET = ControlNetConfig()  # and those of `wadi-distill controlnet`
RUN = RunConfig()  # the defaults of `wadi-distill run` with --teacher; without it EMBEDDED_DEFAULTS apply


def defaults(name: str) -> str:
    """The defaults of a `run` option in words: RunConfig's, and the embedded teacher's where they differ."""
    value = getattr(RUN, name)
    shown = "the preset's rank" if value is None else value
    if name not in EMBEDDED_DEFAULTS:
        return f"default {shown}"
    return f"default {shown}; without --teacher {EMBEDDED_DEFAULTS[name]}"


def say(line: str) -> None:
    console.print(line, markup=False)


@app.command("adapter-info")
def adapter_info(adapter: Annotated[Path, typer.Argument(help="An adapter .safetensors file (LoRaD, LoRA, DoRA).")]) -> None:
    """Show an adapter file's metadata: name, method, ranks, targets, base fingerprint (LoRaD: pairing, base dtype)."""
    from .adapters import describe_adapter

    info = describe_adapter(adapter)
    say(f"adapter {info['name']!r} ({info['method']}): {info['modules']} modules, ranks {info['ranks']}, "
        f"{info['parameters']:,} parameters")
    for key, value in info["details"].items():
        say(f"{key}: {value}")


@app.command()
def merge(
    base: Annotated[Path, typer.Argument(help="diffusers model or pipeline folder the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="Adapter .safetensors file (LoRaD, LoRA, DoRA).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged diffusers model.")],
    component: Annotated[Optional[str], typer.Option(help="Pipeline component (default unet or transformer).")] = None,
    ignore_fingerprint: Annotated[bool, typer.Option(help="Merge even if the base weights differ from training.")] = False,
) -> None:
    """Bake an adapter into its base model and save a plain diffusers model folder."""
    from .adapters import merge_file

    name = merge_file(base, adapter, out, component=component, strict_base=not ignore_fingerprint)
    say(f"merged adapter {name!r} into {out}")


@app.command()
def run(
    teacher: Annotated[Optional[str], typer.Option(
        help="diffusers pipeline folder of the teacher, or an original single-file SD checkpoint.")] = None,
    teacher_config: Annotated[Optional[str], typer.Option(
        help="Single-file teacher: local diffusers pipeline folder with its configs, tokenizer and scheduler.")] = None,
    flux_guidance: Annotated[Optional[float], typer.Option(help=(
        "Guidance input of a guidance-distilled FLUX teacher (default: its pipeline's, 3.5; TOML flux_guidance)."))] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file: .txt (one a line), .jsonl or .csv.")] = None,
    prompt_field: Annotated[Optional[str], typer.Option("--prompt-field", "--prompt-column", help=(
        ".jsonl: dotted path to each object's prompt (JourneyDB: Task2.Caption); .csv: the column "
        f"(default {RUN.prompt_column}; TOML prompt_column)."))] = None,
    dedupe_prompts: Annotated[Optional[bool], typer.Option(
        "--dedupe-prompts/--no-dedupe-prompts", help="Drop repeated prompts, keeping the first.")] = None,
    shuffle_prompts: Annotated[Optional[int], typer.Option(
        metavar="SEED", help="Shuffle the prompts with this seed (recorded in RUN/prompts.json).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help=f"Training steps ({defaults('steps')}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, help=f"Prompts per generator step ({defaults('batch_size')}).")] = None,
    adapter: Annotated[Optional[str], typer.Option(
        help=f"{' | '.join(ADAPTERS)} (default {RUN.adapter}; full: a fine-tuned copy of the denoiser).")] = None,
    plan: Annotated[Optional[str], typer.Option(help="Generator placement plan JSON (wadi-analyze plan).")] = None,
    generator_rank: Annotated[Optional[int], typer.Option(
        min=1, help=f"Generator adapter rank ({defaults('generator_rank')}).")] = None,
    fake_rank: Annotated[Optional[int], typer.Option(
        min=1, help=f"Fake-score adapter rank ({defaults('fake_rank')}).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help=f"Seed of the adapters and every draw ({defaults('seed')}).")] = None,
    config: Annotated[Optional[Path], typer.Option(help=escape(
        "TOML file with any of these options and the rest of the run configuration (a [vsd] table holds the "
        "VSD options); the command line wins."))] = None,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint folder.")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(
        help=f"{' | '.join(PRECISIONS)} (default {RUN.mixed_precision}).")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Distil a teacher into a one-step generator with WaDi (VSD + LoRaD on one shared frozen base).
    Without --teacher: the embedded teacher, its prompts and its defaults (see `wadi-distill embedded`)."""
    from .config import load_config
    from .training.loop import train

    resolved = load_config(config, teacher=teacher, teacher_config=teacher_config, flux_guidance=flux_guidance,
                           prompts=prompts,
                           prompt_column=prompt_field, prompt_dedupe=dedupe_prompts,
                           prompt_shuffle_seed=shuffle_prompts, out=out,
                           steps=steps, batch_size=batch_size, adapter=adapter, plan=plan,
                           generator_rank=generator_rank, fake_rank=fake_rank, seed=seed,
                           mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing)
    summary = train(resolved, resume=resume, progress=not quiet)
    say(f"{summary['steps']} steps, trainable {summary['trainable']}, skipped {summary['skipped']}; "
        f"run in {summary['run_dir']}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the one-step pipeline (self-contained: it may be moved).")],
    ema: Annotated[bool, typer.Option("--ema", help="Export the EMA of the generator adapter (runs with ema_decay).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder that is not an earlier export.")] = False,
    lora_rank: Annotated[Optional[int], typer.Option(help=(
        "Also write OUT/lora/: the merged change of every changed layer as a truncated-SVD LoRA of at most this "
        "rank per layer (diffusers/peft file; kohya file for U-Nets), with its error."))] = None,
    lora_energy: Annotated[Optional[float], typer.Option(help=(
        "Also write OUT/lora/, each layer at the smallest rank keeping this share (0, 1] of its change's squared "
        "singular values; with --lora-rank, capped at that rank."))] = None,
) -> None:
    """Write a complete one-step diffusers pipeline (AutoPipelineForText2Image loads it; call it with
    num_inference_steps=1, guidance_scale=0.0), also a model folder of the merged denoiser, plus
    one_step.safetensors and the adapter file; with --lora-rank/--lora-energy also LoRA files of the change."""
    from .export import export_run
    from .lora_export import LoRASettings, read_report, summary_line

    lora = LoRASettings(lora_rank, lora_energy) if lora_rank is not None or lora_energy is not None else None
    paths = export_run(run_dir, out, ema=ema, overwrite=overwrite, lora=lora)
    for label, path in paths.items():
        say(f"{label}: {path}")
    if "lora" in paths:
        say(summary_line(read_report(paths["lora"])))


@app.command("import-published")
def import_published_command(
    file: Annotated[Path, typer.Argument(help=(
        "A released merged file (rotated_unet-sdv1-5.safetensors, rotated_unet-sdv2-1.safetensors, "
        "rotated_transformer.safetensors): diffusers keys of the whole U-Net or transformer."))],
    teacher: Annotated[Path, typer.Option(help="The teacher's diffusers pipeline folder (SD 1.5, SD 2.1, PixArt-α).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the one-step pipeline (what export writes).")],
    alpha_t: Annotated[float, typer.Option("--alpha-t", help=(
        "a_T of the one step; the published inference uses 0.0047 for every teacher."))] = PUBLISHED_ALPHA_T,
    component: Annotated[Optional[str], typer.Option(help="unet | transformer: the denoiser the file replaces "
                                                          "(default: the teacher pipeline's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder that is not an export.")] = False,
) -> None:
    """Turn the published WaDi weights and their teacher into the complete one-step pipeline `export` writes
    (one conditional pass at t = 999 with a_T recorded); `sample` and `evaluate` read it."""
    from .published import import_published

    paths = import_published(file, teacher, out, alpha_T=alpha_t, component=component, overwrite=overwrite)
    for label, path in paths.items():
        say(f"{label}: {path}")


@app.command("sample")
def sample_command(
    source: Annotated[Path, typer.Argument(help="A run folder or an exported one-step model folder.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files and grid.png.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    guidance: Annotated[float, typer.Option(help=(
        "Classifier-free guidance as diffusers' guidance_scale: <= 1 (default) one conditional pass, how the "
        "one-step generator is trained; > 1 guidance against the empty prompt (two passes)."))] = 1.0,
    controlnet: Annotated[Optional[Path], typer.Option(help=(
        "A diffusers ControlNet folder trained on the teacher (the embedded one: `wadi-distill embedded --path "
        "controlnet`); steers the one-step student."))] = None,
    control_image: Annotated[Optional[list[Path]], typer.Option(help=(
        "Control image for --controlnet (an edge map for the embedded one): one for all prompts, or one per prompt."))] = None,
    control_scale: Annotated[float, typer.Option(help="ControlNet conditioning scale (diffusers' controlnet_conditioning_scale).")] = 1.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder that does not hold only this command's images.")] = False,
) -> None:
    """One-step images (PNG files + grid) from a run or an exported model, optionally steered by a ControlNet."""
    from .sampling import write_samples

    paths = write_samples(source, prompt, n, out, seed=seed, overwrite=overwrite, guidance=guidance,
                          controlnet=controlnet, control_images=control_image, control_scale=control_scale)
    say(f"wrote {len(paths) - 1} images and {paths[-1]}")


@app.command()
def teacher(
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Pipeline folder to write, renamed into place when complete; an existing non-empty folder only if this "
        "command wrote it (it holds wadi_teacher.json) or with --overwrite."))],
    steps: Annotated[int, typer.Option(help="Training steps.")] = TEACHER.steps,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = TEACHER.batch_size,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine to 0).")] = TEACHER.lr,
    image_size: Annotated[int, typer.Option(help="Images are resized to this many pixels a side.")] = TEACHER.image_size,
    channels: Annotated[str, typer.Option(help="U-Net block widths, comma-separated.")] = ",".join(
        map(str, TEACHER.channels)),
    layers_per_block: Annotated[int, typer.Option(help="U-Net ResNet layers per block.")] = TEACHER.layers_per_block,
    text_hidden: Annotated[int, typer.Option(help="Text encoder width (= cross-attention width).")] = TEACHER.text_hidden,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the saved weights.")] = TEACHER.ema_decay,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of every random draw.")] = TEACHER.seed,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = TEACHER.device,
    save_every: Annotated[int, typer.Option(help="Also save the EMA pipeline every N steps (0: at the end).")] = TEACHER.save_every,
    stop_after: Annotated[int, typer.Option(help="End after N steps, keeping the LR schedule of --steps.")] = TEACHER.stop_after,
    init: Annotated[Optional[Path], typer.Option(
        help="Continue from this teacher folder's weights (a second training phase; its provenance is kept).")] = None,
    vae: Annotated[Optional[Path], typer.Option(
        help="Train in this AutoencoderKL's latent space (`wadi-distill vae`); the pipeline ships it.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder this command did not write.")] = False,
) -> None:
    """Train a small SD-family text-to-image teacher on Fashion-MNIST (CLIP BPE tokens, ε-prediction,
    SD's scaled-linear schedule) and save it as a StableDiffusionPipeline folder."""
    options = {k: v for k, v in locals().items() if k not in ("out", "overwrite")}
    from .embedded.teacher_training import teacher_config, train_teacher

    train_teacher(teacher_config(**options), out, log=say, overwrite=overwrite)
    say(f"teacher written to {out}")


@app.command("flow-teacher")
def flow_teacher(
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Pipeline folder to write, renamed into place when complete; an existing non-empty folder only if this "
        "command wrote it (it holds wadi_flow_teacher.json) or with --overwrite."))],
    steps: Annotated[int, typer.Option(help="Training steps.")] = FLOW_TEACHER.steps,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = FLOW_TEACHER.batch_size,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine to 0).")] = FLOW_TEACHER.lr,
    width: Annotated[int, typer.Option(help="Transformer width (heads x head width).")] = FLOW_TEACHER.width,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = FLOW_TEACHER.heads,
    layers: Annotated[int, typer.Option(help="Joint transformer blocks.")] = FLOW_TEACHER.layers,
    patch_size: Annotated[int, typer.Option(help="Latent pixels a side per image token.")] = FLOW_TEACHER.patch_size,
    shift: Annotated[float, typer.Option(help="The scheduler's sigma shift, used in training too.")] = FLOW_TEACHER.shift,
    text_hidden: Annotated[int, typer.Option(help="Width of each CLIP text encoder.")] = FLOW_TEACHER.text_hidden,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the saved weights.")] = FLOW_TEACHER.ema_decay,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of every random draw.")] = FLOW_TEACHER.seed,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = FLOW_TEACHER.device,
    save_every: Annotated[int, typer.Option(help="Also save the EMA pipeline every N steps (0: at the end).")] = FLOW_TEACHER.save_every,
    stop_after: Annotated[int, typer.Option(help="End after N steps, keeping the LR schedule of --steps.")] = FLOW_TEACHER.stop_after,
    vae: Annotated[Optional[Path], typer.Option(
        help="Train in this AutoencoderKL's latent space (default: the embedded teacher's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder this command did not write.")] = False,
) -> None:
    """Train a small rectified-flow teacher of the SD3 family on Fashion-MNIST (an SD3 transformer in the
    embedded VAE's latents, two CLIP encoders and a T5 encoder, flow matching) and save it as a
    StableDiffusion3Pipeline folder."""
    options = {k: v for k, v in locals().items() if k not in ("out", "overwrite")}
    from .embedded.flow_teacher_training import flow_teacher_config, train_flow_teacher

    train_flow_teacher(flow_teacher_config(**options), out, log=say, overwrite=overwrite)
    say(f"flow teacher written to {out}")


@app.command()
def embedded(
    path: Annotated[Optional[str], typer.Option(help="Print only this path: teacher | classifier | prompts | controlnet.")] = None,
) -> None:
    """Where the embedded teacher, its evaluation classifier, its prompts and its ControlNet are, and how
    they were made."""
    from . import embedded as bundle

    paths = bundle.paths()
    if path is not None and path not in paths:
        raise UserError(f"--path must be one of {', '.join(paths)} (got {path!r})")
    if path is not None:
        typer.echo(paths[path])
        return
    for name, where in paths.items():
        say(f"{name}: {where}")
    say(f"teacher made by: {bundle.provenance()}")


@app.command()
def vae(
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "AutoencoderKL folder to write, renamed into place when complete; an existing non-empty folder only if "
        "this command wrote it (it holds wadi_vae.json) or with --overwrite."))],
    steps: Annotated[int, typer.Option(help="Training steps.")] = VAE.steps,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = VAE.batch_size,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine to 0).")] = VAE.lr,
    image_size: Annotated[int, typer.Option(help="Images are resized to this many pixels a side.")] = VAE.image_size,
    channels: Annotated[str, typer.Option(help="Block widths of the 3 levels, comma-separated.")] = ",".join(
        map(str, VAE.channels)),
    latent_channels: Annotated[int, typer.Option(help="Latent channels.")] = VAE.latent_channels,
    kl_weight: Annotated[float, typer.Option(help="Weight of the KL term (SD's 1e-6).")] = VAE.kl_weight,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of every random draw.")] = VAE.seed,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = VAE.device,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder this command did not write.")] = False,
) -> None:
    """Train the teacher's AutoencoderKL on Fashion-MNIST (SD's first stage at toy scale) and measure its
    scaling factor; `wadi-distill teacher --vae` then trains the U-Net in its latent space."""
    options = {k: v for k, v in locals().items() if k not in ("out", "overwrite")}
    from .embedded.vae_training import train_vae, vae_config

    train_vae(vae_config(**options), out, log=say, overwrite=overwrite)
    say(f"autoencoder written to {out}")


@app.command()
def controlnet(
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "ControlNet folder to write, renamed into place when complete; an existing non-empty folder only if "
        "this command wrote it (it holds wadi_controlnet.json) or with --overwrite."))],
    teacher: Annotated[Optional[Path], typer.Option(help="Teacher pipeline folder (default: the embedded teacher).")] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = CONTROLNET.steps,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = CONTROLNET.batch_size,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine to 0).")] = CONTROLNET.lr,
    images: Annotated[int, typer.Option(help="Training images per class (0: the whole training split).")] = CONTROLNET.images,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of every random draw.")] = CONTROLNET.seed,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = CONTROLNET.device,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder this command did not write.")] = False,
) -> None:
    """Train a ControlNet for the (embedded) teacher on edge maps of Fashion-MNIST (ControlNetModel.from_unet,
    the teacher frozen); `sample --controlnet` then steers a one-step student with it."""
    options = {k: v for k, v in locals().items() if k not in ("out", "overwrite")}
    from .embedded.controlnet_training import controlnet_config, train_controlnet

    train_controlnet(controlnet_config(**options), out, log=say, overwrite=overwrite)
    say(f"ControlNet written to {out}")


@app.command("control-report")
def control_report_command(
    student: Annotated[Path, typer.Argument(help="A run folder or an exported one-step model of the embedded teacher.")],
    controlnet: Annotated[Optional[Path], typer.Option(help="ControlNet folder (default: the embedded one).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for table.csv, table.md, samples.png, settings.json.")] = Path(
        "reports/controlnet"),
    per_class: Annotated[int, typer.Option(min=1, help="Control maps per class (10 classes).")] = 100,
    seed: Annotated[int, typer.Option()] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder this command did not write.")] = False,
) -> None:
    """Control fidelity (edge F1) and FD of the teacher at 25 steps and the student at one step, each with
    and without the ControlNet, beside the real images' ceiling and chance."""
    from . import embedded as bundle
    from .experiments.control import control_report

    rows = control_report(student, controlnet or bundle.controlnet_path(), out, per_class=per_class, seed=seed,
                          overwrite=overwrite, log=say)
    say(f"wrote {len(rows)} rows to {out}/table.csv")


@app.command()
def classifier(
    out: Annotated[Path, typer.Option("--out", "-o", help="Classifier .safetensors file to write.")],
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    image_size: Annotated[int, typer.Option(help="Images are resized to this many pixels a side.")] = 32,
) -> None:
    """Train the evaluation classifier (its features carry FD/KID/precision/recall) on Fashion-MNIST."""
    from .evaluation.classifier import make_classifier

    accuracy = make_classifier(out, epochs=epochs, seed=seed, image_size=image_size, log=lambda line: None)
    say(f"test accuracy {accuracy:.4f}; classifier written to {out}")


@app.command()
def evaluate(
    source: Annotated[Optional[Path], typer.Argument(
        help="Teacher pipeline folder, run folder or exported one-step model (default: the embedded teacher).")] = None,
    per_class: Annotated[int, typer.Option(min=4, help="Samples per class (10 classes).")] = 100,
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps for teachers (one-step models: 1).")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance for teachers.")] = 1.5,
    seed: Annotated[int, typer.Option()] = 0,
    classifier_file: Annotated[Optional[Path], typer.Option("--classifier", help="Evaluation classifier file.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="SD protocol: prompt file (e.g. 30k COCO-2014 captions).")] = None,
    reference_stats: Annotated[Optional[Path], typer.Option(help="SD protocol: FID reference statistics (.npz).")] = None,
    inception: Annotated[Optional[Path], typer.Option(help="SD protocol: local Inception weights (FID).")] = None,
    clip: Annotated[Optional[Path], typer.Option(help="SD protocol: local CLIP model folder (CLIP score).")] = None,
    batch: Annotated[int, typer.Option(min=1, help="SD protocol: samples per batch.")] = 16,
    kid_subset: Annotated[Optional[int], typer.Option(min=2, help=(
        "KID subset size, below the sample count (default: min(1000, samples // 2))."))] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Sample a fixed prompt set with a fixed seed and score it. Default: FD, KID, precision/recall and
    prompt accuracy in the evaluation classifier's feature space, each beside its real-vs-real value.
    With --prompts and --reference-stats/--inception and/or --clip: FID and CLIP score (torchmetrics)."""
    from .evaluation import evaluate_source

    _, line = evaluate_source(source, per_class=per_class, steps=steps, guidance=guidance, seed=seed,
                              classifier=classifier_file, prompts=prompts, reference_stats=reference_stats,
                              inception=inception, clip=clip, batch=batch, json_out=json_out,
                              kid_subset=kid_subset, progress=not quiet)
    say(line)


@app.command("reference-stats")
def reference_stats_command(
    images: Annotated[Path, typer.Argument(help="Folder of reference images (e.g. COCO-2014 val).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics file (.npz) to write.")],
    inception: Annotated[Path, typer.Option(help="Local Inception weights (torch-fidelity's .pth).")],
    size: Annotated[int, typer.Option(help="Centre-crop, then resize to this many pixels (bicubic).")] = 512,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images (sorted by name).")] = None,
) -> None:
    """FID reference statistics (mean, covariance, count of Inception features) of an image folder."""
    from .evaluation.sd_protocol import folder_reference_statistics

    info = folder_reference_statistics(images, out, inception, size=size, limit=limit)
    say(f"{info['count']} images, {info['features']} features: {out}")


@app.command()
def recipe(
    out: Annotated[Path, typer.Option("--out", "-o", help=(
        "Folder for table.csv, curves.csv, curves.png; candidates already in its table.csv are kept."))] = Path(
        "reports/recipe"),
    candidates: Annotated[Optional[str], typer.Option(help="Comma-separated candidate names (default: all).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    steps: Annotated[int, typer.Option(min=1, help="Iterations per run.")] = 1000,
    base: Annotated[Optional[str], typer.Option(help="A candidate whose options apply under every run.")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help=(
        "Another teacher of the embedded data and captions (e.g. `wadi-distill flow-teacher`'s; default: the "
        "embedded teacher); its family's LoRaD presets apply."))] = None,
) -> None:
    """The VSD recipe sweep on the embedded teacher (or --teacher): every candidate setting as a run with its
    curve, final FD / recall / prompt accuracy and issue 13's targets, beside the teacher's own."""
    from .experiments.recipe import sweep_from_options

    sweep_from_options(out, candidates, seeds, steps, base, log=say, teacher=teacher)
    say(f"sweep written to {out}")


@app.command()
def diagnose(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Finished run folders of the embedded teacher.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the rows to this CSV file.")] = None,
    per_class: Annotated[int, typer.Option(min=1, help="Samples per class (10 classes).")] = 20,
) -> None:
    """The denoising error by timestep of real latents, the teacher's single step and each run's one-step
    samples, under the teacher and the run's fake score: how far off the teacher's data the samples lie at
    each scale, and how much of that the fake score has learned."""
    from .experiments.diagnose import diagnose_runs

    table = diagnose_runs(runs or [], out, per_class=per_class)
    say(escape(table.to_string()))


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for CSVs, figures, report.html/pdf.")] = Path(
        "reports/reproduction"),
    quick: Annotated[bool, typer.Option(help="A minutes-long smoke version (few steps and samples, one seed).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --out folder that an earlier reproduction did not make.")] = False,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds per arm (0..N-1); default 5, or 1 with --quick.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training iterations per arm (the cap; default: `run`'s, 1000).")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Arms and seeds trained at once, in as many worker processes.")] = 1,
    device: Annotated[str, typer.Option(help="cpu (each worker a share of the cores) or cuda (all on the one GPU).")] = "cpu",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse the (arm, seed) results an earlier call into --out stored with the same settings (default), or retrain every one.")] = True,
) -> None:
    """The paper's experiments on the embedded teacher: teacher steps, students at equal budget
    (LoRaD published/plan, LoRA, DoRA, DoRA with frozen magnitude, full), weight analysis, swaps, rank and
    Conv2d ablations; each arm trained until its validation curve flattens (at most --steps); per-arm
    bootstrap 95 % intervals over seeds. Finished (arm, seed) results are stored in --out/results as they
    finish: an interrupted call resumes."""
    from dataclasses import replace

    from .experiments.reproduce import QUICK, Settings, reproduce as run_experiments

    settings = QUICK if quick else Settings()
    if seeds is not None:
        settings = replace(settings, seeds=tuple(range(seeds)))
    if steps is not None:
        settings = replace(settings, steps=steps, validate_every=min(settings.validate_every, steps))
    run_experiments(out, settings, log=say, overwrite=overwrite, jobs=jobs, device=device, resume=resume)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
