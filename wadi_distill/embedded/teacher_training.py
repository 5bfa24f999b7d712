"""Train a small text-to-image teacher of the Stable Diffusion family from scratch (``wadi-distill teacher``).

The model is SD's recipe at toy scale: a ``UNet2DConditionModel`` with cross-attention on the last
hidden state of a ``CLIPTextModel`` that reads the real CLIP BPE tokens, ε-prediction, SD's
scaled-linear β schedule (1000 steps, β 0.00085 → 0.012), trained with 10 % empty captions for
classifier-free guidance. With ``--vae`` (an ``AutoencoderKL`` written by ``wadi-distill vae``) it
works in that autoencoder's latent space as SD does: each step draws z ~ q(z|x) of the training
images and scales it by the VAE's ``scaling_factor``, and the pipeline ships the VAE, so plain
diffusers loads and runs it. Without ``--vae`` it works in pixel space (the pipeline has no VAE and
its "latents" are the images in [-1, 1]). Unlike SD the text encoder is trained with the U-Net, since
no pretrained CLIP exists here. The result is a ``StableDiffusionPipeline`` folder (EMA weights).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wadi_analysis.errors import InvalidValue
from wadi_analysis.outputs import check_output, staged_folder

from . import datasets
from .optimisation import adamw_warmup_cosine, clipped_step, ema_update
from .tokenizer import write_clip_tokenizer


@dataclass
class TeacherConfig:
    dataset: str = "fashion-mnist"
    image_size: int = 32
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
    vae: str = ""                      # train in this AutoencoderKL folder's latent space ("": pixel space)


PROVENANCE = "wadi_teacher.json"  # the file that marks a folder this command wrote


def command_line_values(channels: str | None, options: dict) -> dict:
    """Command-line values of a training command: ``None`` keeps the default, ``channels`` is
    comma-separated block widths."""
    values = {k: v for k, v in options.items() if v is not None}
    if channels is not None:
        try:
            values["channels"] = tuple(int(c) for c in channels.split(","))
        except ValueError:
            raise InvalidValue(f"--channels must be comma-separated integers, got {channels!r}") from None
    return values


def teacher_config(channels: str | None = None, **options) -> TeacherConfig:
    """A checked :class:`TeacherConfig` from command-line values (:func:`command_line_values`)."""
    values = command_line_values(channels, options)
    for path in ("init", "vae"):
        if path in values:
            values[path] = str(values[path])
    return check_teacher_config(TeacherConfig(**values))


def _whole(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidValue(f"--{name.replace('_', '-')} must be an integer >= {low}, not {value!r}")


def _fraction(name: str, value, *, positive: bool = False, below_one: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > 0 if positive else value >= 0) and (value < 1 if below_one else True)
    if not ok:
        expected = "a number > 0" if positive else "a number from 0 to below 1" if below_one else "a number >= 0"
        raise InvalidValue(f"--{name.replace('_', '-')} must be {expected}, not {value!r}")


def check_teacher_config(config: TeacherConfig) -> TeacherConfig:
    """Every option in range, and an architecture the U-Net can build, before anything is read or written."""
    for name in ("steps", "batch_size", "image_size", "warmup", "layers_per_block", "max_tokens"):
        _whole(name, getattr(config, name), 1)
    for name in ("save_every", "stop_after", "threads"):
        _whole(name, getattr(config, name), 0)
    _whole("seed", config.seed, -2 ** 62)
    _fraction("lr", config.lr, positive=True)
    _fraction("ema_decay", config.ema_decay, below_one=True)
    _fraction("null_caption_rate", config.null_caption_rate, below_one=True)
    _check_architecture(config)
    _check_device(config.device)
    return config


def _check_architecture(config: TeacherConfig) -> None:
    # GroupNorm of 8 groups and 4-wide attention heads: block widths are multiples of 8; the text
    # encoder has 2 heads; each level below the first halves the image
    if not config.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 8 or c % 8
                                  for c in config.channels):
        raise InvalidValue(f"--channels must be positive multiples of 8, not {','.join(map(str, config.channels))!r}")
    if isinstance(config.text_hidden, bool) or not isinstance(config.text_hidden, int) or \
            config.text_hidden < 2 or config.text_hidden % 2:
        raise InvalidValue(f"--text-hidden must be an even integer >= 2, not {config.text_hidden!r}")
    halvings = 2 ** (len(config.channels) - 1) * (4 if config.vae else 1)  # the VAE's own two halvings
    if config.image_size % halvings:
        raise InvalidValue(f"--image-size {config.image_size} must be a multiple of {halvings} for "
                           f"{len(config.channels)} U-Net levels" + (" in a latent space of 1/4 the size" if config.vae else ""))


def _check_device(device: str) -> None:
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise InvalidValue(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
        raise InvalidValue(f"--device {device}: no such CUDA device is available")


def is_teacher_folder(folder: Path) -> bool:
    """A folder this command wrote (it holds the provenance file)."""
    return (Path(folder) / PROVENANCE).is_file()


def unet_config(config: TeacherConfig, latent_channels: int = 1, latent_size: int | None = None) -> dict:
    """SD1.5's U-Net layout shrunk: self+cross attention at the two coarser levels, none at full size.
    In pixel space its input is the 1×S×S image; in latent space the VAE's latents."""
    levels = len(config.channels)
    return dict(
        sample_size=latent_size or config.image_size, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=config.layers_per_block,
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
    """SD's noise schedule; the pipeline samples with DDIM on trailing timesteps (the last one is
    t = 999, as in :func:`wadi_distill.sampling.ddim`)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


def caption_ids(tokenizer, classes: tuple[str, ...]) -> torch.Tensor:
    """Token ids of every (class, template) caption, shape (classes, templates, tokens); row -1 of a
    separate call is the empty caption."""
    captions = [datasets.caption(classes, label, t) for label in range(len(classes))
                for t in range(len(datasets.TEMPLATES))]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.view(len(classes), len(datasets.TEMPLATES), -1)


def save_pipeline(folder: Path, unet, text_encoder, tokenizer, info: dict, vae=None) -> None:
    """A StableDiffusionPipeline folder (without VAE in pixel space), written into a staged sibling and
    renamed into place only when complete."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with staged_folder(folder) as tmp:
        pipe.save_pretrained(tmp)
        if vae is None:
            index = json.loads((tmp / "model_index.json").read_text())
            (tmp / "model_index.json").write_text(json.dumps({**index, "vae": [None, None]}, indent=2) + "\n")
        # vocab.json + merges.txt define the tokenizer; the 3.6 MB tokenizer.json is rebuilt from them on load
        (tmp / "tokenizer" / "tokenizer.json").unlink()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(Path(tokenizer.init_kwargs["vocab_file"]).with_name(name), tmp / "tokenizer" / name)
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")


def train_teacher(config: TeacherConfig, out: str | Path, log=print, *, overwrite: bool = False) -> Path:
    """Train the teacher and write its pipeline folder to ``out``; returns ``out``.

    Everything is checked before anything is written: the options, ``out`` (a non-empty folder this
    command did not write is replaced only with ``overwrite``), the ``--init`` teacher and the data."""
    check_teacher_config(config)
    out = check_output(out, [p for p in (config.init, config.vae) if p], folder=True, replace=True,
                       overwrite=overwrite, ours=is_teacher_folder)
    init = _load_init(Path(config.init)) if config.init else None
    vae = _load_vae(Path(config.vae), config) if config.vae else None
    data = datasets.load(config.dataset, "train", config.image_size)
    if config.threads:
        torch.set_num_threads(config.threads)
    # the tokenizer's files live in a private temporary folder: beside --out only the output appears
    with tempfile.TemporaryDirectory(prefix="wadi-teacher-tokenizer-") as work:
        _train(config, out, data, write_clip_tokenizer(work, config.max_tokens), init, vae, log)
    return out


def _load_vae(folder: Path, config: TeacherConfig):
    """The ``--vae`` autoencoder, checked to fit: grey images of ``--image-size``, two halvings."""
    from diffusers import AutoencoderKL

    from ..teacher import _quiet_libraries

    _quiet_libraries()
    if not (folder / "config.json").is_file():
        raise InvalidValue(f"--vae {folder} is not an AutoencoderKL folder (write one with `wadi-distill vae`)")
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise InvalidValue(f"--vae {folder}: not a loadable AutoencoderKL (diffusion_pytorch_model.safetensors "
                           "is missing)")
    try:
        # safetensors only (what `wadi-distill vae` writes): never a pickle fallback
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception:  # diffusers raises many kinds for a broken folder; all mean the same
        raise InvalidValue(f"--vae {folder}: not a loadable AutoencoderKL") from None
    if vae.config.in_channels != 1 or len(vae.config.block_out_channels) != 3:
        raise InvalidValue(f"--vae {folder}: an autoencoder of grey images with 3 levels (1/4 size) is expected")
    if not math.isfinite(vae.config.scaling_factor) or vae.config.scaling_factor <= 0:
        raise InvalidValue(f"--vae {folder}: its scaling_factor must be a positive number")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_posterior(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z|x) for every image, times the VAE's scaling factor (encoded once)."""
    means, stds = [], []
    for chunk in images.split(batch):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean * vae.config.scaling_factor)
        stds.append(posterior.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


def _train(config: TeacherConfig, out: Path, data, tokenizer, init, vae, log) -> None:
    import copy

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if init is not None:
        # a second phase: the architecture is the init's; the data draws, schedule and EMA restart
        unet, text_encoder, init_info = init
        _check_init_fits(Path(config.init), unet, text_encoder, tokenizer, config, vae)
        unet, text_encoder = unet.to(device), text_encoder.to(device)
    else:
        text_encoder = CLIPTextModel(text_encoder_config(config, tokenizer)).to(device)
        shape = (vae.config.latent_channels, config.image_size // 4) if vae is not None else (1, config.image_size)
        unet = UNet2DConditionModel(**unet_config(config, *shape)).to(device)
        init_info = None
    ids = caption_ids(tokenizer, data.classes).to(device)
    null_ids = tokenizer([""], padding="max_length", max_length=config.max_tokens, return_tensors="pt").input_ids[0]
    null_ids = null_ids.to(device)
    alphas = sd_scheduler().alphas_cumprod.float().to(device)
    if vae is not None:  # SD's recipe: z ~ q(z|x) afresh each step, scaled to unit variance
        latent_mean, latent_std = (t.to(device) for t in latent_posterior(vae, data.images))
    else:
        latent_mean, latent_std = data.images.to(device), None
    data_labels = data.labels.to(device)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer, schedule = adamw_warmup_cosine(parameters, config.lr, config.warmup, config.steps)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), parameters))
    generator = torch.Generator().manual_seed(config.seed)
    started, running = time.perf_counter(), None
    last = min(config.steps, config.stop_after or config.steps)
    for step in range(1, last + 1):
        # all randomness from one CPU generator, so a run is the same draw on any device
        index = torch.randint(0, len(data), (config.batch_size,), generator=generator).to(device)
        images, labels = latent_mean[index], data_labels[index]
        templates = torch.randint(0, len(datasets.TEMPLATES), (config.batch_size,), generator=generator).to(device)
        tokens = ids[labels, templates]
        dropped = (torch.rand(config.batch_size, generator=generator) < config.null_caption_rate).to(device)
        tokens[dropped] = null_ids
        timesteps = torch.randint(0, len(alphas), (config.batch_size,), generator=generator).to(device)
        if latent_std is not None:
            images = images + latent_std[index] * torch.randn(images.shape, generator=generator).to(device)
        noise = torch.randn(images.shape, generator=generator).to(device)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise
        hidden = text_encoder(tokens).last_hidden_state
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
        value = clipped_step(loss, optimizer, schedule, parameters)
        ema_update(ema_pairs, step, config.ema_decay)
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 200 == 0 or step == last:
            log(f"step {step}/{config.steps}  loss {running:.4f}  {time.perf_counter() - started:.0f} s")
        if step == last or (config.save_every and step % config.save_every == 0):
            info = {"config": asdict(config), "step": step, "classes": list(data.classes),
                    "seconds": round(time.perf_counter() - started), "device": _device_name(device),
                    "command": command_line(config)}
            if init_info is not None:
                info["init_from"] = init_info
            if vae is not None:
                info["vae"] = _read_provenance(Path(config.vae), "--vae", "wadi_vae.json")
            save_pipeline(out, copy.deepcopy(ema_unet).cpu(), copy.deepcopy(ema_text).cpu(), tokenizer, info, vae)


