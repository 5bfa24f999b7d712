"""Train a small text-to-image teacher of the Stable Diffusion family from scratch (``wadi-distill teacher``).

The model is SD's recipe at toy scale: a ``UNet2DConditionModel`` with cross-attention on the last
hidden state of a ``CLIPTextModel`` that reads the real CLIP BPE tokens, ε-prediction, SD's
scaled-linear β schedule (1000 steps, β 0.00085 → 0.012), trained with 10 % empty captions for
classifier-free guidance. It works in pixel space (1×16×16 grey images), so the pipeline has no VAE:
its "latents" are the images in [-1, 1]. Unlike SD the text encoder is trained with the U-Net, since no
pretrained CLIP exists here. The result is saved as a ``StableDiffusionPipeline`` folder (EMA weights).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import datasets
from .tokenizer import write_clip_tokenizer


@dataclass
class TeacherConfig:
    dataset: str = "fashion-mnist"
    image_size: int = 16
    steps: int = 12000
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    null_caption_rate: float = 0.1     # captions -> "" for classifier-free guidance
    text_hidden: int = 32
    max_tokens: int = 32
    channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int = 1
    seed: int = 0
    device: str = "cpu"                # cpu | cuda (the shipped teacher was trained on one GPU)
    save_every: int = 0                # also write the EMA pipeline every N steps (0: only at the end)
    stop_after: int = 0                # end after N steps, on the schedule of `steps` (0: run all steps)
    threads: int = 0                   # 0: torch's default
    init: str = ""                     # continue from this teacher folder's U-Net and text encoder ("": scratch)


def teacher_config(channels: str | None = None, **options) -> TeacherConfig:
    """A :class:`TeacherConfig` from command-line values: ``None`` keeps the default, ``channels`` is
    comma-separated, ``device`` cuda must exist."""
    from wadi_analysis.errors import UserError

    values = {k: v for k, v in options.items() if v is not None}
    if channels is not None:
        try:
            values["channels"] = tuple(int(c) for c in channels.split(","))
        except ValueError:
            raise UserError(f"--channels must be comma-separated integers, got {channels!r}") from None
    if values.get("device") == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if "init" in values:
        values["init"] = str(values["init"])
    return TeacherConfig(**values)


def unet_config(config: TeacherConfig) -> dict:
    """SD1.5's U-Net layout shrunk: self+cross attention at the two coarser levels, none at full size."""
    levels = len(config.channels)
    return dict(
        sample_size=config.image_size, in_channels=1, out_channels=1, layers_per_block=config.layers_per_block,
        block_out_channels=tuple(config.channels), norm_num_groups=8, cross_attention_dim=config.text_hidden,
        attention_head_dim=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
    )


def text_encoder_config(config: TeacherConfig, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=config.text_hidden,
                          intermediate_size=4 * config.text_hidden, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=config.max_tokens, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def sd_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)


def caption_ids(tokenizer, classes: tuple[str, ...]) -> torch.Tensor:
    """Token ids of every (class, template) caption, shape (classes, templates, tokens); row -1 of a
    separate call is the empty caption."""
    captions = [datasets.caption(classes, label, t) for label in range(len(classes))
                for t in range(len(datasets.TEMPLATES))]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.view(len(classes), len(datasets.TEMPLATES), -1)


