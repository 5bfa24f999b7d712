"""The run configuration: every option of ``wadi-distill run``, settable on the command line or in TOML.

Precedence: defaults < ``--config FILE.toml`` < command-line options. The resolved configuration is
written to ``RUN_DIR/config.json`` so a run records exactly what it did.

Every value is checked against its field's rule (:data:`RULES`, :data:`VSD_RULES`: type and range)
when it is applied, and the rules that join fields (:func:`check_config`) once all are in: a bad
value ends in one message naming where it came from, the option, the value and what is expected,
before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wadi_analysis.errors import InvalidValue

from .vsd import DROPOUT_SCOPES, FAKE_WEIGHTINGS, GENERATOR_WEIGHTINGS, VSDConfig

ADAPTERS = ("lorad", "lora", "dora", "full", "dora-frozen")  # dora-frozen: DoRA with frozen magnitude
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class RunConfig:
    teacher: str = ""                       # diffusers pipeline folder
    teacher_config: str | None = None       # single-file teacher: local diffusers pipeline folder with its configs
    flux_guidance: float | None = None      # guidance-distilled FLUX: its guidance input (None: pipeline default)
    prompts: str = ""                       # .txt (one per line), .jsonl/.csv (see prompt_column)
    prompt_column: str = "prompt"           # .csv: a column; .jsonl: a dotted path (Task2.Caption); CLI --prompt-field
    prompt_dedupe: bool = False             # drop repeated prompts (first kept), as the published code does
    prompt_shuffle_seed: int | None = None  # shuffle the prompts with this seed (None: file order)
    cache_dir: str = ""                     # prompt-embedding cache; "": $XDG_CACHE_HOME/wadi or ~/.cache/wadi
    out: str = "run"
    steps: int = 100
    batch_size: int = 4
    seed: int = 0
    adapter: str = "lorad"                  # lorad | lora | dora | dora-frozen (one shared frozen base) | full (own copy)
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
    warmup_steps: int = 0                   # both learning rates rise linearly over these steps (0: constant)
    fake_steps_per_generator_step: int = 1
    regression_weight: float = 0.0          # DMD's regression onto teacher DDIM pairs beside VSD (0: off; regression.py)
    regression_pairs: int = 2048            # fixed (noise, prompt, teacher sample) pairs made at the start (at most steps x batch)
    regression_teacher_steps: int = 25      # DDIM steps of the pairs' teacher samples (at [vsd] guidance_real)
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


# The embedded teacher's defaults (used when no teacher is named), chosen by the recipe sweep
# (reports/recipe, README "The VSD recipe"): a LoRaD generator on every Linear and Conv2d of the blocks at
# rank 32 (34 % of the U-Net), VSD with DMD's regression onto the teacher's 25-step samples (weight 1) and
# the real score at guidance 2.5, fake score LoRaD rank 4; 1000 steps at generator lr 1e-3 (the published
# 1e-4 moves the angles too little in a run of minutes), about 8 minutes on two CPU cores.
EMBEDDED_DEFAULTS = {"out": "wadi-run", "steps": 1000, "batch_size": 16, "generator_preset": "sd-unet-generator-conv",
                     "generator_rank": 32, "fake_rank": 4, "generator_lr": 1e-3, "regression_weight": 1.0,
                     "vsd": {"guidance_real": 2.5}, "checkpoint_every": 250, "validate_every": 250}

# The published method where the embedded defaults go beyond it: VSD alone (no regression term), the real
# score at the published guidance, LoRaD on the Linear layers at rank 16 (~9 % of the embedded U-Net, the
# published share). The reproduction trains its arms on it, and the recipe sweep's candidates are options
# over it (its rows before 2026-12-04 were made when it was the embedded default).
PAPER_OBJECTIVE = {"generator_preset": "sd-unet-generator", "generator_rank": 16, "regression_weight": 0.0,
                   "vsd": {"guidance_real": VSDConfig().guidance_real}}


def merge_options(*layers: dict) -> dict:
    """Run options, later layers over earlier ones; their [vsd] tables merge key by key."""
    merged: dict = {}
    for layer in layers:
        vsd = {**merged.get("vsd", {}), **layer.get("vsd", {})}
        merged = {**merged, **layer, **({"vsd": vsd} if vsd else {})}
    return merged


class _Expected(Exception):
    """Raised by a rule: what the value should have been (in words)."""


Rule = Callable[[object], object]


def _integer(low: int | None = None, high: int | None = None, words: str | None = None) -> Rule:
    expected = words or ("an integer" + (f" >= {low}" if low is not None else ""))

    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or \
                (low is not None and value < low) or (high is not None and value > high):
            raise _Expected(expected)
        return value
    return check


def _number(low: float | None = None, high: float | None = None, *, open_low: bool = False,
            open_high: bool = False, words: str = "") -> Rule:
    """A finite real number (ints become floats) in the given range."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (low is not None and (value <= low if open_low else value < low)) or \
                (high is not None and (value >= high if open_high else value > high)):
            raise _Expected(words or "a finite number")
        return float(value)
    return check


