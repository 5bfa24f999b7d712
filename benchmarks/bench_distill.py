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
* ``rebuild``:   ``shared`` as it ran before issue 16: every use of ``module.weight`` rebuilds the rotated
  weight from scratch with that version's rotation, copied into this file (fresh theta, cos, sin and
  W', theta saved for backward, the fake score's weights built twice per iteration) -- the comparison
  for the fused, recycled and reused rotation (``LoRaDParametrization.forward`` patched in that process).
* ``shared-compiled`` (not in the default set): ``shared`` with the CPU rotation compiled by torch.compile
  (``wadi_distill.lorad.rotation.set_rotation_kernel("compiled")`` in that process; its compile time is in
  the first iteration, ``1st iter s``); the table's footer says whether it ran compiled or fell back.
* ``shared-triton`` (not in the default CPU set; in the ``--gpu`` set): ``shared`` with the rotation run by
  the Triton kernels of ``wadi_distill.lorad.triton_rotation`` (``set_rotation_kernel("triton")``; their
  JIT compile time is in the first iteration); on CPU tensors it runs eager, and the footer says so.

Configurations: ``tiny`` (``tiny_sd15_config()``, latents 16x16, batch 2, ranks 16 / 4) and ``sd15``
(``real_config("sd15_unet")`` fp32, latents 8x8, batch 1, ranks 256 / 32 as published).

