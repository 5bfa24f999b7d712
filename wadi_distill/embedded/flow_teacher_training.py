"""Train a small rectified-flow teacher of the SD3 family (``wadi-distill flow-teacher``).

SD3's recipe at toy scale, in the embedded teacher's latent space: an ``SD3Transformer2DModel`` (joint
attention over image and text tokens, adaLN on the timestep and the pooled text embedding) trained by
flow matching on the latents of an ``AutoencoderKL`` (``--vae``, by default the embedded teacher's):

    x_σ = (1 − σ) x0 + σ ε,   target v = ε − x0,   loss ‖v_θ(x_σ, 1000 σ, c) − v‖²,

σ drawn logit-normal (SD3's default weighting: σ = sigmoid(n), n ~ N(0, 1)) and shifted as the
``FlowMatchEulerDiscreteScheduler`` of the pipeline shifts it, σ' = s σ / (1 + (s − 1) σ), so that
training and sampling see the same noise levels. The conditioning is exactly what
``StableDiffusion3Pipeline.encode_prompt`` computes with no T5 encoder (:func:`sd3_conditioning`): two
CLIP text encoders with projections, trained with the transformer (no pretrained CLIP exists here), and a
T5 encoder over the caption words (:func:`.tokenizer.write_caption_t5_tokenizer`), frozen at its seeded
random initialisation as SD3 freezes its text encoders (its 256 tokens per caption are computed once, not
every step: they are most of the text cost): the CLIPs' penultimate hidden states side by side,
zero-padded to T5's width, then T5's tokens; the pooled embedding is both projections side by side. 10 % empty captions train the unconditional branch for
classifier-free guidance. The result is a ``StableDiffusion3Pipeline`` folder (EMA weights) that plain
diffusers loads with ``from_pretrained(path)`` and runs with its defaults.
"""

from __future__ import annotations

import copy
import json
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
from .teacher_training import (_check_device, _device_name, _fraction, _load_vae, _read_provenance, _whole,
                               command_line_values, latent_posterior)
from .tokenizer import write_caption_t5_tokenizer, write_clip_tokenizer

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the T5 tokens it appends


@dataclass
class FlowTeacherConfig:
    dataset: str = "fashion-mnist"
    image_size: int = 32
    steps: int = 4000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    null_caption_rate: float = 0.1     # captions -> "" for classifier-free guidance
    text_hidden: int = 32              # width of each of the two CLIP encoders (and their projections)
    max_tokens: int = 32
    width: int = 64                    # transformer width = heads x head width
    heads: int = 2
    layers: int = 4
    patch_size: int = 1                # latent pixels a side per image token
    shift: float = 1.0                 # the scheduler's σ shift (SD3 uses 3 at 1024 px; these latents are 8x8)
    seed: int = 0
    device: str = "cpu"
    save_every: int = 0
    stop_after: int = 0
    threads: int = 0
    vae: str = ""                      # AutoencoderKL folder ("": the embedded teacher's)


PROVENANCE = "wadi_flow_teacher.json"  # the file that marks a folder this command wrote


def flow_teacher_config(**options) -> FlowTeacherConfig:
    """A checked :class:`FlowTeacherConfig` from command-line values (``None`` keeps the default)."""
    values = command_line_values(None, options)
    if "vae" in values:
        values["vae"] = str(values["vae"])
    return check_flow_teacher_config(FlowTeacherConfig(**values))


def check_flow_teacher_config(config: FlowTeacherConfig) -> FlowTeacherConfig:
    """Every option in range and a transformer that can be built, before anything is read or written."""
    for name in ("steps", "batch_size", "image_size", "warmup", "max_tokens", "width", "heads", "layers",
                 "patch_size"):
        _whole(name, getattr(config, name), 1)
    for name in ("save_every", "stop_after", "threads"):
        _whole(name, getattr(config, name), 0)
    _whole("seed", config.seed, -2 ** 62)
    _fraction("lr", config.lr, positive=True)
    _fraction("shift", config.shift, positive=True)
    _fraction("ema_decay", config.ema_decay, below_one=True)
    _fraction("null_caption_rate", config.null_caption_rate, below_one=True)
    if config.width % config.heads:
        raise InvalidValue(f"--width {config.width} must be a multiple of --heads {config.heads}")
    if config.text_hidden < 2 or config.text_hidden % 2:
        raise InvalidValue(f"--text-hidden must be an even integer >= 2, not {config.text_hidden!r}")
    if config.image_size % (4 * config.patch_size):  # the VAE's two halvings, then the patches
        raise InvalidValue(f"--image-size {config.image_size} must be a multiple of 4 x --patch-size "
                           f"({4 * config.patch_size})")
    _check_device(config.device)
    return config


def is_flow_teacher_folder(folder: Path) -> bool:
    return (Path(folder) / PROVENANCE).is_file()