def save_pipeline(folder: Path, unet, text_encoder, tokenizer, info: dict) -> None:
    """A StableDiffusionPipeline folder without VAE (pixel space), written atomically."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    index = json.loads((tmp / "model_index.json").read_text())
    (tmp / "model_index.json").write_text(json.dumps({**index, "vae": [None, None]}, indent=2) + "\n")
    # vocab.json + merges.txt define the tokenizer; the 3.6 MB tokenizer.json is rebuilt from them on load
    (tmp / "tokenizer" / "tokenizer.json").unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(tokenizer.init_kwargs["vocab_file"]).with_name(name), tmp / "tokenizer" / name)
    (tmp / "wadi_teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def train_teacher(config: TeacherConfig, out: str | Path, log=print) -> Path:
    """Train the teacher and write its pipeline folder to ``out``; returns ``out``."""
    import copy

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(out)
    data = datasets.load(config.dataset, "train", config.image_size)
    torch.manual_seed(config.seed)
    work = out.with_name(f".{out.name}.tokenizer")
    tokenizer = write_clip_tokenizer(work, config.max_tokens)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if config.init:
        # a second phase: the architecture is the init's; the data draws, schedule and EMA restart
        unet, text_encoder, init_info = _load_init(Path(config.init))
        if unet.config.sample_size != config.image_size:
            raise ValueError(f"--init {config.init}: its U-Net is for {unet.config.sample_size}px images, "
                             f"not --image-size {config.image_size}")
        unet, text_encoder = unet.to(device), text_encoder.to(device)
    else:
        text_encoder = CLIPTextModel(text_encoder_config(config, tokenizer)).to(device)
        unet = UNet2DConditionModel(**unet_config(config)).to(device)
        init_info = None
    ids = caption_ids(tokenizer, data.classes).to(device)
    null_ids = tokenizer([""], padding="max_length", max_length=config.max_tokens, return_tensors="pt").input_ids[0]
    null_ids = null_ids.to(device)
    alphas = sd_scheduler().alphas_cumprod.float().to(device)
    data_images, data_labels = data.images.to(device), data.labels.to(device)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), parameters))
    generator = torch.Generator().manual_seed(config.seed)
    started, running = time.perf_counter(), None
    last = min(config.steps, config.stop_after or config.steps)
    for step in range(1, last + 1):
        # all randomness from one CPU generator, so a run is the same draw on any device
        index = torch.randint(0, len(data), (config.batch_size,), generator=generator).to(device)
        images, labels = data_images[index], data_labels[index]
        templates = torch.randint(0, len(datasets.TEMPLATES), (config.batch_size,), generator=generator).to(device)
        tokens = ids[labels, templates]
        dropped = (torch.rand(config.batch_size, generator=generator) < config.null_caption_rate).to(device)
        tokens[dropped] = null_ids
        timesteps = torch.randint(0, len(alphas), (config.batch_size,), generator=generator).to(device)
        noise = torch.randn(images.shape, generator=generator).to(device)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise
        hidden = text_encoder(tokens).last_hidden_state
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in ema_pairs:
                averaged.lerp_(live, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == last:
            log(f"step {step}/{config.steps}  loss {running:.4f}  {time.perf_counter() - started:.0f} s")
        if step == last or (config.save_every and step % config.save_every == 0):
            info = {"config": asdict(config), "step": step, "classes": list(data.classes),
                    "seconds": round(time.perf_counter() - started), "device": _device_name(device),
                    "command": command_line(config)}
            if init_info is not None:
                info["init_from"] = init_info
            save_pipeline(out, copy.deepcopy(ema_unet).cpu(), copy.deepcopy(ema_text).cpu(), tokenizer, info)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _load_init(folder: Path):
    """U-Net, text encoder and provenance of an earlier teacher folder (``--init``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (folder / "unet").is_dir() or not (folder / "text_encoder").is_dir():
        raise FileNotFoundError(f"--init {folder}: not a teacher pipeline folder (needs unet/ and text_encoder/)")
    provenance = folder / "wadi_teacher.json"
    info = json.loads(provenance.read_text()) if provenance.is_file() else {"folder": str(folder)}
    return (UNet2DConditionModel.from_pretrained(folder / "unet"),
            CLIPTextModel.from_pretrained(folder / "text_encoder"), info)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def command_line(config: TeacherConfig) -> str:
    """The ``wadi-distill teacher`` command that reproduces ``config``."""
    return "wadi-distill teacher " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _options(config))


def _options(config: TeacherConfig):
    defaults = TeacherConfig()
    for key, value in asdict(config).items():
        if value != getattr(defaults, key) and key not in ("threads", "save_every"):
            yield key, ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