def _load_init(folder: Path):
    """U-Net, text encoder and provenance of an earlier teacher folder (``--init``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if not folder.is_dir():
        raise InvalidValue(f"--init {folder}: no such folder")
    for part in ("unet", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            raise InvalidValue(f"--init {folder} is not a teacher pipeline folder: {part}/config.json is missing")
    info = _read_provenance(folder)
    models = []
    for part, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        try:
            models.append(cls.from_pretrained(folder / part))
        except Exception:  # diffusers/transformers raise many kinds for a broken folder; all mean the same
            raise InvalidValue(f"--init {folder}: its {part}/ is not a loadable {cls.__name__}") from None
    return models[0], models[1], info


def _read_provenance(folder: Path, option: str = "--init", name: str = PROVENANCE) -> dict:
    """``wadi_teacher.json`` (or ``name``) of ``folder``: where an input came from."""
    path = folder / name
    if not path.is_file():
        return {"folder": str(folder)}
    try:
        info = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise InvalidValue(f"{option} {folder}: {name} is not JSON") from None
    if not isinstance(info, dict):
        raise InvalidValue(f"{option} {folder}: {name} must hold a JSON object")
    return info


def _check_init_fits(folder: Path, unet, text_encoder, tokenizer, config: TeacherConfig, vae=None) -> None:
    """The ``--init`` networks fit this training: grey images of ``--image-size`` (or the ``--vae``'s latents
    of them), CLIP tokens, one width."""
    problems = []
    channels, size = (vae.config.latent_channels, config.image_size // 4) if vae is not None else (1, config.image_size)
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        problems.append(f"its U-Net has {unet.config.in_channels} input channels, not {channels}")
    if unet.config.sample_size != size:
        problems.append(f"its U-Net is for inputs of {unet.config.sample_size}px, not {size}px")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        problems.append("its U-Net's cross-attention width is not its text encoder's width")
    if text_encoder.config.vocab_size != len(tokenizer):
        problems.append(f"its text encoder has {text_encoder.config.vocab_size} tokens, not CLIP's {len(tokenizer)}")
    if text_encoder.config.max_position_embeddings < config.max_tokens:
        problems.append(f"its text encoder takes fewer than {config.max_tokens} tokens")
    if problems:
        raise InvalidValue(f"--init {folder}: {problems[0]}")


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
