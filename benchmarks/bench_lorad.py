"""Benchmark LoRaD training and inference cost against LoRA, DoRA, full fine-tuning and hook-style LoRaD.

What is measured (CPU, float32, ``torch.set_num_threads(2)`` unless ``--threads``):

1. One training step -- forward, MSE-to-zero loss, backward, ``AdamW.step()``, ``zero_grad()`` -- on
   * ``unet``:  the whole tiny SD1.5-layout U-Net (``tiny_sd15_config()``), latents 8x4x16x16,
     77 text tokens of dim 64; targets = preset ``sd-unet-generator`` at ``--unet-rank`` (default 16:
     the tiny model's Linear layers are 32-256 wide, so rank 32 would give theta = A @ B full rank
     for most of them);
   * ``block``: one SD-sized ``BasicTransformerBlock(640, 8 heads x 80, cross 768, geglu)`` on
     hidden states (2, 1024, 640) (requiring grad, as inside a deep network) and encoder states
     (2, 77, 768); targets = all its Linear layers at ``--block-rank`` (default 256).

   Variants: ``lorad`` (this project: a parametrization, ``weight`` is the rotated weight, one matmul),
   ``rebuild`` (``lorad`` with the rotation as it was before issue 16: ``patch_rebuild_every_use``),
   ``lora`` (peft, ranks from ``lora_ranks_at_equal_budget``: same trainable parameter count),
   ``dora`` (peft, LoRA's ranks), ``full`` (fine-tune the target modules' weights and biases) and
   ``hook`` (the published WaDi code's style, written here as the baseline: a forward hook on each
   target Linear recomputes the output with ``rotate_rows(weight, A @ B)`` after the base Linear
   already ran -- two matmuls per layer); ``lorad-compiled`` (not in the default set: ``lorad`` with the
   rotation compiled by torch.compile, ``set_rotation_kernel("compiled")``). Every variant runs in a fresh subprocess, and the variants
   run interleaved for ``--rounds`` rounds; the figure is the best round's median ms/step over the timed
   steps after warm-up (a round hit by another process's load is discarded), the same for the process
   CPU time per step (``time.process_time``, less disturbed by other processes), and the peak RSS growth
   during the steps
   (``/proc/self/clear_refs`` <- 5 after the model, optimizer and inputs are built, then VmHWM minus
   the VmRSS at that reset: activations, gradients, AdamW state, workspace).
2. Inference (``torch.no_grad`` forward) of the tiny U-Net at batch 8: base model, LoRaD merged with
   ``merge_and_unload``, LoRaD unmerged (adapter active), peft LoRA unmerged; timed interleaved in
   one process, medians (best of the rounds), ratios to base.

Targets from the issue: LoRaD <= 1.05x LoRA, >= 1.3x faster than hook style; merged LoRaD = 1.00x base.

GPU mode (``--gpu``, run by ``benchmarks/gpu_run.sh``): the ``block`` case's training step on
``--device`` (default cuda) at batches ``--gpu-batches`` (default 2 and 8), variants ``lora,lorad,hook``
in ONE process: the block is cast to bf16 before the adapters are attached, trainable parameters are
float32, the forward runs under ``torch.autocast(bf16)`` (as in ``bench_distill --gpu``); each variant
is warmed up (its CUDA memory peak over those steps, AdamW state included, minus what was allocated
before it), then the variants are timed in ``--rounds`` interleaved rounds of ``--iters`` steps with one
``torch.cuda.synchronize`` per round; the figure is the best round's mean ms/step. ``--device cpu``
checks the code path here.

Run:  python benchmarks/bench_lorad.py [--quick] [--threads N] [--cases unet,block] [--variants lora,lorad,rebuild] [--profile]
      python benchmarks/bench_lorad.py --gpu [--json PATH]
      python benchmarks/bench_lorad.py --products [--cases unet]
``--products`` only measures whether grouping the theta = A @ B products of same-shape layers (one
``torch.bmm`` per group instead of one ``torch.mm`` per layer) could pay: the step's time, its products'
time one by one and grouped, in one process (``products_child``).
``--profile`` adds the top ops (torch.profiler, self CPU time) of one training step per case, LoRaD vs LoRA.
On 2 cores, any other busy process makes every figure several times slower: check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("lora", "lorad", "rebuild", "hook", "dora", "full")
EXTRA_VARIANTS = ("lorad-compiled",)  # lorad with set_rotation_kernel("compiled") in its process; not by default


# ----------------------------------------------------------------------------- models
def build(case: str, args):
    """(model, inputs, loss function, LoRaD targets) for one case, seeded."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from torch import nn
    from wadi_analysis.examples import tiny_sd15_config
    from wadi_distill import lorad

    torch.manual_seed(0)
    if case == "unet":
        model = UNet2DConditionModel(**tiny_sd15_config())
        inputs = (torch.randn(8, 4, 16, 16), torch.randint(0, 1000, (8,)), torch.randn(8, 77, 64))
        targets = lorad.resolve_preset(model, "sd-unet-generator", rank=args.unet_rank)
        return model, inputs, lambda m, x: m(*x).sample, targets
    model = BasicTransformerBlock(dim=640, num_attention_heads=8, attention_head_dim=80, cross_attention_dim=768,
                                  activation_fn="geglu")
    batch = getattr(args, "block_batch", 2)
    inputs = (torch.randn(batch, 1024, 640, requires_grad=True), torch.randn(batch, 77, 768))
    targets = {n: args.block_rank for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return model, inputs, lambda m, x: m(x[0], encoder_hidden_states=x[1]), targets


def attach_hook_style(model, targets: dict[str, int], seed: int = 0) -> int:
    """Hook-style LoRaD (the baseline): the base Linear runs, then a hook redoes it with the rotated weight."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from wadi_distill.lorad.rotation import rotate_rows

    def rotated_output(module, inputs, output):  # noqa: ARG001 - the base output is thrown away
        theta = module.hook_A @ module.hook_B
        return F.linear(inputs[0], rotate_rows(module.weight, theta).to(module.weight.dtype), module.bias)

    generator = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    modules, count = dict(model.named_modules()), 0
    for name, rank in targets.items():
        module = modules[name]
        out_features, pairs = module.weight.shape[0], module.weight.shape[1] // 2
        module.hook_A = nn.Parameter(1e-3 * torch.randn(out_features, rank, generator=generator))
        module.hook_B = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, pairs), generator=generator))
        module.register_forward_hook(rotated_output)
        count += module.hook_A.numel() + module.hook_B.numel()
    return count


def patch_rebuild_every_use() -> None:
    """LoRaD as it was before issue 16 (this process only), copied here as it was: the rotated weight
    rebuilt on every use (fresh theta, cos, sin and W', four strided element-wise passes; theta saved,
    cos, sin and W' recomputed in backward), and switching adapters by several named passes over the
    model's modules (``adapters.activate``, as ``wadi_distill.distill`` calls it)."""
    import torch
    from wadi_analysis.decompose import rows
    from wadi_analysis.geometry import paired_columns
    from wadi_distill import adapters, distill
    from wadi_distill.lorad.model import LoRaDParametrization, lorad_modules

    def rotate(weight_rows, cos, sin):
        out = torch.empty_like(weight_rows)
        even, odd, unpaired = paired_columns(weight_rows)
        out_even, out_odd, out_unpaired = paired_columns(out)
        torch.mul(even, cos, out=out_even).addcmul_(odd, sin, value=-1)
        torch.mul(even, sin, out=out_odd).addcmul_(odd, cos)
        out_unpaired.copy_(unpaired)
        return out

    class PairRotationBefore(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight_rows, theta):
            ctx.save_for_backward(weight_rows, theta)
            return rotate(weight_rows.to(theta.dtype), torch.cos(theta), torch.sin(theta))

        @staticmethod
        def backward(ctx, grad):
            weight_rows, theta = ctx.saved_tensors
            cos, sin = torch.cos(theta), torch.sin(theta)
            grad_weight = grad_theta = None
            if ctx.needs_input_grad[1]:
                even, odd, _ = paired_columns(weight_rows.to(theta.dtype))
                grad_even, grad_odd, _ = paired_columns(grad)
                rotated_even = (even * cos).addcmul_(odd, sin, value=-1)
                rotated_odd = (even * sin).addcmul_(odd, cos)
                grad_theta = (grad_odd * rotated_even).addcmul_(grad_even, rotated_odd, value=-1)
            if ctx.needs_input_grad[0]:
                grad_weight = rotate(grad, cos, -sin).to(weight_rows.dtype)
            return grad_weight, grad_theta

    def forward(self, weight):
        if self.active is None or self.active not in self.adapters or self.active == self.merged:
            return weight
        theta = self.adapters[self.active].theta()
        return PairRotationBefore.apply(rows(weight), theta).reshape(weight.shape).to(weight.dtype)

    def adapter_names(model):
        names = {}
        for _, _, p in lorad_modules(model):
            names.update(dict.fromkeys(p.adapters))
        return list(names)

    def set_adapter(model, name):
        if name is not None and name not in adapter_names(model):
            raise ValueError(f"no adapter named {name!r}")
        for _, _, p in lorad_modules(model):
            p.active = name if name in p.adapters else None
            for adapter_name, adapter in p.adapters.items():
                adapter.requires_grad_(adapter_name == name)

    def activate(model, name):
        if adapter_names(model):
            set_adapter(model, name if name in adapter_names(model) else None)
        for layer in adapters._peft_layers(model):
            layer.enable_adapters(name is not None and name in layer.lora_A)

    LoRaDParametrization.forward = forward
    adapters.activate = distill.activate = activate


def prepare(case: str, method: str, args, device=None, dtype=None):
    """Model with ``method`` attached; returns (model, inputs, forward, trainable count, LoRA ranks).

    With ``device``/``dtype`` (the --gpu mode) the frozen model is cast before anything is attached, the
    trainable parameters are float32 (LoRaD's and the hook's are made so; peft's are cast, as
    ``get_peft_model`` does by default), and the floating inputs take ``dtype``.
    """
    import torch
    from wadi_distill import adapters

    model, inputs, forward, targets = build(case, args)
    if device is not None:
        model.to(device=device, dtype=dtype)
    lora_ranks = adapters.lora_ranks_at_equal_budget(model, targets)
    if method == "rebuild":  # LoRaD before issue 16, in this process (every variant has its own)
        patch_rebuild_every_use()
        method = "lorad"
    if method == "lorad-compiled":  # the torch.compile rotation (wadi_distill.lorad.compiled), this process
        from wadi_distill.lorad.rotation import set_rotation_kernel

        set_rotation_kernel("compiled")
        method = "lorad"
    if method == "hook":
        count = attach_hook_style(model, targets)
    else:
        count = adapters.attach(model, method, lora_ranks if method in ("lora", "dora") else targets)
    if device is not None:
        model.to(device)  # the hook's factors are made on the CPU; .to(device) keeps their float32
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        inputs = tuple(t.detach().to(device, dtype if t.is_floating_point() else None).requires_grad_(t.requires_grad)
                       for t in inputs)
    return model, inputs, forward, count, lora_ranks


# ----------------------------------------------------------------------------- children
def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def train_child(args) -> dict:
    import torch

    model, inputs, forward, count, lora_ranks = prepare(args.case, args.method, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = forward(model, inputs).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    rss_at_reset = proc_status_kb("VmRSS")
    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(args.iters):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = proc_status_kb("VmHWM") - rss_at_reset
    ranks = sorted(set(lora_ranks.values()))
    return {"ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu_times), "params": count,
            "peak_mb": peak / 1024,
            "lora_ranks": f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])}


def infer_child(args) -> dict:
    import copy

    import torch
    from wadi_distill import adapters, lorad

    base, inputs, forward, targets = build("unet", args)
    base.eval()
    models = {"base": base}
    for label in ("merged", "lorad"):
        model = copy.deepcopy(base)
        adapters.attach(model, "lorad", targets)
        generator = torch.Generator().manual_seed(1)  # same angles in both copies, non-zero: a real rotation
        for param in lorad.adapter_parameters(model, "default"):
            if not param.data.any():  # A (zero init)
                param.data.normal_(0, 1e-2, generator=generator)
        models[label] = lorad.merge_and_unload(model, "default") if label == "merged" else model
    models["lora"] = copy.deepcopy(base)
    adapters.attach(models["lora"], "lora", adapters.lora_ranks_at_equal_budget(base, targets))
    times = {k: [] for k in models}
    with torch.no_grad():
        outputs = {k: forward(models[k], inputs) for k in ("base", "merged", "lorad")}
        check = [(outputs["merged"] - outputs[k]).abs().max().item() for k in ("lorad", "base")]
        for i in range(args.warmup + args.iters):
            for label, model in models.items():
                start = time.perf_counter()
                forward(model, inputs)
                if i >= args.warmup:
                    times[label].append(time.perf_counter() - start)
    return {"ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}, "merge_check": check}


def profile_child(args) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for method in ("lorad", "lora"):
        model, inputs, forward, _, _ = prepare(args.case, method, args)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for i in range(args.warmup + 1):
            with profile(activities=[ProfilerActivity.CPU]) if i == args.warmup else contextlib.nullcontext() as prof:
                forward(model, inputs).float().pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        tables[method] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return tables


def products_child(args) -> dict:
    """Do the theta = A @ B products pay for their launches (issue 16's grouped products)? One LoRaD
    training step of ``args.case`` timed (median), then, in the same process, the products that step
    runs -- per adapted layer theta = A @ B (forward), dL/dA = dtheta @ B^T and dL/dB = A^T @ dtheta
    (backward) -- timed as they run now (one ``torch.mm`` each) and grouped (layers of the same
    (out, rank, pairs) as one ``torch.bmm`` each over factors already stacked: grouping's best case,
    the stacking not counted)."""
    import torch
    from wadi_distill.lorad.model import lorad_modules

    model, inputs, forward, _, _ = prepare(args.case, "lorad", args)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        forward(model, inputs).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    factors = [(p.adapters[p.active].A.detach(), p.adapters[p.active].B.detach())
               for _, _, p in lorad_modules(model) if p.active is not None]
    groups: dict[tuple, list] = {}
    for a, b in factors:
        groups.setdefault((a.shape[0], a.shape[1], b.shape[1]), []).append((a, b))
    stacked = [(torch.stack([a for a, _ in g]), torch.stack([b for _, b in g]), torch.randn(len(g), k[0], k[2]))
               for k, g in groups.items()]
    grads = [torch.randn(a.shape[0], b.shape[1]) for a, b in factors]

    def per_layer():
        for (a, b), g in zip(factors, grads):
            torch.mm(a, b), torch.mm(g, b.t()), torch.mm(a.t(), g)

    def grouped():
        for a, b, g in stacked:
            torch.bmm(a, b), torch.bmm(g, b.transpose(1, 2)), torch.bmm(a.transpose(1, 2), g)

    def median_ms(fn, n):
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    with torch.no_grad():
        check = max((torch.bmm(a, b)[i] - torch.mm(a[i], b[i])).abs().max().item() /
                    torch.mm(a[i], b[i]).abs().max().clamp_min(1e-30).item()
                    for a, b, _ in stacked for i in range(a.shape[0]))
    rounds = {"step": [], "per_layer": [], "grouped": []}
    for _ in range(3):  # interleaved
        rounds["step"].append(median_ms(step, args.iters))
        with torch.no_grad():
            rounds["per_layer"].append(median_ms(per_layer, 5 * args.iters))
            rounds["grouped"].append(median_ms(grouped, 5 * args.iters))
    return {"layers": len(factors), "groups": len(groups), "products": 3 * len(factors),
            "grouped_launches": 3 * len(groups), "bmm_vs_mm_max_rel": check,
            **{k: min(v) for k, v in rounds.items()}}


# ----------------------------------------------------------------------------- --gpu
def gpu_main(args) -> int:
    """Training step of the SD-sized block on ``args.device`` in one process: every variant built, warmed
    up (the memory peak of those steps measured per variant), then timed in interleaved rounds."""
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    variants = [v for v in args.variants.split(",") if v]
    if "rebuild" in variants:
        sys.exit("--gpu runs every variant in one process: 'rebuild' (a patch of the library) cannot be one")
    report = {"mode": "gpu", "case": "block", "device": args.device, "dtype": args.dtype, "rank": args.block_rank,
              "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds, "torch": torch.__version__,
              "batches": {}}
    if cuda:
        report["device_name"] = torch.cuda.get_device_name(device)
    print(f"bench_lorad --gpu: {report.get('device_name', args.device)}, torch {torch.__version__}; SD-sized "
          f"BasicTransformerBlock(640, cross 768), hidden (B, 1024, 640), LoRaD rank {args.block_rank}, base "
          f"{args.dtype}{' + autocast' if dtype != torch.float32 else ''}, trainable fp32; {args.warmup} warm-up, "
          f"best of {args.rounds} interleaved rounds of {args.iters} steps (one synchronize per round)", flush=True)

    def make_step(model, inputs, forward, optimizer):
        amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext

        def step():
            with amp():
                loss = forward(model, inputs).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    status = 0
    for batch in [int(b) for b in args.gpu_batches.split(",")]:
        args.block_batch = batch
        rows, steps = {}, {}
        for method in variants:
            try:
                model, inputs, forward, count, lora_ranks = prepare("block", method, args, device, dtype)
                model.train()
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                step = make_step(model, inputs, forward, optimizer)
                sync()
                if cuda:
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(args.warmup):  # AdamW's state is made here: the peak includes it
                    step()
                sync()
                ranks = sorted(set(lora_ranks.values()))
                rows[method] = {"params": count, "error": None, "times_ms": [],
                                "lora_ranks": f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0]),
                                "peak_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None}
                steps[method] = step
            except Exception as exc:  # recorded; the other variants go on
                message = str(exc).strip().splitlines()
                rows[method] = {"error": f"{type(exc).__name__}: {message[0][:300] if message else ''}"}
        for _ in range(args.rounds):
            for method, step in list(steps.items()):
                try:
                    sync()
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        step()
                    sync()
                    rows[method]["times_ms"].append(1e3 * (time.perf_counter() - start) / args.iters)
                except Exception as exc:
                    rows[method]["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                    del steps[method]
        for row in rows.values():
            row["ms"] = min(row["times_ms"]) if row.get("times_ms") else None
        report["batches"][str(batch)] = rows
        ms = {m: r["ms"] for m, r in rows.items() if r.get("ms")}
        print(f"\nTraining step, block, batch {batch} (LoRaD rank {args.block_rank}, LoRA ranks "
              f"{next((r['lora_ranks'] for r in rows.values() if r.get('lora_ranks')), '-')})")
        print(f"  {'variant':8} {'ms/step':>9} {'x LoRA':>7} {'x LoRaD':>8} {'trainable':>11} {'peak MB':>8}  rounds ms")
        for method, r in rows.items():
            if r.get("error"):
                status = 1
                print(f"  {method:8} ERROR {r['error']}")
                continue
            lora_x = f"{r['ms'] / ms['lora']:7.2f}" if "lora" in ms else f"{'-':>7}"
            lorad_x = f"{r['ms'] / ms['lorad']:8.2f}" if "lorad" in ms else f"{'-':>8}"
            peak = f"{r['peak_mb']:8.1f}" if r["peak_mb"] is not None else f"{'-':>8}"
            print(f"  {method:8} {r['ms']:9.2f} {lora_x} {lorad_x} {r['params']:11,d} {peak}  "
                  + " ".join(f"{t:.2f}" for t in r["times_ms"]))
        if {"lora", "lorad", "hook"} <= set(ms):
            print(f"  LoRaD / LoRA = {ms['lorad'] / ms['lora']:.2f} (target <= 1.05); "
                  f"hook / LoRaD = {ms['hook'] / ms['lorad']:.2f} (target >= 1.3)", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    return status


# ----------------------------------------------------------------------------- parent
def run_child(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--threads", str(args.threads),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--unet-rank", str(args.unet_rank),
           "--block-rank", str(args.block_rank), "--block-batch", str(args.block_batch)] + \
        [f"--{k}={v}" for k, v in extra.items()]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="unet,block")
    parser.add_argument("--unet-rank", type=int, default=16)
    parser.add_argument("--block-rank", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, best kept (default 3)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--block-batch", type=int, default=2, help="batch of the block case")
    gpu = parser.add_argument_group("--gpu mode (the block case only, one process, interleaved)")
    gpu.add_argument("--gpu", action="store_true", help="the block's training step on --device, bf16")
    gpu.add_argument("--device", default="cuda", help="--gpu: device (cpu: a check of the GPU code path)")
    gpu.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    gpu.add_argument("--gpu-batches", default="2,8", help="--gpu: block batches to measure")
    parser.add_argument("--variants", default=None, help=f"of {','.join(VARIANTS)} (default: all; --gpu: lora,lorad,hook)")
    gpu.add_argument("--json", default=None, help="--gpu: write the results here")
    parser.add_argument("--products", action="store_true",
                        help="only: share of the theta products in a step, per layer vs grouped (bmm)")
    parser.add_argument("--child", choices=("train", "infer", "profile", "products"), help=argparse.SUPPRESS)
    parser.add_argument("--case", default="unet", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lorad", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu:
        args.variants = args.variants or "lora,lorad,hook"
        args.iters = args.iters or 20
        args.warmup = args.warmup if args.warmup is not None else 5
        args.rounds = args.rounds or 3
        sys.exit(gpu_main(args))
    args.iters = args.iters or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 3)

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        children = {"train": train_child, "infer": infer_child, "profile": profile_child, "products": products_child}
        print(json.dumps(children[args.child](args)))
        return

    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, {args.warmup} warm-up + {args.iters} timed steps, "
          f"best of {args.rounds} rounds, load average {os.getloadavg()[0]:.2f}")
    if args.products:
        for case in args.cases.split(","):
            r = run_child("products", args, case=case)
            print(f"\ntheta products of one LoRaD training step, {case}: {r['layers']} adapted layers in "
                  f"{r['groups']} same-shape groups; step {r['step']:.1f} ms; the step's {r['products']} products "
                  f"{r['per_layer']:.2f} ms one mm each ({r['per_layer'] / r['step']:.1%} of the step), "
                  f"{r['grouped']:.2f} ms as {r['grouped_launches']} bmm ({r['grouped'] / r['per_layer']:.2f}x); "
                  f"bmm vs mm max rel. difference {r['bmm_vs_mm_max_rel']:.1e}; load {os.getloadavg()[0]:.2f}")
        return
    for case in args.cases.split(","):
        rank = args.unet_rank if case == "unet" else args.block_rank
        rows = {}
        variants = [v for v in (args.variants or ",".join(VARIANTS)).split(",") if v]
        unknown = [v for v in variants if v not in VARIANTS + EXTRA_VARIANTS]
        if unknown:
            print(f"error: unknown variant {unknown[0]!r}; one of {', '.join(VARIANTS + EXTRA_VARIANTS)}", file=sys.stderr)
            sys.exit(2)
        for _ in range(args.rounds):
            for m in variants:
                r = run_child("train", args, case=case, method=m)
                best = rows.get(m, r)
                rows[m] = {**(r if r["ms"] <= best["ms"] else best), "cpu_ms": min(r["cpu_ms"], best["cpu_ms"])}
        lora, lorad_ms = rows["lora"], rows["lorad"]
        print(f"\nTraining step, {case} (LoRaD rank {rank}, LoRA/DoRA ranks {lora['lora_ranks']})")
        print(f"  {'variant':8} {'ms/step':>9} {'x LoRA':>7} {'x LoRaD':>8} {'CPU ms':>8} {'x LoRA':>7} {'x LoRaD':>8} "
              f"{'trainable':>11} {'peak MB':>8}")
        for method, r in rows.items():
            print(f"  {method:8} {r['ms']:9.1f} {r['ms'] / lora['ms']:7.2f} {r['ms'] / lorad_ms['ms']:8.2f} "
                  f"{r['cpu_ms']:8.1f} {r['cpu_ms'] / lora['cpu_ms']:7.2f} {r['cpu_ms'] / lorad_ms['cpu_ms']:8.2f} "
                  f"{r['params']:11,d} {r['peak_mb']:8.1f}")
        print(f"  LoRaD / LoRA = {lorad_ms['ms'] / lora['ms']:.2f} (target <= 1.05)"
              + (f"; hook / LoRaD = {rows['hook']['ms'] / lorad_ms['ms']:.2f} (target >= 1.3)" if "hook" in rows else "")
              + f"; load {os.getloadavg()[0]:.2f}")

    results = [run_child("infer", args) for _ in range(args.rounds)]
    ms = {k: min(r["ms"][k] for r in results) for k in results[0]["ms"]}
    result = results[0]
    print(f"\nInference, tiny U-Net batch 8, no_grad (LoRaD rank {args.unet_rank}; "
          f"max |merged - unmerged| {result['merge_check'][0]:.1e}, |merged - base| {result['merge_check'][1]:.1e})")
    for label, text in (("base", "base model"), ("merged", "LoRaD merged (merge_and_unload)"),
                        ("lorad", "LoRaD unmerged"), ("lora", "LoRA unmerged")):
        print(f"  {text:32} {ms[label]:8.1f} ms  {ms[label] / ms['base']:5.2f}x base")
    print(f"load average at end {os.getloadavg()[0]:.2f}")

    for case in args.cases.split(",") if args.profile else ():
        for method, table in run_child("profile", args, case=case).items():
            print(f"\nProfile of one {case} training step, {method} (self CPU time):\n{table}")


if __name__ == "__main__":
    main()
