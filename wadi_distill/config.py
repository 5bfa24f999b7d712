"""The run configuration: every option of ``wadi-distill run``, settable on the command line or in TOML.

Precedence: defaults < ``--config FILE.toml`` < command-line options. The resolved configuration is
written to ``RUN_DIR/config.json`` so a run records exactly what it did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .vsd import VSDConfig


@dataclass
class RunConfig:
    teacher: str = ""                       # diffusers pipeline folder
    teacher_config: str | None = None       # single-file teacher: local diffusers pipeline folder with its configs
    prompts: str = ""                       # .txt (one per line), .jsonl/.csv (see prompt_column)
    prompt_column: str = "prompt"
    cache_dir: str = ""                     # prompt-embedding cache; "": $XDG_CACHE_HOME/wadi or ~/.cache/wadi
    out: str = "run"
    steps: int = 100
    batch_size: int = 4
    seed: int = 0
    adapter: str = "lorad"                  # lorad | lora | dora (one shared frozen base) | full (own copy)
    generator_preset: str = "sd-unet-generator"
    fake_preset: str = "sd-unet-fake"
    generator_rank: int | None = None       # None: the preset's rank
    fake_rank: int | None = None
    plan: str | None = None                 # placement plan JSON for the generator (wadi-analyze plan)
    optimizer: str = "adamw"                # adamw | adamw8bit (needs bitsandbytes)
    generator_lr: float = 1e-4
    fake_lr: float = 1e-2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    fake_steps_per_generator_step: int = 1
    mixed_precision: str = "no"             # no | fp16 | bf16
    gradient_checkpointing: bool = False
    ema_decay: float | None = None          # EMA of the generator adapter (e.g. 0.999); export --ema uses it
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    validate_every: int = 50
    validation_prompts: list[str] = field(default_factory=list)  # default: the first prompts
    validation_seed: int = 1234
    max_nonfinite_in_a_row: int = 5
    record_digests: bool = False            # per-process hashes: adapters every step, base before/after (checks)
    vsd: VSDConfig = field(default_factory=VSDConfig)

    def embedding_cache(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wadi" / "prompt-embeddings"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: str | os.PathLike) -> None:
        from wadi_analysis.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def _apply(target, values: dict, where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in names:
            raise ValueError(f"{where}: unknown option {key!r}")
        if key == "vsd":
            if not isinstance(value, dict):
                raise ValueError(f"{where}: [vsd] must be a table")
            _apply(target.vsd, value, f"{where} [vsd]")
        else:
            setattr(target, key, value)


def embedded_defaults() -> dict:
    """The defaults for the embedded teacher (used when no teacher is named): its prompts, ranks near
    10 % of its U-Net (LoRaD generator 16, fake 4), and 1000 steps at generator lr 1e-3 (the published
    1e-4 moves rank-16 angles too little in a run of minutes), about 7 minutes on two CPU cores."""
    from .embedded import datasets
    from . import embedded

    return {"teacher": str(embedded.teacher_path()), "prompts": str(embedded.prompts_path()), "out": "wadi-run",
            "steps": 1000, "batch_size": 16, "generator_rank": 16, "fake_rank": 4, "generator_lr": 1e-3,
            "checkpoint_every": 250, "validate_every": 250,
            "validation_prompts": [datasets.caption(datasets.FASHION_CLASSES, c) for c in range(10)]}


def load_config(path: str | os.PathLike | None = None, **overrides) -> RunConfig:
    """Defaults, then the TOML file, then the non-None ``overrides`` (keys as in :class:`RunConfig`).
    Without a teacher in either, the embedded teacher and :func:`embedded_defaults` come first."""
    config = RunConfig()
    values = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config {path} is not valid TOML ({exc})") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not values.get("teacher") and not overrides.get("teacher"):
        _apply(config, embedded_defaults(), "embedded defaults")
    _apply(config, values, str(path))
    _apply(config, overrides, "command line")
    if config.adapter not in ("lorad", "lora", "dora", "full"):
        raise ValueError(f"adapter must be lorad, lora, dora or full (got {config.adapter!r})")
    if config.optimizer not in ("adamw", "adamw8bit"):
        raise ValueError("optimizer must be adamw or adamw8bit")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError("mixed_precision must be no, fp16 or bf16")
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    return config
