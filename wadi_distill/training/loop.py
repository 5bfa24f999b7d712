"""The training loop: alternating generator / fake-score steps on one shared frozen base.

Checkpoints (every ``checkpoint_every`` steps, atomic: written to a temporary folder, then renamed)
hold both adapters, both optimisers, the sampling RNG and the step, so ``resume`` continues exactly.
Metrics go to ``RUN_DIR/metrics.csv``; one-step validation grids (fixed prompts and seed) to
``RUN_DIR/samples/step-N.png``.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from wadi_analysis.errors import UserError

from .. import adapters, lorad
from . import sharding
from ..teacher import Teacher, load_teacher
from ..config import RunConfig
from .prompts import cached_embeddings, read_prompts
from ..distill import FAKE, GENERATOR, fake_step, generator_step, one_step
from .ema import AdapterEMA
from ..export import generator_path

ROLES = (GENERATOR, FAKE)


class TrainingError(UserError):
    """A run that cannot go on; one line for the user."""


@dataclass
class Roles:
    """The shared frozen base (teacher, and the fake score's adapter) and the generator: an adapter of
    the same base, or — full fine-tuning — its own copy of the denoiser."""

    base: nn.Module
    generator: nn.Module

    @property
    def separate_generator(self) -> bool:
        return self.generator is not self.base

    def parameters(self, role: str) -> list[nn.Parameter]:
        if role == GENERATOR and self.separate_generator:
            return list(self.generator.parameters())
        return adapters.adapter_parameters(self.base, role)

    def named_parameters(self, role: str) -> dict[str, nn.Parameter]:
        if role == GENERATOR and self.separate_generator:
            return dict(self.generator.named_parameters())
        ids = {id(p) for p in self.parameters(role)}
        return {n: p for n, p in self.base.named_parameters() if id(p) in ids}


def attach_roles(teacher: Teacher, config: RunConfig) -> tuple[Roles, dict[str, int]]:
    """Generator and fake-score adapters on the teacher's own denoiser (full fine-tuning: a generator
    copy, the fake score still a LoRaD adapter of the base); returns them and their parameter counts."""
    model = teacher.denoiser
    generator_targets = lorad.read_plan(config.plan) if config.plan else lorad.resolve_preset(
        model, config.generator_preset, config.generator_rank)
    fake_targets = lorad.resolve_preset(model, config.fake_preset, config.fake_rank)
    roles = Roles(model, model)
    counts = {}
    if config.adapter == "full":
        roles.generator = copy.deepcopy(model).requires_grad_(True)
        counts[GENERATOR] = sum(p.numel() for p in roles.generator.parameters())
    for role, targets, seed in ((GENERATOR, generator_targets, config.seed), (FAKE, fake_targets, config.seed + 1)):
        if role == GENERATOR and roles.separate_generator:
            continue
        method = "lorad" if config.adapter == "full" else config.adapter
        if method != "lorad":
            targets = adapters.lora_ranks_at_equal_budget(model, targets)
        try:
            counts[role] = adapters.attach(model, method, targets, role, seed=seed)
        except ValueError as exc:
            raise TrainingError(f"{role} targets do not fit this teacher: {exc}") from None
    return roles, counts


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, roles: Roles, optimizers: dict, rng: torch.Generator, keep: int,
                    accelerator=None, ema=None) -> Path:
    """Rank 0 writes adapters, optimisers and state; every rank its own RNG state. Atomic rename at the end."""
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    rank = accelerator.process_index if accelerator else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if accelerator:
        accelerator.wait_for_everyone()
    torch.save({"rng": rng.get_state()}, tmp / f"rng-{rank}.pt")
    if accelerator:
        accelerator.wait_for_everyone()
    if rank != 0:
        if accelerator:
            accelerator.wait_for_everyone()
        return final
    for role in ROLES:
        save_file({k: v.detach().contiguous().cpu() for k, v in roles.named_parameters(role).items()},
                  tmp / f"{role}.safetensors")
    if ema is not None:
        save_file(ema.state_dict(), tmp / "generator_ema.safetensors")
    torch.save({role: opt.state_dict() for role, opt in optimizers.items()}, tmp / "optimizers.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    os.replace(tmp, final)
    for old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if accelerator:
        accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, roles: Roles, optimizers: dict, rng: torch.Generator, rank: int = 0,
                    ema=None) -> int:
    with torch.no_grad():
        for role in ROLES:
            named = roles.named_parameters(role)
            for name, tensor in load_file(path / f"{role}.safetensors").items():
                if name not in named:
                    raise TrainingError(f"checkpoint {path} does not match this run's adapters ({name})")
                named[name].copy_(tensor)
    if ema is not None:
        if not (path / "generator_ema.safetensors").is_file():
            raise TrainingError(f"checkpoint {path} has no EMA weights but this run uses ema_decay")
        ema.load_state_dict(load_file(path / "generator_ema.safetensors"))
    states = torch.load(path / "optimizers.pt", weights_only=True)
    for role, optimizer in optimizers.items():
        optimizer.load_state_dict(states[role])
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise TrainingError(f"checkpoint {path} was written by fewer processes (no {rng_file.name})")
    rng.set_state(torch.load(rng_file, weights_only=True)["rng"])
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
def save_validation_grid(teacher: Teacher, generator_model, conditioning, config: RunConfig, path: Path | None) -> None:
    """One-step samples for the fixed validation prompts and seed, decoded by the VAE, as a PNG grid
    (``path`` None: computed, not written; FSDP's other processes, whose shards the forward needs)."""
    from ..sample import decode, image_grid

    generator = torch.Generator().manual_seed(config.validation_seed)
    shape = (len(conditioning), teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    latents = one_step(teacher, generator_model, torch.randn(shape, generator=generator), conditioning, config.vsd)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(decode(teacher, latents), min(4, len(conditioning))).save(path)


def _average_gradients(accelerator, parameters) -> None:
    """Data parallelism by hand: mean of the adapter gradients over processes (what DDP would do).
    The adapters alternate roles on one module, which DDP's single-backward bookkeeping cannot follow."""
    if accelerator.num_processes > 1:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def _digest(named_tensors) -> str:
    """A short hash of (name, tensor) pairs: per-process checks that adapters agree and the base is untouched."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        # a copy: numpy's view of FSDP's gathered storage would keep it from being freed
        digest.update(tensor.detach().to("cpu", copy=True).reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _base_digest(roles: Roles) -> str:
    adapter_ids = {id(p) for role in ROLES for p in roles.parameters(role)}
    return _digest((n, p) for n, p in roles.base.named_parameters() if id(p) not in adapter_ids)


def train(config: RunConfig, resume: str | None = None, progress: bool = False, on_validate=None) -> dict:
    """Distil ``config.teacher`` into a one-step generator; returns a summary of the run.

    ``on_validate(step, teacher, generator_model, vsd_config)``, if given, is called on the main process
    after each validation grid (every ``validate_every`` steps and at the end), e.g. to record metrics.

    Runs on one process or many (``accelerate launch``): every process draws its own noise and
    prompts, adapter gradients are averaged across processes, and rank 0 writes the outputs.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: a previous run in this interpreter may have fixed another precision; start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun train on the CPU (gloo).
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    fsdp = sharding.fsdp_plugin(accelerator)  # accelerate launch with an FSDP config: shard the frozen base
    if fsdp is not None and (reason := sharding.unsupported(fsdp, config, on_validate)):
        raise TrainingError(reason)
    run_dir = Path(config.out)
    if _checkpoints(run_dir) and not resume:
        raise TrainingError(f"{run_dir} already holds a run; continue it with --resume latest or choose another --out")
    prompts = read_prompts(config.prompts, config.prompt_column)  # cheap checks first
    teacher = load_teacher(config.teacher, config=config.teacher_config)
    roles, counts = attach_roles(teacher, config)  # before anything is written: bad targets leave no run folder
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.write(run_dir / "config.json")
    model = teacher.denoiser
    base_before = _base_digest(roles) if config.record_digests else None
    if fsdp is not None:
        sharding.shard(model, accelerator, fsdp, roles.parameters(GENERATOR) + roles.parameters(FAKE))  # and to the device
    else:
        model.to(accelerator.device)
    if roles.separate_generator:
        roles.generator.to(accelerator.device)
    if config.gradient_checkpointing:
        for network in {id(m): m for m in (model, roles.generator)}.values():
            network.enable_gradient_checkpointing()
            network.train()  # diffusers checkpoints activations only in training mode
    separate = roles.generator if roles.separate_generator else None
    everything, null, cache_hit = cached_embeddings(teacher, prompts, config.embedding_cache())
    validation = config.validation_prompts or prompts[:4]
    validation_conditioning = teacher.encode(validation)
    optimizer_class = _optimizer_class(config.optimizer)
    optimizers = {
        GENERATOR: optimizer_class(roles.parameters(GENERATOR), lr=config.generator_lr, weight_decay=config.weight_decay),
        FAKE: optimizer_class(roles.parameters(FAKE), lr=config.fake_lr, weight_decay=config.weight_decay),
    }
    board = _tensorboard(run_dir) if main else None
    rng = torch.Generator().manual_seed(config.seed + 1000 * accelerator.process_index)
    ema = None
    if config.ema_decay is not None:
        ema = AdapterEMA(roles.named_parameters(GENERATOR), config.ema_decay)
    step = 0
    checkpoint = resolve_resume(run_dir, resume)
    if checkpoint is not None:
        step = load_checkpoint(checkpoint, roles, optimizers, rng, accelerator.process_index, ema)
    everything, null = everything.to(accelerator.device), null.to(accelerator.device)
    metrics_path = run_dir / "metrics.csv"
    if main:
        _truncate_metrics(metrics_path, step)
    accelerator.wait_for_everyone()
    nonfinite_in_a_row = skipped = 0
    digests = open(run_dir / f"adapter-digests-rank{accelerator.process_index}.txt", "a") if config.record_digests else None
    bar = _progress(progress and main, config.steps, step)
    with bar, open(metrics_path if main else os.devnull, "a", newline="") as handle:
        writer = csv.writer(handle)
        if main and handle.tell() == 0:
            writer.writerow(["step", "generator_loss", "fake_loss", "seconds", "skipped"])
        while step < config.steps:
            started = time.perf_counter()
            batch = torch.randint(0, len(everything), (config.batch_size,), generator=rng)
            conditioning = everything.select(batch)
            with accelerator.autocast():
                loss, x0 = generator_step(teacher, model, conditioning, null, config.vsd, rng, separate)
            optimizers[GENERATOR].zero_grad(set_to_none=True)
            loss_ok = accelerator.reduce(torch.isfinite(loss).float().to(accelerator.device), "min").item() > 0
            if loss_ok:  # every process skips together, so the adapters stay identical
                loss.backward()
                _average_gradients(accelerator, roles.parameters(GENERATOR))
                torch.nn.utils.clip_grad_norm_(roles.parameters(GENERATOR), config.grad_clip)
                optimizers[GENERATOR].step()
                if ema is not None:
                    ema.update()
                nonfinite_in_a_row = 0
            else:
                skipped += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row > config.max_nonfinite_in_a_row:
                    raise TrainingError(f"{nonfinite_in_a_row} non-finite generator losses in a row at step {step}; "
                                        "the last good checkpoint is kept")
            fake_losses = []
            for _ in range(config.fake_steps_per_generator_step):
                with accelerator.autocast():
                    fake_loss = fake_step(teacher, model, x0, conditioning, null, config.vsd, rng)
                optimizers[FAKE].zero_grad(set_to_none=True)
                if accelerator.reduce(torch.isfinite(fake_loss).float().to(accelerator.device), "min").item() > 0:
                    fake_loss.backward()
                    _average_gradients(accelerator, roles.parameters(FAKE))
                    torch.nn.utils.clip_grad_norm_(roles.parameters(FAKE), config.grad_clip)
                    optimizers[FAKE].step()
                fake_losses.append(fake_loss.item())
            step += 1
            writer.writerow([step, loss.item(), sum(fake_losses) / len(fake_losses),
                             round(time.perf_counter() - started, 4), skipped])
            handle.flush()
            if board is not None:
                board.add_scalar("loss/generator", loss.item(), step)
                board.add_scalar("loss/fake", fake_losses[-1], step)
            if progress and main:
                bar.update(bar.task_ids[0], completed=step, generator=loss.item(), fake=fake_losses[-1],
                           seconds=time.perf_counter() - started)
            if digests:
                digests.write(f"{step} {_digest(roles.named_parameters(GENERATOR).items())} "
                              f"{_digest(roles.named_parameters(FAKE).items())}\n")
                digests.flush()
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(run_dir, step, roles, optimizers, rng, config.keep_checkpoints, accelerator, ema)
            if (main or fsdp) and (step % config.validate_every == 0 or step == config.steps):
                save_validation_grid(teacher, roles.generator, validation_conditioning.to(accelerator.device), config,
                                     run_dir / "samples" / f"step-{step:07d}.png" if main else None)
                if on_validate is not None:
                    on_validate(step, teacher, roles.generator, config.vsd)
    if digests:
        digests.close()
    if board is not None:
        board.close()
    with sharding.full_weights(model):  # FSDP: the adapter file fingerprints the whole base
        if base_before:
            (run_dir / f"base-digests-rank{accelerator.process_index}.txt").write_text(
                f"start {base_before}\nend {_base_digest(roles)}\n")
        if main:
            save_generator(teacher, roles, run_dir, ema)
    accelerator.wait_for_everyone()
    if fsdp is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo may abort at exit with collectives' threads alive
    return {"steps": step, "trainable": counts, "skipped": skipped, "cache_hit": cache_hit, "run_dir": str(run_dir)}


def save_generator(teacher: Teacher, roles: Roles, run_dir: Path, ema: AdapterEMA | None = None) -> Path:
    """The trained generator where ``export`` and ``sample`` find it (:func:`export.generator_path`): the
    adapter file (LoRaD, or LoRA/DoRA in diffusers' LoRA layout) or, for full fine-tuning, a diffusers
    model folder; with EMA, the averaged weights beside it."""
    def write(ema_copy: bool) -> Path:
        path = generator_path(run_dir, roles.separate_generator, ema_copy)
        if roles.separate_generator:
            roles.generator.save_pretrained(path)
        else:
            adapters.save_adapter(roles.base, GENERATOR, path, component=teacher.component)
        return path

    path = write(False)
    if ema is not None:
        with ema.applied():
            write(True)
    return path


def _optimizer_class(name: str):
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise TrainingError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
    return bitsandbytes.optim.AdamW8bit


def _tensorboard(run_dir: Path):
    """A TensorBoard writer in RUN_DIR/tensorboard when tensorboard is installed (metrics.csv always)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _progress(enabled: bool, total: int, done: int):
    """A rich progress bar on stderr with the latest losses and step time (or nothing)."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("G {task.fields[generator]:.3g}  fake {task.fields[fake]:.3g}  {task.fields[seconds]:.2f} s/step"),
                   console=Console(stderr=True))
    bar.add_task("train", total=total, completed=done, generator=float("nan"), fake=float("nan"), seconds=0.0)
    return bar


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows after the checkpoint's step (they will be recomputed)."""
    if not path.is_file():
        return
    rows = list(csv.reader(path.read_text().splitlines()))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step] if rows else []
    path.write_text("".join(",".join(r) + "\n" for r in kept))
