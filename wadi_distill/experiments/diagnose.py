"""Where a one-step student's samples lie off the teacher's data, and whether its fake score tracks
them: the denoising error by timestep (``wadi-distill diagnose RUN ...``).

For samples x0 and a denoiser e(x_t, t), the denoising error at t is

    D(t) = E_eps || e(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t) - eps ||^2.

The teacher's D on real latents is what data looks like to it; on the student's samples, the excess over
that is how far off the teacher's data they lie at the scale t resolves (low t: fine detail). The fake
score's D on the same samples, below the teacher's, is how much of that it has learned: the VSD gradient
at t is the difference of the two scores, so where the fake score's D equals the teacher's, the
generator gets no signal at that scale. Rows are written for the teacher's own single step (the
generator at initialisation), its 25-step DDIM samples (at the real score's default guidance: what the
student is distilled towards) and each run's last checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..vsd import add_noise

TIMESTEPS = (50, 200, 400, 600, 800, 950)


def denoising_error(teacher, model, samples: torch.Tensor, conditioning, timesteps=TIMESTEPS,
                    seed: int = 0) -> list[float]:
    """D(t) of ``model`` (with whatever adapter is active) on ``samples``, for each t; the same noise for
    every model given the same ``seed``, so rows are compared on equal draws."""
    rng = torch.Generator().manual_seed(seed)
    errors = []
    with torch.no_grad():
        for t in timesteps:
            steps = torch.full((len(samples),), t, dtype=torch.long)
            noise = torch.randn(samples.shape, generator=rng)
            noisy = add_noise(samples, noise, teacher.alpha_bar(steps, samples))
            errors.append((teacher.epsilon(model, noisy, steps, conditioning) - noise).pow(2).mean().item())
    return errors


def _prompts_and_real(per_class: int):
    """``per_class`` real test images of each class, and their prompts."""
    from ..embedded import datasets

    test = datasets.fashion_mnist("test", size=32)
    index = torch.cat([torch.nonzero(test.labels == c).flatten()[:per_class] for c in range(len(test.classes))])
    prompts = [datasets.caption(test.classes, int(label)) for label in test.labels[index]]
    return prompts, test.images[index]


def _latents(teacher, images: torch.Tensor) -> torch.Tensor:
    vae = teacher.pipeline.vae
    with torch.no_grad():
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def _run_roles(run_dir: Path):
    """The run's teacher with both roles attached as the run attached them, loaded from its last checkpoint."""
    from ..config import load_config
    from ..distill import attach_roles
    from ..runs import RunFolder, run_teacher
    from ..training.checkpoint import copy_roles, read_roles

    run = RunFolder(run_dir)
    recorded = run.read_config()
    teacher = run_teacher(recorded)
    roles, _ = attach_roles(teacher, load_config(**recorded))
    copy_roles(read_roles(run.checkpoints()[-1], roles), roles)
    return teacher, roles, recorded


def denoising_gap(runs: list[str | os.PathLike], per_class: int = 20, timesteps=TIMESTEPS, seed: int = 0):
    """A DataFrame: for real latents, the teacher's single step and each run (``runs``: run folders of the
    embedded teacher), the teacher's D(t) and, for runs, the fake score's, per t (columns ``t``, ``1-a_t``)."""
    import pandas as pd

    from .. import embedded
    from ..adapters import activate
    from ..distill import FAKE, GENERATOR, one_step
    from ..sampling import ddim
    from ..teacher import load_teacher
    from ..vsd import VSDConfig

    prompts, images = _prompts_and_real(per_class)
    teacher = load_teacher(embedded.teacher_path())
    conditioning = teacher.encode(prompts)
    noise = torch.randn((len(prompts), teacher.latent_channels, teacher.sample_size, teacher.sample_size),
                        generator=torch.Generator().manual_seed(seed + 1))
    rows = []

    def add(source: str, scorer: str, errors: list[float]) -> None:
        for t, error in zip(timesteps, errors):
            one_minus_alpha = 1 - float(teacher.alphas_cumprod[t])
            rows.append({"samples": source, "scorer": scorer, "t": t, "1-a_t": one_minus_alpha, "error": error})

    add("real", "teacher", denoising_error(teacher, teacher.denoiser, _latents(teacher, images), conditioning,
                                           timesteps, seed))
    with torch.no_grad():
        single = one_step(teacher, teacher.denoiser, noise, conditioning, VSDConfig())
    add("teacher 1 step", "teacher", denoising_error(teacher, teacher.denoiser, single, conditioning, timesteps, seed))
    guidance = VSDConfig().guidance_real
    many = ddim(teacher, teacher.denoiser, noise, conditioning, teacher.encode([""]), 25, guidance)
    add("teacher 25 steps", "teacher", denoising_error(teacher, teacher.denoiser, many, conditioning, timesteps, seed))
    for run_dir in runs:
        run_teacher, roles, recorded = _run_roles(Path(run_dir))
        run_conditioning = run_teacher.encode(prompts)
        with torch.no_grad():
            samples = one_step(run_teacher, roles.generator, noise, run_conditioning, VSDConfig(**recorded["vsd"]))
        name = Path(run_dir).name
        for scorer, adapter in (("teacher", None), ("fake", FAKE)):
            activate(roles.base, adapter)
            add(name, scorer, denoising_error(run_teacher, roles.base, samples, run_conditioning, timesteps, seed))
        activate(roles.base, GENERATOR)
    return pd.DataFrame(rows)


