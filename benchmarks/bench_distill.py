"""Benchmark one WaDi iteration on the shared base against the published three-copy layout.

One iteration = one generator step (forward, VSD loss, backward, ``AdamW.step()``) and one fake-score step
(forward, denoising loss, backward, ``AdamW.step()``), CPU, float32, ``torch.set_num_threads(2)``.
Variants, each run in a fresh subprocess:

* ``shared``:    WaDi -- ONE frozen ``UNet2DConditionModel`` with LoRaD adapters ``generator``
  (preset ``sd-unet-generator``) and ``fake`` (``sd-unet-fake``) from ``adapters.attach``; the iteration
  is ``wadi_distill.distill.generator_step`` + ``fake_step`` (teacher = no adapter active).
* ``published``: the published layout -- THREE U-Net copies: frozen teacher, generator with hook-style
  LoRaD (``bench_lorad.attach_hook_style``) on the same targets, fake score with hook-style LoRaD on the
  fake targets; the same VSD equations (``wadi_distill.vsd``), CFG with the null embedding on teacher and
  fake (uncond + cond batched), prompt dropout on the fake step.
* ``lora``:      like ``shared`` with peft LoRA at ``lora_ranks_at_equal_budget`` ranks.

Configurations: ``tiny`` (``tiny_sd15_config()``, latents 16x16, batch 2, ranks 16 / 4) and ``sd15``
(``real_config("sd15_unet")`` fp32, latents 8x8, batch 1, ranks 256 / 32 as published).

Reported: s/iteration (median of the timed iterations after warm-up; if the warm-up iteration takes
more than 60 s only one iteration is timed), peak RSS growth (``/proc/self/clear_refs`` <- 5 right after
the imports, before any model is built, then VmHWM minus VmRSS at that reset: weights, adapters,
optimiser state, activations, workspace) and weight memory (bytes of the unique storages of all
parameters and buffers of all model copies, adapters included). Target from the issue: shared weight
memory <= 0.5x the three-copy layout.

Run:  python benchmarks/bench_distill.py [--quick] [--skip-sd15]
On 2 cores any other busy process distorts every figure: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("shared", "published", "lora")
CONFIGS = {  # name: (latent size, batch, generator rank, fake rank)
    "tiny": (16, 2, 16, 4),
    "sd15": (8, 1, 256, 32),
}


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def weight_bytes(models) -> int:
    """Bytes of the unique storages behind all parameters and buffers of ``models``."""
    seen = {}
    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------- child
def child(args) -> dict:
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from wadi_analysis.examples import real_config, tiny_sd15_config
    from wadi_distill import adapters, lorad
    from wadi_distill.backbones import Conditioning, Teacher
    from wadi_distill.distill import (FAKE, GENERATOR, VSDConfig, drop_conditioning, fake_step, generator_step)
    from wadi_distill.vsd import add_noise, fake_score_loss, generator_loss, guided, predicted_x0

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_lorad import attach_hook_style

    torch.set_num_threads(args.threads)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS: everything below counts
    rss_at_reset = proc_status_kb("VmRSS")

    latent, batch, gen_rank, fake_rank = CONFIGS[args.config]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**(tiny_sd15_config() if args.config == "tiny" else real_config("sd15_unet")))
    model.requires_grad_(False)
    gen_targets = lorad.resolve_preset(model, "sd-unet-generator", gen_rank)
    fake_targets = lorad.resolve_preset(model, "sd-unet-fake", fake_rank)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    teacher = Teacher(denoiser=model, family="unet", alphas_cumprod=scheduler.alphas_cumprod.double().clone(),
                      prediction_type="epsilon", pipeline=None, latent_channels=4, sample_size=latent)
    dim = model.config.cross_attention_dim
    conditioning = Conditioning(hidden_states=torch.randn(batch, 77, dim))
    null = Conditioning(hidden_states=torch.randn(1, 77, dim))
    config, rng = VSDConfig(), torch.Generator().manual_seed(0)

    if args.variant == "published":
        generator, fake = copy.deepcopy(model), copy.deepcopy(model)
        attach_hook_style(generator, gen_targets, seed=0)
        attach_hook_style(fake, fake_targets, seed=1)
        models = [model, generator, fake]
        gen_params = [p for p in generator.parameters() if p.requires_grad]
        fake_params = [p for p in fake.parameters() if p.requires_grad]

        def guided_eps(net, noisy, timesteps, scale):
            both = Conditioning.cat([null.repeat_to(batch), conditioning])
            eps = teacher.epsilon(net, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), both)
            return guided(*eps.chunk(2), scale)

        def gen_loss():
            shape = (batch, 4, latent, latent)
            noise = torch.randn(shape, generator=rng)
            last = torch.full((batch,), teacher.num_timesteps - 1, dtype=torch.long)
            x0 = predicted_x0(teacher.forward(generator, noise, last, conditioning), noise,
                              teacher.alpha_bar(last, noise), "epsilon")
            timesteps = torch.randint(config.t_min, config.t_max + 1, (batch,), generator=rng)
            alpha_t = teacher.alpha_bar(timesteps, x0)
            with torch.no_grad():
                noisy = add_noise(x0.detach(), torch.randn(shape, generator=rng), alpha_t)
                eps_real = guided_eps(model, noisy, timesteps, config.guidance_real)
                eps_fake = guided_eps(fake, noisy, timesteps, config.guidance_fake)
            return generator_loss(x0, eps_real, eps_fake, alpha_t), x0

        def fake_loss(x0):
            x0 = x0.detach()
            timesteps = torch.randint(config.fake_t_min, config.fake_t_max + 1, (batch,), generator=rng)
            noise = torch.randn(x0.shape, generator=rng)
            alpha_t = teacher.alpha_bar(timesteps, x0)
            dropped = drop_conditioning(conditioning, null, config.prompt_dropout, rng)
            return fake_score_loss(teacher.epsilon(fake, add_noise(x0, noise, alpha_t), timesteps, dropped),
                                   noise, alpha_t)
    else:
        if args.variant == "lora":  # ranks before any peft wrapping (peft layers hide .weight's module type)
            gen_targets = adapters.lora_ranks_at_equal_budget(model, gen_targets)
            fake_targets = adapters.lora_ranks_at_equal_budget(model, fake_targets)
        for role, targets, seed in ((GENERATOR, gen_targets, 0), (FAKE, fake_targets, 1)):
            adapters.attach(model, "lorad" if args.variant == "shared" else "lora", targets, role, seed=seed)
        models = [model]
        gen_params = adapters.adapter_parameters(model, GENERATOR)
        fake_params = adapters.adapter_parameters(model, FAKE)
        for p in gen_params + fake_params:
            p.requires_grad_(True)

        def gen_loss():
            return generator_step(teacher, model, conditioning, null, config, rng)

        def fake_loss(x0):
            return fake_step(teacher, model, x0, conditioning, null, config, rng)

    gen_opt, fake_opt = torch.optim.AdamW(gen_params, lr=1e-5), torch.optim.AdamW(fake_params, lr=1e-5)

    def iteration():
        loss, x0 = gen_loss()
        loss.backward()
        gen_opt.step()
        gen_opt.zero_grad(set_to_none=True)
        fake_loss(x0).backward()
        fake_opt.step()
        fake_opt.zero_grad(set_to_none=True)

    times, first, i = [], None, 0
    while i < args.warmup + args.iters:
        start = time.perf_counter()
        iteration()
        elapsed = time.perf_counter() - start
        first = elapsed if first is None else first
        if i >= args.warmup:
            times.append(elapsed)
        elif elapsed > 60:  # slow: one timed iteration after this warm-up
            args.warmup, args.iters = i + 1, 1
        i += 1
    return {"s": statistics.median(times), "n": len(times), "first_s": first, "warmup": args.warmup,
            "peak_mb": (proc_status_kb("VmHWM") - rss_at_reset) / 1024, "weight_mb": weight_bytes(models) / 2**20,
            "gen_params": sum(p.numel() for p in gen_params), "fake_params": sum(p.numel() for p in fake_params)}


# ----------------------------------------------------------------------------- parent
def run_child(variant: str, config: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--config", config,
           "--threads", str(args.threads), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def wait_for_quiet(limit_s: float = 300, threshold: float = 1.5) -> None:
    start = time.time()
    while os.getloadavg()[0] > threshold and time.time() - start < limit_s:
        time.sleep(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--skip-sd15", action="store_true", help="only the tiny U-Net")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="shared", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    wait_for_quiet()
    print(f"{args.threads} threads, load average at start {os.getloadavg()[0]:.2f}")
    for config in ("tiny",) + (() if args.skip_sd15 else ("sd15",)):
        latent, batch, gen_rank, fake_rank = CONFIGS[config]
        args.iters = args.iters or (3 if args.quick else 5)
        args.warmup = args.warmup if args.warmup is not None else 1
        if config == "sd15":
            args.iters, args.warmup = (1, 1) if args.quick else (2, 1)
        rows = {v: run_child(v, config, args) for v in VARIANTS}
        print(f"\n{config}: latents {latent}x{latent}, batch {batch}, LoRaD ranks {gen_rank} (generator) / "
              f"{fake_rank} (fake); load {os.getloadavg()[0]:.2f}")
        print(f"  {'variant':10} {'s/iter':>8} {'timed':>6} {'1st iter s':>10} {'x shared':>9} {'peak RSS MB':>12} "
              f"{'weights MB':>11} {'gen params':>12} {'fake params':>12}")
        for v, r in rows.items():
            print(f"  {v:10} {r['s']:8.3f} {r['n']:6d} {r['first_s']:10.2f} {r['s'] / rows['shared']['s']:9.2f} "
                  f"{r['peak_mb']:12.1f} {r['weight_mb']:11.1f} {r['gen_params']:12,d} {r['fake_params']:12,d}")
        ratio = rows["shared"]["weight_mb"] / rows["published"]["weight_mb"]
        print(f"  weight memory shared / three-copy = {ratio:.2f} (target <= 0.5); peak RSS shared / three-copy = "
              f"{rows['shared']['peak_mb'] / rows['published']['peak_mb']:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