def _flag(value):
    if not isinstance(value, bool):
        raise _Expected("true or false (a TOML boolean, not a string)")
    return value


def _text(*, empty: bool = True) -> Rule:
    def check(value):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or (not empty and not value):
            raise _Expected("a string" if empty else "a non-empty string")
        return value
    return check


def _choice(options) -> Rule:
    def check(value):
        if value not in tuple(options):
            raise _Expected(f"one of {', '.join(options)}")
        return value
    return check


def _optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


def _strings(value):
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _Expected("a list of strings")
    return list(value)


def _presets() -> Rule:
    from .lorad.targets import PRESETS
    return _choice(PRESETS)


POSITIVE = _integer(1)
SEED = _integer(-2 ** 62, 2 ** 62, words="an integer of magnitude below 2**62")
LEARNING_RATE = _number(0, open_low=True, words="a number > 0")
TIMESTEP = _integer(0)
RULES: dict[str, Rule] = {
    "teacher": _text(), "teacher_config": _optional(_text()), "prompts": _text(),
    "flux_guidance": _optional(_number(0, open_low=True, words="a number > 0 (FLUX's guidance input)")),
    "prompt_column": _text(empty=False), "prompt_dedupe": _flag,
    "prompt_shuffle_seed": _optional(_integer(0, 2 ** 62 - 1, words="a non-negative integer below 2**62")),
    "cache_dir": _text(), "out": _text(empty=False),
    "steps": POSITIVE, "batch_size": POSITIVE, "seed": SEED, "adapter": _choice(ADAPTERS),
    "generator_preset": _presets(), "fake_preset": _presets(),
    "generator_rank": _optional(POSITIVE), "fake_rank": _optional(POSITIVE), "plan": _optional(_text(empty=False)),
    "optimizer": _choice(OPTIMIZERS), "generator_lr": LEARNING_RATE, "fake_lr": LEARNING_RATE,
    "weight_decay": _number(0, words="a number >= 0"), "grad_clip": _number(0, open_low=True, words="a number > 0"),
    "warmup_steps": _integer(0), "fake_steps_per_generator_step": POSITIVE,
    "regression_weight": _number(0, words="a number >= 0"), "regression_pairs": POSITIVE,
    "regression_teacher_steps": POSITIVE, "mixed_precision": _choice(PRECISIONS),
    "gradient_checkpointing": _flag,
    "ema_decay": _optional(_number(0, 1, open_low=True, open_high=True, words="a number between 0 and 1 (exclusive)")),
    # keep_checkpoints 0 would keep every checkpoint (a [:-0] slice), the opposite of what it says
    "checkpoint_every": POSITIVE, "keep_checkpoints": POSITIVE, "validate_every": POSITIVE,
    "validation_prompts": _strings, "validation_seed": SEED, "max_nonfinite_in_a_row": _integer(0),
    "record_digests": _flag,
}
VSD_RULES: dict[str, Rule] = {
    "guidance_real": _number(), "guidance_fake": _number(),
    "t_min": TIMESTEP, "t_max": TIMESTEP, "fake_t_min": TIMESTEP, "fake_t_max": TIMESTEP,
    "prompt_dropout": _number(0, 1, words="a number from 0 to 1"), "prompt_dropout_scope": _choice(DROPOUT_SCOPES),
    "alpha_T": _optional(_number(0, 1, open_low=True, open_high=True, words="a number between 0 and 1 (exclusive)")),
    "generator_weighting": _choice(tuple(GENERATOR_WEIGHTINGS)), "fake_weighting": _choice(tuple(FAKE_WEIGHTINGS)),
}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _apply(target, values: dict, where: str, rules: dict[str, Rule], prefix: str = "") -> None:
    """Check each of ``values`` against its rule and set it on ``target``."""
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key == "vsd" and not prefix:
            if isinstance(value, VSDConfig):
                value = dataclasses.asdict(value)
            if not isinstance(value, dict):
                raise InvalidValue(f"{where}: [vsd] must be a table of VSD options, not {_shown(value)}")
            _apply(target.vsd, value, where, VSD_RULES, "[vsd] ")
            continue
        if key not in rules:
            raise InvalidValue(f"{where}: unknown option {prefix}{key!r}")
        try:
            setattr(target, key, rules[key](value))
        except _Expected as expected:
            raise InvalidValue(f"{where}: {prefix}{key} must be {expected}, not {_shown(value)}") from None


