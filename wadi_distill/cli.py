"""``wadi-distill``: thin typer commands over the library (distillation itself lands with issue 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from wadi_analysis.cli import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRaD adapters and one-step VSD distillation (WaDi, CVPR 2026).")
console = Console(soft_wrap=True)  # one result per line, never re-wrapped


@app.command("adapter-info")
def adapter_info(adapter: Annotated[Path, typer.Argument(help="A LoRaD adapter .safetensors file.")]) -> None:
    """Show an adapter file's metadata: name, ranks, targets, pairing, base dtype and fingerprint."""
    from .lorad import AdapterFileError, read_adapter

    try:
        tensors, metadata = read_adapter(adapter)
    except AdapterFileError as exc:
        fail(str(exc))
    ranks = json.loads(metadata["ranks"])
    console.print(f"adapter {metadata['adapter_name']!r}: {len(ranks)} modules, ranks {sorted(set(ranks.values()))}, "
                  f"{sum(t.numel() for t in tensors.values()):,} parameters", markup=False)
    for key in ("pairing", "base_dtype", "base_fingerprint"):
        console.print(f"{key}: {metadata[key]}", markup=False)


@app.command()
def merge(
    base: Annotated[Path, typer.Argument(help="diffusers model or pipeline folder the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="LoRaD adapter .safetensors file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged diffusers model.")],
    component: Annotated[Optional[str], typer.Option(help="Pipeline component (default unet or transformer).")] = None,
    ignore_fingerprint: Annotated[bool, typer.Option(help="Merge even if the base weights differ from training.")] = False,
) -> None:
    """Bake a LoRaD adapter into its base model and save a plain diffusers model folder."""
    from wadi_analysis.checkpoint import CheckpointError

    from .teacher import load_denoiser
    from .lorad import AdapterFileError, load_adapter, merge_and_unload

    if out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty")
    try:
        model = load_denoiser(base, component)
        name = load_adapter(model, adapter, strict_base=not ignore_fingerprint)
    except (CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    merge_and_unload(model, name).save_pretrained(out)
    console.print(f"merged adapter {name!r} into {out}", markup=False)


@app.command()
def run(
    teacher: Annotated[Optional[str], typer.Option(
        help="diffusers pipeline folder of the teacher, or an original single-file SD checkpoint.")] = None,
    teacher_config: Annotated[Optional[str], typer.Option(
        help="Single-file teacher: local diffusers pipeline folder with its configs, tokenizer and scheduler.")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file: .txt (one a line), .jsonl or .csv.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    adapter: Annotated[Optional[str], typer.Option(help="lorad | lora | dora")] = None,
    plan: Annotated[Optional[str], typer.Option(help="Generator placement plan JSON (wadi-analyze plan).")] = None,
    generator_rank: Annotated[Optional[int], typer.Option(min=1)] = None,
    fake_rank: Annotated[Optional[int], typer.Option(min=1)] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file with any of these options (and a [vsd] table).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint folder.")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(help="no | fp16 | bf16")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Distil a teacher into a one-step generator with WaDi (VSD + LoRaD on one shared frozen base).
    Without --teacher: the embedded teacher, its prompts and its defaults (see `wadi-distill embedded`)."""
    from wadi_analysis.checkpoint import CheckpointError

    from .config import load_config
    from .lorad import AdapterFileError
    from .training.loop import TrainingError, train

    try:
        resolved = load_config(config, teacher=teacher, teacher_config=teacher_config, prompts=prompts, out=out,
                               steps=steps, batch_size=batch_size,
                               adapter=adapter, plan=plan, generator_rank=generator_rank, fake_rank=fake_rank,
                               seed=seed, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing)
        if not resolved.prompts:
            fail("a teacher other than the embedded one needs --prompts FILE (or prompts in --config)")
        summary = train(resolved, resume=resume, progress=not quiet)
    except (ValueError, TrainingError, CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or resolved.out}: {exc.strerror or exc}")
    console.print(f"{summary['steps']} steps, trainable {summary['trainable']}, skipped {summary['skipped']}; "
                  f"run in {summary['run_dir']}", markup=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged one-step model.")],
    ema: Annotated[bool, typer.Option("--ema", help="Export the EMA of the generator adapter (runs with ema_decay).")] = False,
) -> None:
    """Write the merged one-step denoiser (diffusers folder + single .safetensors) and the adapter file."""
    from wadi_analysis.checkpoint import CheckpointError

    from .export import export_run
    from .lorad import AdapterFileError

    if not (run_dir / "config.json").is_file():
        fail(f"{run_dir} is not a run folder (config.json missing)")
    try:
        paths = export_run(run_dir, out, ema=ema)
    except (ValueError, CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    for label, path in paths.items():
        console.print(f"{label}: {path}", markup=False)


@app.command("sample")
def sample_command(
    source: Annotated[Path, typer.Argument(help="A run folder or an exported one-step model folder.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files and grid.png.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """One-step images (PNG files + grid) from a run or an exported model."""
    from wadi_analysis.checkpoint import CheckpointError

    from .lorad import AdapterFileError
    from .sample import sample

    try:
        paths = sample(source, prompt, n, out, seed=seed)
    except (ValueError, CheckpointError, AdapterFileError) as exc:
        fail(str(exc))
    console.print(f"wrote {len(paths) - 1} images and {paths[-1]}", markup=False)




@app.command()
def teacher(
    out: Annotated[Path, typer.Option("--out", "-o", help="Pipeline folder to write (replaced atomically).")],
    steps: Annotated[int, typer.Option(help="Training steps.")] = 12000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine to 0).")] = 1e-3,
    image_size: Annotated[int, typer.Option(help="Images are resized to this many pixels a side.")] = 16,
    channels: Annotated[str, typer.Option(help="U-Net block widths, comma-separated.")] = "32,64,96",
    layers_per_block: Annotated[int, typer.Option(help="U-Net ResNet layers per block.")] = 1,
    text_hidden: Annotated[int, typer.Option(help="Text encoder width (= cross-attention width).")] = 32,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the saved weights.")] = 0.999,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of every random draw.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    save_every: Annotated[int, typer.Option(help="Also save the EMA pipeline every N steps (0: at the end).")] = 0,
    stop_after: Annotated[int, typer.Option(help="End after N steps, keeping the LR schedule of --steps.")] = 0,
    init: Annotated[Optional[Path], typer.Option(
        help="Continue from this teacher folder's weights (a second training phase; its provenance is kept).")] = None,
) -> None:
    """Train a small SD-family text-to-image teacher on Fashion-MNIST (CLIP BPE tokens, ε-prediction,
    SD's scaled-linear schedule) and save it as a StableDiffusionPipeline folder."""
    from .embedded.teacher_training import TeacherConfig, train_teacher

    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError:
        fail(f"--channels must be comma-separated integers, got {channels!r}")
    if device == "cuda" and not __import__("torch").cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    config = TeacherConfig(steps=steps, batch_size=batch_size, lr=lr, image_size=image_size, channels=widths,
                           layers_per_block=layers_per_block, text_hidden=text_hidden, ema_decay=ema_decay,
                           seed=seed, device=device, save_every=save_every, stop_after=stop_after,
                           init=str(init) if init else "")
    try:
        train_teacher(config, out, log=lambda line: console.print(line, markup=False))
    except (ValueError, OSError) as exc:  # OSError: missing or unreadable data, --init folder, output
        fail(str(exc))
    console.print(f"teacher written to {out}", markup=False)


@app.command()
def embedded(
    path: Annotated[Optional[str], typer.Option(help="Print only this path: teacher | classifier | prompts.")] = None,
) -> None:
    """Where the embedded teacher, its evaluation classifier and its prompts are, and how they were made."""
    from . import embedded as bundle

    paths = {"teacher": bundle.teacher_path(), "classifier": bundle.classifier_path(), "prompts": bundle.prompts_path()}
    if path is not None:
        if path not in paths:
            fail(f"--path must be teacher, classifier or prompts (got {path!r})")
        typer.echo(paths[path])
        return
    provenance = json.loads((bundle.teacher_path() / "wadi_teacher.json").read_text())
    for name, where in paths.items():
        console.print(f"{name}: {where}", markup=False)
    console.print(f"teacher made by: {provenance['command']} (seed {provenance['config']['seed']}, "
                  f"{provenance['device']})", markup=False)


@app.command()
def classifier(
    out: Annotated[Path, typer.Option("--out", "-o", help="Classifier .safetensors file to write.")],
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the evaluation classifier (its features carry FD/KID/precision/recall) on Fashion-MNIST."""
    from wadi_analysis.atomic import atomic_write

    from .evaluation.classifier import save_classifier, train_classifier

    try:
        model, accuracy = train_classifier(epochs=epochs, seed=seed, log=lambda line: None)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    info = {"test_accuracy": accuracy, "command": f"wadi-distill classifier --epochs {epochs} --seed {seed}",
            "dataset": "fashion-mnist", "image_size": model.image_size}
    atomic_write(out, lambda path: save_classifier(model, path, info))
    console.print(f"test accuracy {accuracy:.4f}; classifier written to {out}", markup=False)


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
) -> None:
    """Sample a fixed prompt set with a fixed seed and score it. Default: FD, KID, precision/recall and
    prompt accuracy in the evaluation classifier's feature space, each beside its real-vs-real value.
    With --prompts and --reference-stats/--inception and/or --clip: FID and CLIP score (torchmetrics)."""
    from wadi_analysis.atomic import atomic_write_text
    from wadi_analysis.checkpoint import CheckpointError

    from . import embedded
    from .evaluation.benchmark import evaluate as run_evaluation, generate_batches, summary_line

    source = source or embedded.teacher_path()
    if not source.exists():
        fail(f"{source} does not exist")
    sd_protocol = prompts is not None or reference_stats is not None or inception is not None or clip is not None
    try:
        if sd_protocol:
            from .training.prompts import read_prompts
            from .evaluation.sd_protocol import evaluate_sd

            if prompts is None or (reference_stats is None) != (inception is None):
                fail("the SD protocol needs --prompts, and --reference-stats with --inception (FID) and/or --clip")
            texts = read_prompts(prompts)
            batches = generate_batches(source, texts, seed, steps, guidance, batch, decoded=True)
            result = {"source": str(source), "seed": seed, "prompts": str(prompts),
                      **evaluate_sd(batches, reference=reference_stats, inception=inception, clip=clip)}
            line = " · ".join(f"{k} {v:.4f}" for k, v in result.items() if k in ("fid", "clip_score"))
        else:
            result = run_evaluation(source, classifier_file, per_class=per_class, seed=seed, steps=steps,
                                    guidance_scale=guidance)
            line = summary_line(result)
    except (FileNotFoundError, ValueError, CheckpointError, ImportError) as exc:
        fail(str(exc))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
    console.print(f"{source} ({result.get('sampler', 'SD protocol')}, {result['samples']} samples): {line}",
                  markup=False)


@app.command("reference-stats")
def reference_stats_command(
    images: Annotated[Path, typer.Argument(help="Folder of reference images (e.g. COCO-2014 val).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Statistics file (.npz) to write.")],
    inception: Annotated[Path, typer.Option(help="Local Inception weights (torch-fidelity's .pth).")],
    size: Annotated[int, typer.Option(help="Centre-crop, then resize to this many pixels (bicubic).")] = 512,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images (sorted by name).")] = None,
) -> None:
    """FID reference statistics (mean, covariance, count of Inception features) of an image folder."""
    from .evaluation.sd_protocol import image_folder_batches, reference_statistics

    if not images.is_dir():
        fail(f"{images} is not a folder")
    try:
        info = reference_statistics(image_folder_batches(images, size, limit=limit), out, inception=inception)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        fail(str(exc))
    console.print(f"{info['count']} images, {info['features']} features: {out}", markup=False)


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for CSVs, figures, report.html/pdf.")] = Path(
        "reports/reproduction"),
    quick: Annotated[bool, typer.Option(help="A minutes-long smoke version (few steps and samples, one seed).")] = False,
) -> None:
    """The paper's experiments on the embedded teacher: teacher steps, students at equal budget
    (LoRaD published/plan, LoRA, DoRA, full), weight analysis, swaps, rank and Conv2d ablations."""
    from .experiments.reproduce import QUICK, Settings, reproduce as run_experiments

    try:
        run_experiments(out, QUICK if quick else Settings(), log=lambda line: console.print(line, markup=False))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