The variants run in fresh processes, interleaved for ``--rounds`` rounds (``rebuild, shared, lora, ...``
then again), with glibc's allocator defaults (``MALLOC_*`` and ``GLIBC_TUNABLES`` removed from the
children's environment). Reported per variant: the median over rounds of its s/iteration (each round:
median of the timed iterations after warm-up; if the warm-up iteration takes more than 60 s only one
iteration is timed) and the median over rounds of its ratio to ``shared`` and to ``lora`` *in the same
round*; the same for the process CPU time per iteration (``time.process_time``: with ``--threads 1`` the
figure least disturbed by other processes on a shared machine -- with more threads it includes
OpenMP's spinning); minor page faults and system CPU seconds per timed iteration, peak RSS growth
(``/proc/self/clear_refs`` <- 5 right after the imports, before any model is built, then VmHWM minus
VmRSS at that reset: weights, adapters, optimiser state, activations, workspace) and weight memory (bytes of the unique storages of all
parameters and buffers of all model copies, adapters included). Target from the issue: shared weight
memory <= 0.5x the three-copy layout.

Run:  python benchmarks/bench_distill.py [--quick] [--configs tiny,sd15] [--rounds N] [--variants rebuild,shared,lora]
      python benchmarks/bench_distill.py --variants shared,shared-compiled,lora   (eager vs compiled rotation)
      [--threads N] [--wait-s S] [--profile]   (--profile: the top operators of one iteration per variant,
      torch.profiler, self CPU time)
On 2 cores any other busy process distorts every figure: the load average is printed with the table
(the run first waits up to ``--wait-s`` seconds, default 300, for a load average below 1.5).

GPU mode (``--gpu``; ``benchmarks/gpu_run.sh`` runs it on a lent machine): the SD1.5 config
(``real_config("sd15_unet")``, random weights) at 64x64 latents, batch 4, ranks 256 / 32 as published,
on ``--device`` (default cuda). The frozen base is cast to bf16 before the adapters are attached; every
adapter parameter is float32 (LoRaD's angles as the library makes them, the hook's, and peft LoRA's cast
to float32 as ``get_peft_model`` would); both losses run under ``torch.autocast(bf16)``, backward and
``AdamW.step()`` outside it -- the same for every variant and as ``wadi_distill.training.loop`` does with
``mixed_precision``. Under autocast ``theta = A @ B`` is a matmul and so runs in bf16 (and the rotation
with it), for LoRaD and the hook alike; the extra variant ``shared-theta32`` is ``shared`` with
``RotationAdapter.theta`` computed with autocast disabled (float32 angles and rotation), to price that.
Per variant (fresh process each): s/iteration (``torch.cuda.synchronize`` around each iteration,
median of the timed ones after the warm-ups), ``torch.cuda.max_memory_allocated`` / ``_reserved`` over
the iterations (reset after the build: the resident weights and adapters, AdamW state, activations,
workspace), weight memory, and "fits 24GB" = peak reserved < 23 GiB (a 24 GiB card also holds the CUDA
context). A variant that errors (out of memory included) or exceeds ``--child-timeout`` is recorded with
its error and the others still run; ``--json PATH`` is rewritten after every variant; the exit status is
1 if any variant failed.

Run:  python benchmarks/bench_distill.py --gpu [--json PATH] [--variants shared,published,lora,shared-theta32,shared-triton]
Check of the GPU code path on a CPU (tiny U-Net):  --gpu --device cpu --tiny [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("rebuild", "shared", "published", "lora")
# Not in the default set: ``shared`` with the CPU rotation compiled (``set_rotation_kernel("compiled")``
# in that process; issue 16's torch.compile path, its compile time in the first iteration).
# ``shared-triton``: the Triton kernels (CUDA; eager on the CPU, with the reason in the footer).
EXTRA_VARIANTS = ("shared-compiled", "shared-triton")
CONFIGS = {  # name: (latent size, batch, generator rank, fake rank)
    "tiny": (16, 2, 16, 4),
    "sd15": (8, 1, 256, 32),
}
GPU_VARIANTS = ("shared", "published", "lora", "shared-theta32", "shared-triton")
FITS_24GB_RESERVED_GIB = 23.0


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
def build(variant: str, config: str, device: str = "cpu", dtype_name: str = "fp32", sizes=None) -> dict:
    """One variant set up for timing: ``iteration()``, its models and adapter parameters.

    ``sizes`` = (latent, batch, generator rank, fake rank), default ``CONFIGS[config]``. With a dtype
    other than fp32, the frozen base is cast to it before any adapter is attached, the adapter
    parameters are float32 for every variant (LoRaD's own, the hook's, and peft LoRA's cast to float32
    as ``get_peft_model`` does by default), and both losses run under ``torch.autocast(dtype)`` with the
    backward passes and ``AdamW.step()`` outside it, as ``wadi_distill.training.loop`` does with
    ``mixed_precision``.
    """
    import contextlib
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from wadi_analysis.examples import real_config, tiny_sd15_config
    from wadi_distill import adapters, lorad
    from wadi_distill.teacher import Conditioning, Teacher
    from wadi_distill.distill import (FAKE, GENERATOR, VSDConfig, drop_conditioning, fake_step, generator_step)
    from wadi_distill.vsd import add_noise, fake_score_loss, generator_loss, guided, predicted_x0

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_lorad import attach_hook_style, patch_rebuild_every_use

    if variant not in VARIANTS + EXTRA_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    if variant == "rebuild":
        patch_rebuild_every_use()  # this process only
    if variant == "shared-compiled":
        from wadi_distill.lorad.rotation import set_rotation_kernel

        set_rotation_kernel("compiled")  # this process only
        variant = "shared"
    if variant == "shared-triton":
        from wadi_distill.lorad.rotation import set_rotation_kernel

        set_rotation_kernel("triton")  # this process only
        variant = "shared"
    device = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    latent, batch, gen_rank, fake_rank = sizes or CONFIGS[config]
    torch.manual_seed(0)
    # Built where it runs (an SD1.5 U-Net initialises in seconds on a GPU, a minute on 2 cores).
    with torch.device(device) if device.type != "cpu" else contextlib.nullcontext():
        model = UNet2DConditionModel(**(tiny_sd15_config() if config == "tiny" else real_config("sd15_unet")))
    if dtype != torch.float32:
        model.to(dtype=dtype)  # diffusers warns about _keep_in_fp32_modules; the U-Net has none
    model.requires_grad_(False)
    gen_targets = lorad.resolve_preset(model, "sd-unet-generator", gen_rank)
    fake_targets = lorad.resolve_preset(model, "sd-unet-fake", fake_rank)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    teacher = Teacher(denoiser=model, family="unet", alphas_cumprod=scheduler.alphas_cumprod.double().clone(),
                      prediction_type="epsilon", pipeline=None, latent_channels=4, sample_size=latent)
    dim = model.config.cross_attention_dim
    conditioning = Conditioning(hidden_states=torch.randn(batch, 77, dim).to(device))
    null = Conditioning(hidden_states=torch.randn(1, 77, dim).to(device))
    config_vsd, rng = VSDConfig(), torch.Generator().manual_seed(0)

    if variant == "published":
        generator, fake = copy.deepcopy(model), copy.deepcopy(model)
        attach_hook_style(generator, gen_targets, seed=0)
        attach_hook_style(fake, fake_targets, seed=1)
        generator.to(device)  # the hook's float32 factors are made on the CPU; .to(device) keeps their dtype
        fake.to(device)
        models = [model, generator, fake]
        gen_params = [p for p in generator.parameters() if p.requires_grad]
        fake_params = [p for p in fake.parameters() if p.requires_grad]

        def guided_eps(net, noisy, timesteps, scale):
            both = Conditioning.cat([null.repeat_to(batch), conditioning])
            eps = teacher.epsilon(net, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), both)
            return guided(*eps.chunk(2), scale)

        def gen_loss():
            shape = (batch, 4, latent, latent)
            noise = torch.randn(shape, generator=rng).to(device)
            last = torch.full((batch,), teacher.num_timesteps - 1, dtype=torch.long, device=device)
            output = teacher.network_output(generator, noise, last, conditioning)
            x0 = predicted_x0(output, noise, teacher.alpha_bar(last, noise).to(output.dtype), "epsilon")
            timesteps = torch.randint(config_vsd.t_min, config_vsd.t_max + 1, (batch,), generator=rng).to(device)
            alpha_t = teacher.alpha_bar(timesteps, x0)
            with torch.no_grad():
                noisy = add_noise(x0.detach(), torch.randn(shape, generator=rng).to(device), alpha_t).to(x0.dtype)
                eps_real = guided_eps(model, noisy, timesteps, config_vsd.guidance_real)
                eps_fake = guided_eps(fake, noisy, timesteps, config_vsd.guidance_fake)
            return generator_loss(x0, eps_real, eps_fake, alpha_t), x0

        def fake_loss(x0):
            x0 = x0.detach()
            timesteps = torch.randint(config_vsd.fake_t_min, config_vsd.fake_t_max + 1, (batch,),
                                      generator=rng).to(device)
            noise = torch.randn(x0.shape, generator=rng).to(device=device, dtype=x0.dtype)
            alpha_t = teacher.alpha_bar(timesteps, x0)
            dropped = drop_conditioning(conditioning, null, config_vsd.prompt_dropout, rng)
            return fake_score_loss(teacher.epsilon(fake, add_noise(x0, noise, alpha_t).to(x0.dtype), timesteps,
                                                   dropped), noise, alpha_t)
    else:
        if variant == "lora":  # ranks before any peft wrapping (peft layers hide .weight's module type)
            gen_targets = adapters.lora_ranks_at_equal_budget(model, gen_targets)
            fake_targets = adapters.lora_ranks_at_equal_budget(model, fake_targets)
        for role, targets, seed in ((GENERATOR, gen_targets, 0), (FAKE, fake_targets, 1)):
            adapters.attach(model, "lora" if variant == "lora" else "lorad", targets, role, seed=seed)
        models = [model]
        gen_params = adapters.adapter_parameters(model, GENERATOR)
        fake_params = adapters.adapter_parameters(model, FAKE)
        for p in gen_params + fake_params:
            p.requires_grad_(True)
            if p.dtype != torch.float32:  # peft made them in the base's dtype
                p.data = p.data.float()

        def gen_loss():
            return generator_step(teacher, model, conditioning, null, config_vsd, rng)

        def fake_loss(x0):
            return fake_step(teacher, model, x0, conditioning, null, config_vsd, rng)

    gen_opt, fake_opt = torch.optim.AdamW(gen_params, lr=1e-5), torch.optim.AdamW(fake_params, lr=1e-5)
    if dtype == torch.float32:
        amp = contextlib.nullcontext
    else:
        def amp():
            return torch.autocast(device.type, dtype=dtype)

    def iteration():
        with amp():
            loss, x0 = gen_loss()
        loss.backward()
        gen_opt.step()
        gen_opt.zero_grad(set_to_none=True)
        with amp():
            fake = fake_loss(x0)
        fake.backward()
        fake_opt.step()
        fake_opt.zero_grad(set_to_none=True)

    return {"iteration": iteration, "models": models, "gen_params": gen_params, "fake_params": fake_params}


def top_operators(iteration, rows: int = 14) -> str:
    """torch.profiler's table of one ``iteration()``, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        iteration()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def time_iterations(iteration, warmup: int, iters: int, slow_s: float, sync=lambda: None, slow_from: int = 0) -> dict:
    """Median of ``iters`` timed iterations after ``warmup``; if a warm-up iteration (from number
    ``slow_from`` on: a GPU's first one pays one-time initialisation) takes more than ``slow_s``, one
    timed iteration follows it instead."""
    import resource

    times, cpu_times, faults, sys_times, first, i = [], [], [], [], None, 0
    while i < warmup + iters:
        sync()
        start, cpu_start, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        iteration()
        sync()
        elapsed = time.perf_counter() - start
        first = elapsed if first is None else first
        if i >= warmup:
            after = resource.getrusage(resource.RUSAGE_SELF)
            times.append(elapsed)
            cpu_times.append(time.process_time() - cpu_start)
            faults.append(after.ru_minflt - usage.ru_minflt)
            sys_times.append(after.ru_stime - usage.ru_stime)
        elif elapsed > slow_s and i >= slow_from:  # slow: one timed iteration after this warm-up
            warmup, iters = i + 1, 1
        i += 1
    return {"s": statistics.median(times), "cpu_s": statistics.median(cpu_times), "n": len(times), "first_s": first,
            "warmup": warmup, "times": [round(t, 4) for t in times], "faults": statistics.median(faults),
            "sys_s": statistics.median(sys_times)}


def child(args) -> dict:
    import importlib

    import diffusers
    import torch

    # Every import that build() makes, before the VmHWM reset (diffusers imports its models lazily).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for module in ("wadi_analysis.examples", "wadi_distill.adapters", "wadi_distill.lorad", "wadi_distill.teacher",
                   "wadi_distill.distill", "wadi_distill.vsd", "bench_lorad"):
        importlib.import_module(module)
    for name in ("DDPMScheduler", "UNet2DConditionModel"):
        getattr(diffusers, name)

    torch.set_num_threads(args.threads)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS: everything below counts
    rss_at_reset = proc_status_kb("VmRSS")

    built = build(args.variant, args.config)
    timing = time_iterations(built["iteration"], args.warmup, args.iters, slow_s=60)
    gen_params, fake_params = built["gen_params"], built["fake_params"]
    result = {"s": timing["s"], "cpu_s": timing["cpu_s"], "n": timing["n"], "first_s": timing["first_s"], "warmup": timing["warmup"],
            "faults": timing["faults"], "sys_s": timing["sys_s"],
            "peak_mb": (proc_status_kb("VmHWM") - rss_at_reset) / 1024,
            "weight_mb": weight_bytes(built["models"]) / 2**20,
            "gen_params": sum(p.numel() for p in gen_params), "fake_params": sum(p.numel() for p in fake_params)}
    if args.profile:
        result["profile"] = top_operators(built["iteration"])
    from wadi_distill.lorad.rotation import rotation_kernel_status

    result["rotation"] = rotation_kernel_status()  # what ran: compiled, or eager and why
    return result


def gpu_sizes(args) -> tuple[int, int, int, int]:
    """(latent, batch, generator rank, fake rank) of the --gpu run."""
    if args.tiny:
        return (16, 2, 16, 4)
    return (args.latent, args.batch, 256, 32)


def gpu_child(args) -> dict:
    """One variant on ``args.device``. An error in the build or the iterations (out of memory included)
    comes back in ``error``, with the memory peak reached until then; only a failing CUDA start raises."""
    import torch

    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    result = {"variant": args.variant, "device": args.device, "dtype": args.dtype, "error": None,
              "torch": torch.__version__}
    try:
        import diffusers
        import peft

        result.update(diffusers=diffusers.__version__, peft=peft.__version__)
    except ImportError as exc:
        result["error"] = f"ImportError: {exc}"
        return result
    if cuda:
        result["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
        result["device_total_gib"] = torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**30
    sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)
    variant = "shared" if args.variant == "shared-theta32" else args.variant
    if args.variant == "shared-theta32":  # what LoRaD costs with its angles kept in float32 under autocast
        from wadi_distill.lorad.rotation import RotationAdapter

        def theta(self):
            with torch.autocast(self.A.device.type, enabled=False):
                return self.A @ self.B
        RotationAdapter.theta = theta
    started = time.perf_counter()
    try:
        built = build(variant, "tiny" if args.tiny else "sd15", args.device, args.dtype, gpu_sizes(args))
        sync()
        result["build_s"] = time.perf_counter() - started
        result["weight_gib"] = weight_bytes(built["models"]) / 2**30
        result["gen_params"] = sum(p.numel() for p in built["gen_params"])
        result["fake_params"] = sum(p.numel() for p in built["fake_params"])
        if cuda:  # the peak below = weights and adapters resident now + optimiser state + activations + workspace
            torch.cuda.reset_peak_memory_stats(args.device)
            result["resident_gib"] = torch.cuda.memory_allocated(args.device) / 2**30
        result.update(time_iterations(built["iteration"], args.warmup, args.iters, slow_s=6, sync=sync, slow_from=1))
        from wadi_distill.lorad.rotation import rotation_kernel_status

        result["rotation"] = rotation_kernel_status()  # shared-triton: what ran (triton, or eager and why)
    except Exception as exc:  # OOM included: record it, the parent goes on with the next variant
        message = str(exc).strip().splitlines()
        result["error"] = f"{type(exc).__name__}: {message[0][:300] if message else ''}"
    if cuda:
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(args.device) / 2**30
        # A 24 GB card (24 GiB, ~23.5 usable) also holds the CUDA context (~0.5 GiB): the reserved peak
        # (allocations + allocator cache) must stay under 23 GiB.
        result["fits_24gb"] = result["error"] is None and result["peak_reserved_gib"] < FITS_24GB_RESERVED_GIB
    return result


# ----------------------------------------------------------------------------- parent
def glibc_default_env() -> dict:
    """This environment without allocator settings: the children measure glibc's defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def run_child(variant: str, config: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--config", config,
           "--threads", str(args.threads), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    cmd += ["--profile"] if args.profile else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=glibc_default_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_gpu_child(variant: str, args) -> dict:
    """``gpu_child`` in a fresh process; a crash, a timeout or unreadable output becomes ``error``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--gpu-child", "--variant", variant, "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--latent", str(args.latent)]
    cmd += ["--tiny"] if args.tiny else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timeout: no result after {args.child_timeout} s"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " | ".join(done.stderr.strip().splitlines()[-6:])
        return {"variant": variant, "error": f"child exited {done.returncode}: {tail[-1200:]}"}


def _fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) and not isinstance(value, bool) else \
        f"{'-' if value is None else str(value):>{width}}"


def gpu_main(args) -> int:
    """Every variant in its own process on ``args.device``; the table, and JSON after every variant."""
    args.iters = args.iters or (2 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    latent, batch, gen_rank, fake_rank = gpu_sizes(args)
    variants = [v for v in args.variants.split(",") if v]
    report = {"mode": "gpu", "config": "tiny" if args.tiny else "sd15",
              "latent": latent, "batch": batch, "generator_rank": gen_rank, "fake_rank": fake_rank,
              "dtype": args.dtype, "device": args.device, "warmup": args.warmup, "iters": args.iters,
              "fits_24gb_rule": f"peak reserved < {FITS_24GB_RESERVED_GIB} GiB", "variants": {}}
    print(f"bench_distill --gpu: {report['config']} U-Net (random weights), latents {latent}x{latent}, batch {batch}, "
          f"LoRaD ranks {gen_rank} / {fake_rank}, base {args.dtype}"
          f"{' + autocast' if args.dtype != 'fp32' else ''}, adapters fp32; {args.warmup} warm-up + {args.iters} "
          f"timed iterations per variant, each variant in its own process", flush=True)
    for variant in variants:
        started = time.perf_counter()
        result = run_gpu_child(variant, args)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        report["variants"][variant] = result
        for key in ("device_name", "torch", "diffusers", "peft", "device_total_gib"):
            if result.get(key) is not None:
                report.setdefault(key, result[key])
        s_iter = result.get("s")
        print(f"  {variant}: " + (f"{s_iter:.4f} s/iter" if s_iter is not None else "no timing")
              + (f", peak {result['peak_alloc_gib']:.2f} GiB" if result.get("peak_alloc_gib") is not None else "")
              + f" ({result['wall_s']} s wall)" + (f"  ERROR {result['error']}" if result.get("error") else ""),
              flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)

    rows = report["variants"]
    base = rows.get("shared", {})
    memory = f" ({report['device_total_gib']:.0f} GiB)" if report.get("device_total_gib") else ""
    print(f"\n{report.get('device_name', args.device)}{memory}; torch "
          f"{report.get('torch')}, diffusers {report.get('diffusers')}, peft {report.get('peft')}")
    print(f"  {'variant':15} {'s/iter':>8} {'x shared':>9} {'1st s':>7} {'peak GiB':>9} {'reserved':>9} "
          f"{'weights GiB':>12} {'fits 24GB':>9} {'gen params':>12} {'fake params':>12}")
    for variant, r in rows.items():
        ratio = r["s"] / base["s"] if r.get("s") and base.get("s") else None
        fits = {True: "yes", False: "no", None: "-"}[r.get("fits_24gb")]
        print(f"  {variant:15} {_fmt(r.get('s'), '.4f', 8)} {_fmt(ratio, '.2f', 9)} {_fmt(r.get('first_s'), '.2f', 7)} "
              f"{_fmt(r.get('peak_alloc_gib'), '.2f', 9)} {_fmt(r.get('peak_reserved_gib'), '.2f', 9)} "
              f"{_fmt(r.get('weight_gib'), '.3f', 12)} {fits:>9} {_fmt(r.get('gen_params'), ',d', 12)} "
              f"{_fmt(r.get('fake_params'), ',d', 12)}")
    published = rows.get("published", {})
    if base.get("weight_gib") and published.get("weight_gib"):
        print(f"  weight memory shared / three-copy = {base['weight_gib'] / published['weight_gib']:.2f} (target <= 0.5)"
              + (f"; peak shared / three-copy = {base['peak_alloc_gib'] / published['peak_alloc_gib']:.2f}"
                 if base.get("peak_alloc_gib") and published.get("peak_alloc_gib") else ""))
    errors = {v: r["error"] for v, r in rows.items() if r.get("error")}
    for variant, error in errors.items():
        print(f"  ERROR {variant}: {error}")
    for variant, r in rows.items():
        status = r.get("rotation") or {}
        if status.get("selected") == "triton":
            print(f"  {variant}: rotation kernel {status['cpu']}"
                  + (f" (fell back: {status['fallback_reason']})" if status.get("fallback_reason") else ""))
    print("  fits 24GB: peak reserved (allocations + allocator cache) < "
          f"{FITS_24GB_RESERVED_GIB} GiB, leaving room for the CUDA context on a 24 GiB card", flush=True)
    return 1 if errors else 0


def wait_for_quiet(limit_s: float = 300, threshold: float = 1.5) -> None:
    start = time.time()
    while os.getloadavg()[0] > threshold and time.time() - start < limit_s:
        time.sleep(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--skip-sd15", action="store_true", help="only the tiny U-Net")
    parser.add_argument("--configs", default="tiny,sd15", help="which of tiny,sd15 (CPU mode)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    gpu = parser.add_argument_group("--gpu mode")
    gpu.add_argument("--gpu", action="store_true", help="SD1.5 config on a GPU in bf16 (see the module doc)")
    gpu.add_argument("--device", default="cuda", help="--gpu: device (cpu: a check of the GPU code path)")
    gpu.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                     help="--gpu: base dtype (default bf16, fp32 with --device cpu)")
    gpu.add_argument("--tiny", action="store_true", help="--gpu: the tiny U-Net (a quick check of the code path)")
    gpu.add_argument("--batch", type=int, default=4)
    gpu.add_argument("--latent", type=int, default=64)
    parser.add_argument("--variants", default=None, help=f"default {','.join(VARIANTS)} (also: "
                        f"{','.join(EXTRA_VARIANTS)}); --gpu: {','.join(GPU_VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1; sd15: 1)")
    parser.add_argument("--profile", action="store_true", help="top operators of one iteration per variant")
    parser.add_argument("--wait-s", type=float, default=300, help="wait up to this long for a load average < 1.5")
    gpu.add_argument("--child-timeout", type=int, default=120, help="--gpu: seconds per variant before giving up")
    gpu.add_argument("--json", default=None, help="--gpu: write the results here (after every variant)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="shared", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.gpu_child:
        print(json.dumps(gpu_child(args)))
        return
    if args.gpu:
        args.variants = args.variants or ",".join(GPU_VARIANTS)
        sys.exit(gpu_main(args))
    cpu_main(args)


def cpu_main(args) -> None:
    """Every variant in fresh processes, interleaved round by round; medians over the rounds."""
    variants = [v for v in (args.variants or ",".join(VARIANTS)).split(",") if v]
    wait_for_quiet(args.wait_s)
    print(f"{args.threads} threads, glibc allocator defaults, load average at start {os.getloadavg()[0]:.2f}")
    iters, warmup = args.iters, args.warmup
    for config in [c for c in args.configs.split(",") if c and not (args.skip_sd15 and c == "sd15")]:
        latent, batch, gen_rank, fake_rank = CONFIGS[config]
        args.iters = iters or (3 if args.quick else 5)
        args.warmup = warmup if warmup is not None else 1
        rounds = args.rounds or (1 if args.quick else 3)
        if config == "sd15":
            args.iters, args.warmup = (iters or (1 if args.quick else 2)), 1
            rounds = args.rounds or 1
        runs = {v: [] for v in variants}
        for _ in range(rounds):
            for v in variants:
                runs[v].append(run_child(v, config, args))
        ref = "shared" if "shared" in variants else variants[0]
        print(f"\n{config}: latents {latent}x{latent}, batch {batch}, LoRaD ranks {gen_rank} (generator) / "
              f"{fake_rank} (fake); {rounds} interleaved round(s) of {args.warmup} warm-up + {args.iters} timed "
              f"iterations; load {os.getloadavg()[0]:.2f}")
        print(f"  {'variant':10} {'s/iter':>8} {'x ' + ref:>9} {'x lora':>7} {'CPU s/it':>9} {'x ' + ref:>9} "
              f"{'x lora':>7} {'1st iter s':>10} {'faults/it':>10} {'sys s/it':>9} {'peak RSS MB':>12} {'weights MB':>11} "
              f"{'gen params':>12} {'fake params':>12}  rounds s/iter")

        def ratio(results, key, other):  # median over rounds of the ratio within each round
            if other not in runs:
                return float("nan")
            return statistics.median(r[key] / q[key] for r, q in zip(results, runs[other]))

        for v, results in runs.items():
            med = {k: statistics.median(r[k] for r in results)
                   for k in ("s", "cpu_s", "first_s", "faults", "sys_s", "peak_mb")}
            r = results[0]
            print(f"  {v:10} {med['s']:8.3f} {ratio(results, 's', ref):9.2f} {ratio(results, 's', 'lora'):7.2f} "
                  f"{med['cpu_s']:9.3f} {ratio(results, 'cpu_s', ref):9.2f} {ratio(results, 'cpu_s', 'lora'):7.2f} "
                  f"{med['first_s']:10.2f} {med['faults']:10.0f} {med['sys_s']:9.2f} {med['peak_mb']:12.1f} "
                  f"{r['weight_mb']:11.1f} {r['gen_params']:12,d} {r['fake_params']:12,d}  "
                  + " ".join(f"{q['s']:.3f}" for q in results))
        if "published" in runs and "shared" in runs:
            shared, published = runs["shared"][0], runs["published"][0]
            print(f"  weight memory shared / three-copy = {shared['weight_mb'] / published['weight_mb']:.2f} (target "
                  f"<= 0.5); peak RSS shared / three-copy = {shared['peak_mb'] / published['peak_mb']:.2f}")
        for v, results in runs.items():
            status = results[0].get("rotation", {})
            if status.get("selected") in ("compiled", "triton"):
                print(f"  {v}: rotation kernel {status['cpu']}"
                      + (f" (fell back: {status['fallback_reason']})" if status.get("fallback_reason") else ""))
        for v, results in runs.items() if args.profile else ():
            print(f"\nProfile of one {config} iteration, {v} (self CPU time):\n{results[-1]['profile']}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