def check_vsd_table(table: object, where: str) -> VSDConfig:
    """A ``[vsd]`` table (a run's ``config.json`` or TOML) checked against :data:`VSD_RULES`."""
    if not isinstance(table, dict):
        raise InvalidValue(f"{where}: [vsd] must be a table of VSD options, not {_shown(table)}")
    vsd = VSDConfig()
    _apply(vsd, table, where, VSD_RULES, "[vsd] ")
    return vsd


def check_config(config: RunConfig) -> RunConfig:
    """The rules that join fields (each field's own type and range are checked as it is set)."""
    vsd = config.vsd
    for low, high in (("t_min", "t_max"), ("fake_t_min", "fake_t_max")):
        if getattr(vsd, low) > getattr(vsd, high):
            raise InvalidValue(f"[vsd] {low} ({getattr(vsd, low)}) must not exceed {high} ({getattr(vsd, high)})")
    return config


def check_schedule(vsd: VSDConfig, num_timesteps: int) -> None:
    """The VSD timestep ranges lie inside the teacher's schedule (timesteps 0 .. num_timesteps - 1)."""
    for name in ("t_max", "fake_t_max"):
        if getattr(vsd, name) >= num_timesteps:
            raise InvalidValue(f"[vsd] {name} = {getattr(vsd, name)} lies outside the teacher's schedule "
                               f"(timesteps 0 to {num_timesteps - 1})")


def embedded_defaults() -> dict:
    """The defaults for the embedded teacher (used when no teacher is named): its teacher and prompts,
    :data:`EMBEDDED_DEFAULTS`, and one validation prompt per class."""
    from .embedded import datasets
    from . import embedded

    return {"teacher": str(embedded.teacher_path()), "prompts": str(embedded.prompts_path()), **EMBEDDED_DEFAULTS,
            "validation_prompts": [datasets.caption(datasets.FASHION_CLASSES, c) for c in range(10)]}


def read_toml(path: str | os.PathLike) -> dict:
    """The tables of a ``--config`` file, or a :class:`InvalidValue` saying why it has none."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidValue(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidValue(f"config {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})") \
            from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidValue(f"config {path} is not valid TOML ({exc})") from None


def load_config(path: str | os.PathLike | None = None, **overrides) -> RunConfig:
    """Defaults, then the TOML file, then the non-None ``overrides`` (keys as in :class:`RunConfig`).
    Without a teacher in either, the embedded teacher and :func:`embedded_defaults` come first."""
    config = RunConfig()
    values = read_toml(path) if path is not None else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not values.get("teacher") and not overrides.get("teacher"):
        _apply(config, embedded_defaults(), "embedded defaults", RULES)
    _apply(config, values, f"config {path}", RULES)
    _apply(config, overrides, "command line", RULES)
    return check_config(config)
