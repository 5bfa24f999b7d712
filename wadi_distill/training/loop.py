"""The training loop: alternating generator / fake-score steps on one shared frozen base.

The run folder's files are :mod:`wadi_distill.runs`'s, checkpoints :mod:`.checkpoint`'s, the metrics,
TensorBoard and progress :mod:`.runlog`'s; this module only trains. It runs on one process or many
(``accelerate launch``): every process draws its own noise and prompts, adapter gradients are
averaged across processes, and rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from wadi_analysis.atomic import atomic_write_text
from wadi_analysis.outputs import check_output

from ..config import RunConfig, check_schedule
from ..distill import FAKE, GENERATOR, Roles, TrainingError, attach_roles, fake_step, generator_step, one_step
from ..runs import RunFolder
from ..sampling import decode, image_grid
from ..teacher import Teacher, load_teacher
from .. import regression
from . import sharding
from .checkpoint import CheckpointIO, read_regression_pairs, resolve_resume
from .ema import AdapterEMA
from .prompt_files import open_prompts
from .prompts import cached_embeddings
from .runlog import RunLog, digest, metric_rows

__all__ = ["TrainingError", "train", "save_generator"]  # TrainingError: where callers of train() catch it


def train(config: RunConfig, resume: str | None = None, progress: bool = False, on_validate=None) -> dict:
    """Distil ``config.teacher`` into a one-step generator; returns a summary of the run.

    ``on_validate(step, teacher, generator_model, vsd_config)``, if given, is called on the main process
    after each validation grid (every ``validate_every`` steps and at the end), e.g. to record metrics;
    when it returns True the run stops early at that step (checkpoint and generator saved as at the end).
    """
    # Set up processes; refuse what cannot run before anything is written.
    accelerator = _accelerator(config)
    is_main = accelerator.is_main_process
    fsdp = sharding.fsdp_plugin(accelerator)  # accelerate launch with an FSDP config: shard the frozen base
    if fsdp is not None and (reason := sharding.unsupported(fsdp, config, on_validate)):
        raise TrainingError(reason)
    run = RunFolder(config.out)
    _check_run_folder(run, config, resume)

    # Load the teacher and attach the roles (bad targets leave no run folder).
    prompts = open_prompts(config.prompts, config.prompt_column, dedupe=config.prompt_dedupe,
                           shuffle_seed=config.prompt_shuffle_seed)
    prompt_record = prompts.manifest()  # before any write: a file that changed meanwhile is refused here
    teacher = load_teacher(config.teacher, config=config.teacher_config, flux_guidance=config.flux_guidance)
    check_schedule(config.vsd, teacher.num_timesteps)
    roles, counts = attach_roles(teacher, config)
    base_before = digest(roles.frozen_parameters()) if config.record_digests else None
    _place(roles, accelerator, fsdp, config)

    # Prompts, optimisers, the sampling RNG, the EMA; resume (the checkpoint is validated before any write).
    notices: list[str] = []  # said once the run is known to start: a refused run says one error line only
    all_prompts, null_prompt, cache_hit = cached_embeddings(teacher, prompts, config.embedding_cache(),
                                                            warn=notices.append)
    validation = teacher.encode(config.validation_prompts or prompts.head(4)).to(accelerator.device)
    optimizer_class = _optimizer_class(config.optimizer)
    optimizers = {role: optimizer_class(roles.parameters(role), lr=lr, weight_decay=config.weight_decay)
                  for role, lr in ((GENERATOR, config.generator_lr), (FAKE, config.fake_lr))}
    scalers = loss_scalers(config, accelerator)
    rng = torch.Generator().manual_seed(config.seed + 1000 * accelerator.process_index)
    ema = AdapterEMA(roles.named_parameters(GENERATOR), config.ema_decay) if config.ema_decay is not None else None
    checkpoints = CheckpointIO(run, roles, optimizers, rng, ema, accelerator, keep=config.keep_checkpoints,
                               scalers=scalers)
    step = 0
    pair_count = regression.pair_count(config)
    if (checkpoint := resolve_resume(run, resume)) is not None:
        step = checkpoints.load(checkpoint)  # a resumed run makes the pairs its first part made
        pair_count = read_regression_pairs(checkpoint, config.regression_pairs) or pair_count
    all_prompts, null_prompt = all_prompts.to(accelerator.device), null_prompt.to(accelerator.device)
    separate_generator = roles.generator if roles.separate_generator else None
    skips = _Skips(config.max_nonfinite_in_a_row)
    metric_rows(run.metrics_file)  # a damaged metrics.csv is refused before config.json is rewritten
    # after every refusal: making the pairs takes minutes on a large teacher
    pairs = _regression_pairs(teacher, all_prompts, null_prompt, config, accelerator, notices if is_main else [],
                              pair_count)
    if pairs is not None:
        checkpoints.state["regression_pairs"] = pair_count
    fresh, before = is_main and step == 0, run.entries()  # a fresh run: what a failure must not remove
    if is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        config.write(run.config_file)
        atomic_write_text(run.prompts_file, json.dumps(prompt_record, indent=2) + "\n")  # what it trained on
        for line in notices:
            print(line, file=sys.stderr)
    try:
        accelerator.wait_for_everyone()  # the main process has made the run folder every process logs into
        with RunLog(run, total_steps=config.steps, start_step=step, is_main=is_main, rank=accelerator.process_index,
                    progress=progress, record_digests=config.record_digests) as log:
            while step < config.steps:
                log.step_started()
                _warm_up(optimizers, step, config)
                # Generator step: VSD loss on one-step samples of a batch of prompts.
                conditioning = all_prompts.select(torch.randint(0, len(all_prompts), (config.batch_size,), generator=rng))
                with accelerator.autocast():
                    loss, x0 = generator_step(teacher, roles.base, conditioning, null_prompt, config.vsd, rng,
                                              separate_generator)
                    if pairs is not None:  # DMD's regression term beside VSD
                        loss = loss + config.regression_weight * regression.regression_batch_loss(
                            teacher, roles.generator, pairs, all_prompts, config.batch_size,
                            config.vsd, rng)
                outcome = _update(loss, optimizers[GENERATOR], roles.parameters(GENERATOR), accelerator, config.grad_clip,
                                  scalers[GENERATOR])
                if outcome == STEPPED and ema is not None:
                    ema.update()
                skips.record(outcome, step)

                # Fake-score steps: denoising on the generator's (detached) samples.
                fake_losses = []
                for _ in range(config.fake_steps_per_generator_step):
                    with accelerator.autocast():
                        fake_loss = fake_step(teacher, roles.base, x0, conditioning, null_prompt, config.vsd, rng)
                    _update(fake_loss, optimizers[FAKE], roles.parameters(FAKE), accelerator, config.grad_clip,
                            scalers[FAKE])
                    fake_losses.append(fake_loss.item())
                step += 1
                log.step_done(step, loss.item(), fake_losses, skips.total, roles)

                # Save checkpoint; validate. on_validate returning True ends the run here (every process
                # together), with a checkpoint and the generator saved as at the last step.
                last = step == config.steps
                validating, stop = step % config.validate_every == 0 or last, False
                if step % config.checkpoint_every == 0 or last:
                    checkpoints.save(step)
                if (is_main or fsdp) and validating:
                    save_validation_grid(teacher, roles.generator, validation, config, run.grid(step) if is_main else None)
                    if on_validate is not None:
                        stop = on_validate(step, teacher, roles.generator, config.vsd) is True
                if validating and on_validate is not None and accelerator.num_processes > 1:
                    stop = accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "max").item() > 0
                if stop and not last:
                    if step % config.checkpoint_every:
                        checkpoints.save(step)
                    break

            # Save the generator where export and sample find it.
            with sharding.full_weights(roles.base):  # FSDP: the adapter file fingerprints the whole base
                if base_before:
                    log.base_digests(base_before, digest(roles.frozen_parameters()))
                if is_main:
                    save_generator(teacher, roles, run, ema)
        accelerator.wait_for_everyone()
        if fsdp is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # gloo may abort at exit with collectives' threads alive
        return {"steps": step, "trainable": counts, "skipped": skips.total, "cache_hit": cache_hit,
                "run_dir": str(run.path)}
    except BaseException:
        if fresh and not run.checkpoints():
            run.remove_new_entries(before)  # a run that failed before its first checkpoint leaves nothing
        raise


def _regression_pairs(teacher: Teacher, prompts, null, config: RunConfig, accelerator, notices: list[str],
                      count: int):
    """This process's share of the regression pairs (:mod:`wadi_distill.regression`), or None when the
    term is off; ``count`` pairs in all (a resumed run passes the count its checkpoint recorded). Made by the
    teacher alone (DDIM runs with no adapter active) from their own seed, so a resumed run makes the same pairs."""
    if not config.regression_weight:
        return None
    count = regression.share(count, accelerator.num_processes)
    notices.append(f"regression pairs: {count} teacher samples of {config.regression_teacher_steps} DDIM steps "
                   f"per process (guidance {config.vsd.guidance_real})")
    return regression.teacher_pairs(teacher, prompts, null, count, config.regression_teacher_steps,
                                    config.vsd.guidance_real, config.seed + 7919 + accelerator.process_index,
                                    accelerator.device).to(accelerator.device)


def _warm_up(optimizers: dict, step: int, config: RunConfig) -> None:
    """Learning rates at ``step``: lr · min(1, (step + 1) / warmup_steps), then constant. A function of the
    step alone, so a resumed run continues exactly."""
    if config.warmup_steps:
        factor = min(1.0, (step + 1) / config.warmup_steps)
        for role, base in ((GENERATOR, config.generator_lr), (FAKE, config.fake_lr)):
            for group in optimizers[role].param_groups:
                group["lr"] = base * factor


def _check_run_folder(run: RunFolder, config: RunConfig, resume: str | None) -> None:
    """What must hold before a run writes anything: its folder apart from every input, no links in it
    (writes never follow links: metrics.csv, config.json, ... must be the run's own files), no run
    there already unless resumed, and prompts to train on."""
    check_output(run.path, [p for p in (config.teacher, config.teacher_config, config.prompts, config.plan) if p],
                 folder=True)
    run.refuse_links()
    if run.checkpoints() and not resume:
        raise TrainingError(f"{run.path} already holds a run; continue it with --resume latest or choose another --out")
    if not config.prompts:
        raise TrainingError("a teacher other than the embedded one needs --prompts FILE (or prompts in --config)")


class _Skips:
    """Skipped generator steps. Every process skips together (the adapters stay identical); an fp16
    overflow (the loss scaler lowering its scale, as it does early on) is counted but harmless, while
    more than ``limit`` non-finite losses in a row end the run."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def record(self, outcome: str, step: int) -> None:
        if outcome == STEPPED:
            self.in_a_row = 0
            return
        self.total += 1
        if outcome == OVERFLOW:
            return
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise TrainingError(f"{self.in_a_row} non-finite generator losses in a row at step {step}; "
                                "the last good checkpoint is kept")


def _accelerator(config: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: a previous run in this interpreter may have fixed another precision; start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    # Without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun train on the CPU (gloo).
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())


def _place(roles: Roles, accelerator, fsdp, config: RunConfig) -> None:
    """The networks onto the device (FSDP: the frozen base sharded per block), with gradient checkpointing."""
    if fsdp is not None:
        sharding.shard(roles.base, accelerator, fsdp, roles.parameters(GENERATOR) + roles.parameters(FAKE))
    else:
        roles.base.to(accelerator.device)
    if roles.separate_generator:
        roles.generator.to(accelerator.device)
    if config.gradient_checkpointing:
        for network in {id(m): m for m in (roles.base, roles.generator)}.values():
            network.enable_gradient_checkpointing()
            network.train()  # diffusers checkpoints activations only in training mode


STEPPED, SKIPPED, OVERFLOW = "stepped", "skipped", "overflow"


def loss_scalers(config: RunConfig, accelerator) -> dict[str, torch.amp.GradScaler]:
    """One fp16 loss scaler per role (their losses differ in scale), enabled where the forward runs in
    fp16: accelerate's autocast with ``mixed_precision="fp16"`` on a GPU. On the CPU accelerate accepts
    fp16 but neither autocasts nor scales (the math stays float32), so the scalers are disabled there
    and training is bit-identical to ``no``. Disabled scalers are no-ops."""
    enabled = config.mixed_precision == "fp16" and bool(getattr(accelerator, "native_amp", False))
    return {role: torch.amp.GradScaler(accelerator.device.type, enabled=enabled) for role in (GENERATOR, FAKE)}


def _update(loss: torch.Tensor, optimizer, parameters: list[nn.Parameter], accelerator, grad_clip: float,
            scaler: torch.amp.GradScaler | None = None) -> str:
    """One optimiser step of ``parameters`` on ``loss``: backward (fp16: of the scaled loss), gradients
    averaged over processes (by hand: the adapters alternate roles on one module, which DDP's
    single-backward bookkeeping cannot follow), unscaled, clipped. Skipped on every process when the
    loss is non-finite on any (``SKIPPED``), or, fp16, when the averaged gradients overflowed: they are
    the same on every process, so all skip together and lower the scale (``OVERFLOW``)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    optimizer.zero_grad(set_to_none=True)
    if accelerator.reduce(torch.isfinite(loss).float().to(accelerator.device), "min").item() <= 0:
        return SKIPPED
    scaler.scale(loss).backward()
    if accelerator.num_processes > 1:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
    if not scaler.is_enabled():
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        return STEPPED
    scaler.unscale_(optimizer)
    finite = all(bool(torch.isfinite(p.grad).all()) for p in parameters if p.grad is not None)
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)  # skips the step when unscale_ found inf/NaN
    scaler.update()
    return STEPPED if finite else OVERFLOW


@torch.no_grad()
def save_validation_grid(teacher: Teacher, generator_model, conditioning, config: RunConfig, path=None) -> None:
    """One-step samples for the fixed validation prompts and seed, decoded by the VAE, as a PNG grid
    (``path`` None: computed, not written; FSDP's other processes, whose shards the forward needs)."""
    rng = torch.Generator().manual_seed(config.validation_seed)
    shape = (len(conditioning), teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    noise = torch.randn(shape, generator=rng).to(conditioning.hidden_states.device)  # CPU draws: same on any device
    latents = one_step(teacher, generator_model, noise, conditioning, config.vsd)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(decode(teacher, latents), min(4, len(conditioning))).save(path)


def save_generator(teacher: Teacher, roles: Roles, run: RunFolder, ema: AdapterEMA | None = None):
    """The trained generator where ``export`` and ``sample`` find it (:meth:`RunFolder.generator`): the
    adapter file (LoRaD, or LoRA/DoRA in diffusers' LoRA layout) or, for full fine-tuning, a diffusers
    model folder; with EMA, the averaged weights beside it."""
    from .. import adapters

    def write(ema_copy: bool):
        path = run.generator(roles.separate_generator, ema_copy)
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