def diagnose_runs(runs: list[str | os.PathLike], out: str | os.PathLike | None = None, per_class: int = 20):
    """:func:`denoising_gap` of ``runs`` (each checked to be a finished run of the embedded teacher) as a wide
    table, one row per t, one column per (samples, scorer); also written to ``out`` (CSV) when given."""
    from wadi_analysis.atomic import atomic_write_text
    from wadi_analysis.errors import UserError
    from wadi_analysis.outputs import check_output

    from .. import embedded
    from ..runs import RUN, RunFolder, source_kind

    for run in runs:
        if not Path(run).exists() or source_kind(run) != RUN:
            raise UserError(f"{run} is not a run folder")
        recorded, checkpoints = RunFolder(run).read_config(), RunFolder(run).checkpoints()
        if not checkpoints:
            raise UserError(f"{run} has no checkpoint to read its fake score from")
        if not os.path.samefile(recorded["teacher"], embedded.teacher_path()):
            raise UserError(f"{run} was not made from the embedded teacher (diagnose compares with its real data)")
    if out is not None:
        out = check_output(out, runs, folder=False)
    table = denoising_gap(runs, per_class=per_class).pivot_table(
        index=["t", "1-a_t"], columns=["samples", "scorer"], values="error", sort=False)
    table.columns = [f"{samples} / {scorer}" for samples, scorer in table.columns]
    if out is not None:
        atomic_write_text(out, table.reset_index().to_csv(index=False))
    return table


def regression_probe(steps: int = 1000, batch_size: int = 16, targets: int = 2048, lr: float = 1e-3,
                     teacher_steps: int = 25, guidance: float = 1.5, per_class: int = 100, seed: int = 0,
                     options: dict | None = None, log=print) -> dict:
    """The capacity probe: the embedded defaults' generator adapter (LoRaD on the same base, same rank and
    placement) trained not by VSD but by regression onto the teacher's own DDIM samples from the same noise,
    L = mse(G(z), DDIM_teacher(z)), on ``targets`` fixed (z, prompt) pairs. If this student's one-step FD
    reaches the teacher's DDIM FD, the adapter can represent a good one-step generator and VSD's signal is
    what falls short; if not, the generator's parametrisation is the limit. ``options`` are ``run`` options
    over the embedded defaults that choose the generator (e.g. ``{"adapter": "full"}``, a preset, a rank).
    Returns its scores and denoising errors (the teacher's D(t) on its samples)."""
    from .. import embedded
    from ..adapters import activate
    from ..config import load_config
    from ..distill import GENERATOR, attach_roles, one_step
    from ..embedded import datasets
    from ..evaluation.benchmark import Benchmark
    from ..sampling import ddim
    from ..teacher import load_teacher
    from ..vsd import VSDConfig

    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    teacher = load_teacher(embedded.teacher_path())
    classes = datasets.FASHION_CLASSES
    labels = torch.randint(len(classes), (targets,), generator=rng)
    prompts = [datasets.caption(classes, int(c), int(t)) for c, t in
               zip(labels, torch.randint(len(datasets.TEMPLATES), (targets,), generator=rng))]
    conditioning = teacher.encode(prompts)
    null = teacher.encode([""])
    noise = torch.randn((targets, teacher.latent_channels, teacher.sample_size, teacher.sample_size), generator=rng)
    # Teacher targets, chunk by chunk (no adapter is attached yet).
    target = torch.cat([ddim(teacher, teacher.denoiser, noise[i:i + 256], conditioning.select(torch.arange(i, min(i + 256, targets))),
                             null, teacher_steps, guidance) for i in range(0, targets, 256)])
    roles, counts = attach_roles(teacher, load_config(**(options or {})))
    parameters = roles.parameters(GENERATOR)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    vsd = VSDConfig()
    # Regress.
    losses = []
    for step in range(1, steps + 1):
        index = torch.randint(targets, (batch_size,), generator=rng)
        x0 = one_step(teacher, roles.generator, noise[index], conditioning.select(index), vsd)
        loss = torch.nn.functional.mse_loss(x0, target[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 200 == 0:
            log(f"regression step {step}/{steps}  loss {loss.item():.4f}")
    # Score.
    if not roles.separate_generator:
        activate(roles.base, GENERATOR)
    benchmark = Benchmark(per_class=per_class)
    result = benchmark.evaluate_model(teacher, roles.generator, vsd)
    prompts_eval = [datasets.caption(classes, c) for c in range(len(classes)) for _ in range(20)]
    check_noise = torch.randn((len(prompts_eval), teacher.latent_channels, teacher.sample_size, teacher.sample_size),
                              generator=torch.Generator().manual_seed(seed + 1))
    check_conditioning = teacher.encode(prompts_eval)
    with torch.no_grad():
        samples = one_step(teacher, roles.generator, check_noise, check_conditioning, vsd)
    activate(roles.base, None)
    errors = denoising_error(teacher, roles.base, samples, check_conditioning)
    return {"options": options or {}, "scores": result["scores"], "trainable": counts[GENERATOR], "steps": steps, "batch_size": batch_size,
            "targets": targets, "lr": lr, "first_loss": losses[0], "last_loss": losses[-1], "teacher_steps": teacher_steps, "guidance": guidance,
            "denoising_error": dict(zip(TIMESTEPS, errors))}