def transformer_config(config: FlowTeacherConfig, latent_channels: int) -> dict:
    """SD3's MMDiT shrunk: joint blocks over the latent patches and the text tokens; the text tokens
    (two CLIP widths side by side) are also the joint attention width, as SD3 pads CLIP to T5's."""
    grid = config.image_size // 4
    return dict(sample_size=grid, patch_size=config.patch_size, in_channels=latent_channels,
                out_channels=latent_channels, num_layers=config.layers, attention_head_dim=config.width // config.heads,
                num_attention_heads=config.heads, joint_attention_dim=2 * config.text_hidden,
                caption_projection_dim=config.width, pooled_projection_dim=2 * config.text_hidden,
                pos_embed_max_size=grid // config.patch_size)


def t5_config(config: FlowTeacherConfig, tokenizer):
    """T5's encoder shrunk to the joint attention width (two CLIP widths)."""
    from transformers import T5Config

    return T5Config(vocab_size=len(tokenizer), d_model=2 * config.text_hidden, d_kv=config.text_hidden // 2,
                    d_ff=8 * config.text_hidden, num_layers=2, num_heads=2, dropout_rate=0.0,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


def text_encoder_config(config: FlowTeacherConfig, tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=config.text_hidden,
                          intermediate_size=4 * config.text_hidden, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=config.max_tokens, projection_dim=config.text_hidden,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def flow_scheduler(shift: float):
    """The pipeline's sampler: Euler over the flow ODE, σ shifted by ``shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s σ / (1 + (s − 1) σ): the scheduler's shift of a noise level."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def logit_normal_sigmas(count: int, shift: float, rng: torch.Generator) -> torch.Tensor:
    """Training noise levels: σ = sigmoid(n), n ~ N(0, 1) (SD3's logit-normal weighting), then shifted."""
    return shifted(torch.sigmoid(torch.randn(count, generator=rng)), shift)


def clip_conditioning(clip_encoders, clip_ids: torch.Tensor, t5_width: int):
    """The CLIP part of ``StableDiffusion3Pipeline.encode_prompt``, differentiably: each CLIP's penultimate hidden
    state side by side, zero-padded to T5's width, and the pooled embedding (both projections side by side)."""
    hidden, pooled = [], []
    for encoder in clip_encoders:
        out = encoder(clip_ids, output_hidden_states=True)
        pooled.append(out.text_embeds)
        hidden.append(out.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    return F.pad(clip, (0, t5_width - clip.shape[-1])), torch.cat(pooled, dim=-1)


def sd3_conditioning(clip_encoders, clip_ids: torch.Tensor, t5_tokens: torch.Tensor):
    """``StableDiffusion3Pipeline.encode_prompt``: :func:`clip_conditioning`, then T5's last hidden state
    ``t5_tokens`` (``text_encoder_3(t5_ids)[0]``, computed once where T5 is frozen) along the sequence.
    Returns (prompt_embeds, pooled_projections)."""
    clip, pooled = clip_conditioning(clip_encoders, clip_ids, t5_tokens.shape[-1])
    return torch.cat([clip, t5_tokens], dim=-2), pooled


def flow_matching_loss(transformer, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """‖v_θ(x_σ, 1000 σ) − (ε − x0)‖² at x_σ = (1 − σ) x0 + σ ε (the timestep input is the scheduler's)."""
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    velocity = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled).sample
    return F.mse_loss(velocity, noise - x0)


def save_pipeline(folder: Path, transformer, text_encoders, tokenizers, vae, shift: float, info: dict) -> None:
    """A StableDiffusion3Pipeline folder, staged and renamed into place when complete; ``tokenizers`` =
    (CLIP's, T5's)."""
    from diffusers import StableDiffusion3Pipeline

    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline decodes z / scaling + shift; SD's VAE has no shift
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=flow_scheduler(shift), vae=vae,
                                    text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                                    text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[0],
                                    text_encoder_3=text_encoders[2], tokenizer_3=tokenizers[1])
    with staged_folder(folder) as tmp:
        pipe.save_pretrained(tmp)
        for part in ("tokenizer", "tokenizer_2"):
            (tmp / part / "tokenizer.json").unlink(missing_ok=True)  # rebuilt from vocab.json + merges.txt
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(Path(tokenizers[0].init_kwargs["vocab_file"]).with_name(name), tmp / part / name)
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")


def train_flow_teacher(config: FlowTeacherConfig, out: str | Path, log=print, *, overwrite: bool = False) -> Path:
    """Train the flow teacher and write its pipeline folder to ``out``; returns ``out``. Everything is
    checked before anything is written."""
    from . import teacher_path

    check_flow_teacher_config(config)
    vae_folder = Path(config.vae) if config.vae else teacher_path() / "vae"
    out = check_output(out, [vae_folder], folder=True, replace=True, overwrite=overwrite, ours=is_flow_teacher_folder)
    vae = _load_vae(vae_folder, config)
    data = datasets.load(config.dataset, "train", config.image_size)
    if config.threads:
        torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory(prefix="wadi-flow-teacher-tokenizer-") as work:
        tokenizers = (write_clip_tokenizer(Path(work) / "clip", config.max_tokens),
                      write_caption_t5_tokenizer(Path(work) / "t5", _captions(data.classes), T5_TOKENS))
        _train(config, out, data, tokenizers, vae, vae_folder, log)
    return out


def _captions(classes) -> list[str]:
    """Every (class, template) caption, row ``label * templates + template``, and the empty caption last."""
    return [datasets.caption(classes, label, t) for label in range(len(classes))
            for t in range(len(datasets.TEMPLATES))] + [""]


def _caption_ids(tokenizers, classes, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 token ids of :func:`_captions`, padded as the pipeline pads them."""
    captions = _captions(classes)
    clip = tokenizers[0](captions, padding="max_length", max_length=max_tokens, truncation=True,
                         return_tensors="pt").input_ids
    t5 = tokenizers[1](captions, padding="max_length", max_length=T5_TOKENS, truncation=True,
                       add_special_tokens=True, return_tensors="pt").input_ids
    return clip, t5


def _train(config: FlowTeacherConfig, out: Path, data, tokenizers, vae, vae_folder: Path, log) -> None:
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    clips = [CLIPTextModelWithProjection(text_encoder_config(config, tokenizers[0])).to(device) for _ in range(2)]
    t5 = T5EncoderModel(t5_config(config, tokenizers[1])).to(device).eval().requires_grad_(False)
    transformer = SD3Transformer2DModel(**transformer_config(config, vae.config.latent_channels)).to(device)
    clip_ids, t5_ids = (ids.to(device) for ids in _caption_ids(tokenizers, data.classes, config.max_tokens))
    with torch.no_grad():  # frozen: every caption's T5 tokens once
        t5_tokens = t5(t5_ids)[0]
    empty = len(clip_ids) - 1
    latent_mean, latent_std = (t.to(device) for t in latent_posterior(vae, data.images))
    labels = data.labels.to(device)
    parameters = list(transformer.parameters()) + [p for e in clips for p in e.parameters()]
    optimizer, schedule = adamw_warmup_cosine(parameters, config.lr, config.warmup, config.steps)
    ema = [copy.deepcopy(m).requires_grad_(False) for m in [transformer, *clips]]
    ema_pairs = list(zip([p for m in ema for p in m.parameters()], parameters))
    rng = torch.Generator().manual_seed(config.seed)
    started, running = time.perf_counter(), None
    last = min(config.steps, config.stop_after or config.steps)
    templates = len(datasets.TEMPLATES)
    for step in range(1, last + 1):
        # Draw the batch: latents z ~ q(z|x), captions (10 % empty), noise and σ, all from one CPU generator.
        index = torch.randint(0, len(data), (config.batch_size,), generator=rng).to(device)
        caption = labels[index] * templates + torch.randint(0, templates, (config.batch_size,), generator=rng).to(device)
        dropped = (torch.rand(config.batch_size, generator=rng) < config.null_caption_rate).to(device)
        caption = torch.where(dropped, torch.full_like(caption, empty), caption)
        x0 = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=rng).to(device)
        noise = torch.randn(x0.shape, generator=rng).to(device)
        sigma = logit_normal_sigmas(config.batch_size, config.shift, rng).to(device)

        # Encode each distinct caption once, then the flow-matching loss.
        used, inverse = torch.unique(caption, return_inverse=True)
        embeds, pooled = sd3_conditioning(clips, clip_ids[used], t5_tokens[used])
        loss = flow_matching_loss(transformer, x0, noise, sigma, embeds[inverse], pooled[inverse])
        value = clipped_step(loss, optimizer, schedule, parameters)
        ema_update(ema_pairs, step, config.ema_decay)
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 200 == 0 or step == last:
            log(f"step {step}/{config.steps}  loss {running:.4f}  {time.perf_counter() - started:.0f} s")

        # Save the EMA pipeline.
        if step == last or (config.save_every and step % config.save_every == 0):
            info = {"config": asdict(config), "step": step, "classes": list(data.classes),
                    "seconds": round(time.perf_counter() - started), "device": _device_name(device),
                    "command": command_line(config),
                    "vae": _read_provenance(vae_folder, "--vae", "wadi_vae.json")}
            models = [copy.deepcopy(m).cpu() for m in ema]
            save_pipeline(out, models[0], models[1:] + [copy.deepcopy(t5).cpu()], tokenizers, vae, config.shift, info)


def command_line(config: FlowTeacherConfig) -> str:
    """The ``wadi-distill flow-teacher`` command that reproduces ``config``."""
    defaults = FlowTeacherConfig()
    options = [(k, v) for k, v in asdict(config).items()
               if v != getattr(defaults, k) and k not in ("threads", "save_every")]
    return "wadi-distill flow-teacher " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options)
