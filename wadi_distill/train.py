"""The training loop: alternating generator / fake-score steps on one shared frozen base.

Checkpoints (every ``checkpoint_every`` steps, atomic: written to a temporary folder, then renamed)
hold both adapters, both optimisers, the sampling RNG and the step, so ``resume`` continues exactly.
Metrics go to ``RUN_DIR/metrics.csv``; one-step validation grids (fixed prompts and seed) to
``RUN_DIR/samples/step-N.png``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import adapters, lorad
from .backbones import Teacher, load_teacher
from .config import RunConfig
from .data import cached_embeddings, read_prompts
from .distill import FAKE, GENERATOR, fake_step, generator_step, one_step

ROLES = (GENERATOR, FAKE)


class TrainingError(Exception):
    """A run that cannot go on; one line for the user."""


def attach_roles(teacher: Teacher, config: RunConfig) -> dict[str, int]:
    """Generator and fake-score adapters on the teacher's own denoiser; returns their parameter counts."""
    model = teacher.denoiser
    generator_targets = lorad.read_plan(config.plan) if config.plan else lorad.resolve_preset(
        model, config.generator_preset, config.generator_rank)
    fake_targets = lorad.resolve_preset(model, config.fake_preset, config.fake_rank)
    counts = {}
    for role, targets, seed in ((GENERATOR, generator_targets, config.seed), (FAKE, fake_targets, config.seed + 1)):
        if config.adapter != "lorad":
            targets = adapters.lora_ranks_at_equal_budget(model, targets)
        try:
            counts[role] = adapters.attach(model, config.adapter, targets, role, seed=seed)
        except ValueError as exc:
            raise TrainingError(f"{role} targets do not fit this teacher: {exc}") from None
    return counts


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, model, optimizers: dict, rng: torch.Generator, keep: int) -> Path:
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for role in ROLES:
        save_file({k: v.contiguous().cpu() for k, v in adapters.adapter_tensors(model, role).items()},
                  tmp / f"{role}.safetensors")
    torch.save({role: opt.state_dict() for role, opt in optimizers.items()}, tmp / "optimizers.pt")
    torch.save({"rng": rng.get_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    os.replace(tmp, final)
    for old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizers: dict, rng: torch.Generator) -> int:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for role in ROLES:
            for name, tensor in load_file(path / f"{role}.safetensors").items():
                if name not in named:
                    raise TrainingError(f"checkpoint {path} does not match this run's adapters ({name})")
                named[name].copy_(tensor)
    states = torch.load(path / "optimizers.pt", weights_only=True)
    for role, optimizer in optimizers.items():
        optimizer.load_state_dict(states[role])
    rng.set_state(torch.load(path / "rng.pt", weights_only=True)["rng"])
    return json.loads((path / "state.json").read_text())["step"]


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = _checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise TrainingError(f"{path} is not a checkpoint folder")
    return path


@torch.no_grad()
def save_validation_grid(teacher: Teacher, conditioning, config: RunConfig, path: Path) -> None:
    """One-step samples for the fixed validation prompts and seed, decoded by the VAE, as a PNG grid."""
    from PIL import Image

    generator = torch.Generator().manual_seed(config.validation_seed)
    shape = (len(conditioning), teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    latents = one_step(teacher, teacher.denoiser, torch.randn(shape, generator=generator), conditioning, config.vsd)
    vae = teacher.pipeline.vae
    images = vae.decode(latents / vae.config.scaling_factor).sample
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    height, width = images.shape[1:3]
    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((index % columns) * width, (index // columns) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def train(config: RunConfig, resume: str | None = None, progress: bool = False) -> dict:
    """Distil ``config.teacher`` into a one-step generator; returns a summary of the run."""
    run_dir = Path(config.out)
    if _checkpoints(run_dir) and not resume:
        raise TrainingError(f"{run_dir} already holds a run; continue it with --resume latest or choose another --out")
    prompts = read_prompts(config.prompts, config.prompt_column)  # cheap checks first
    teacher = load_teacher(config.teacher)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write(run_dir / "config.json")
    counts = attach_roles(teacher, config)
    model = teacher.denoiser
    everything, null, cache_hit = cached_embeddings(teacher, prompts, config.embedding_cache())
    validation = config.validation_prompts or prompts[:4]
    validation_conditioning = teacher.encode(validation)
    optimizers = {
        GENERATOR: torch.optim.AdamW(adapters.adapter_parameters(model, GENERATOR), lr=config.generator_lr,
                                     weight_decay=config.weight_decay),
        FAKE: torch.optim.AdamW(adapters.adapter_parameters(model, FAKE), lr=config.fake_lr,
                                weight_decay=config.weight_decay),
    }
    rng = torch.Generator().manual_seed(config.seed)
    step = 0
    checkpoint = resolve_resume(run_dir, resume)
    if checkpoint is not None:
        step = load_checkpoint(checkpoint, model, optimizers, rng)
    metrics_path = run_dir / "metrics.csv"
    _truncate_metrics(metrics_path, step)
    nonfinite_in_a_row = skipped = 0
    with open(metrics_path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if handle.tell() == 0:
            writer.writerow(["step", "generator_loss", "fake_loss", "seconds", "skipped"])
        while step < config.steps:
            started = time.perf_counter()
            batch = torch.randint(0, len(everything), (config.batch_size,), generator=rng)
            conditioning = everything.select(batch)
            loss, x0 = generator_step(teacher, model, conditioning, null, config.vsd, rng)
            optimizers[GENERATOR].zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                torch.nn.utils.clip_grad_norm_(adapters.adapter_parameters(model, GENERATOR), config.grad_clip)
                optimizers[GENERATOR].step()
                nonfinite_in_a_row = 0
            else:
                skipped += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row > config.max_nonfinite_in_a_row:
                    raise TrainingError(f"{nonfinite_in_a_row} non-finite generator losses in a row at step {step}; "
                                        "the last good checkpoint is kept")
            fake_losses = []
            for _ in range(config.fake_steps_per_generator_step):
                fake_loss = fake_step(teacher, model, x0, conditioning, null, config.vsd, rng)
                optimizers[FAKE].zero_grad(set_to_none=True)
                if torch.isfinite(fake_loss):
                    fake_loss.backward()
                    torch.nn.utils.clip_grad_norm_(adapters.adapter_parameters(model, FAKE), config.grad_clip)
                    optimizers[FAKE].step()
                fake_losses.append(fake_loss.item())
            step += 1
            writer.writerow([step, loss.item(), sum(fake_losses) / len(fake_losses),
                             round(time.perf_counter() - started, 4), skipped])
            handle.flush()
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(run_dir, step, model, optimizers, rng, config.keep_checkpoints)
            if step % config.validate_every == 0 or step == config.steps:
                save_validation_grid(teacher, validation_conditioning, config, run_dir / "samples" / f"step-{step:07d}.png")
    adapters.activate(model, GENERATOR)
    if config.adapter == "lorad":
        lorad.save_adapter(model, GENERATOR, run_dir / "generator_adapter.safetensors")
    return {"steps": step, "trainable": counts, "skipped": skipped, "cache_hit": cache_hit, "run_dir": str(run_dir)}


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows after the checkpoint's step (they will be recomputed)."""
    if not path.is_file():
        return
    rows = list(csv.reader(path.read_text().splitlines()))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step] if rows else []
    path.write_text("".join(",".join(r) + "\n" for r in kept))
