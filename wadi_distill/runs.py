"""The run-folder format, and the one place that tells a teacher, a run and an export apart.

A run folder (``wadi-distill run --out RUN``)::

    RUN/config.json                                 the resolved RunConfig (what the run did)
    RUN/prompts.json                                the prompts it trained on: source, de-duplication,
                                                    shuffle seed, count, digest (training.prompt_files)
    RUN/checkpoints/step-NNNNNNN/                   adapters, optimisers, RNG states, step
                                                    (written and read by training.checkpoint)
    RUN/generator_adapter[_ema].safetensors         the trained generator (LoRaD, LoRA, DoRA), or
    RUN/generator_model[_ema]/                      a diffusers model folder (full fine-tuning)
    RUN/metrics.csv, RUN/samples/step-NNNNNNN.png   losses per step, one-step validation grids
    RUN/tensorboard/                                when tensorboard is installed

An export (``wadi-distill export RUN --out EXPORT``) is self-contained, and so can be moved::

    EXPORT/model_index.json, scheduler/, unet/ | transformer/, text_encoder/, tokenizer/, vae/, ...
                                                    a complete diffusers pipeline: the teacher's parts, the
                                                    merged denoiser, the one-step scheduler (one_step_pipeline)
    EXPORT/config.json + diffusion_pytorch_model.safetensors
                                                    the merged denoiser as a model folder (as exports were
                                                    before: the same files as unet/, hard-linked)
    EXPORT/one_step.safetensors                     the merged denoiser as one file
    EXPORT/generator_adapter.safetensors            the adapter (LoRaD, LoRA, DoRA runs)
    EXPORT/lora/                                    with --lora-rank / --lora-energy: the change as SVD LoRA
                                                    files (diffusers/peft, kohya) and their error (lora_export)
    EXPORT/wadi_one_step.json                       how to run it in one step; the teacher by name only

A model folder with a ``wadi_one_step.json`` but no pipeline (an export of before, a swap of one) reads
its teacher from the recorded ``teacher``: ``embedded`` or a path. A teacher is a diffusers pipeline folder.

:func:`load_one_step` returns the one-step model of a run or an export as a :class:`OneStepModel`:
the teacher bundle, the generator network and the VSD settings, side by side.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from wadi_analysis.atomic import atomic_write_text
from wadi_analysis.errors import UserError
from wadi_analysis.outputs import check_output

from . import adapters
from .distill import GENERATOR
from .one_step_pipeline import one_step_call, scheduler_summary
from .teacher import Teacher, load_denoiser, load_teacher
from .vsd import VSDConfig

CONFIG = "config.json"
ONE_STEP_INFO = "wadi_one_step.json"
TEACHER, RUN, EXPORT = "teacher", "run", "export"
EMBEDDED_TEACHER = "embedded"  # how an export names the shipped teacher (its path would not survive a move)


class RunFolder:
    """Paths and readers of one run folder; the only code that knows its file names."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def prompts_file(self) -> Path:
        return self.path / "prompts.json"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoint_root / f"step-{step:07d}"

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary ``.step-*.tmp`` folders and other names are not)."""
        found = [p for p in self.checkpoint_root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def written(self) -> list[Path]:
        """Every path training writes into the run folder (besides the checkpoints' contents)."""
        return [self.config_file, self.prompts_file, self.checkpoint_root, self.metrics_file, self.tensorboard_dir,
                self.path / "samples",
                *(self.generator(full, ema) for full in (False, True) for ema in (False, True))]

    def refuse_links(self) -> None:
        """Writes never follow links: a run whose own files are symbolic links is refused."""
        for path in [self.path, *self.written(), *self.checkpoints()]:
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link; a run writes only its own files, never through links")

    def entries(self) -> set[str] | None:
        """The names in the run folder now (None: it does not exist), to undo a failed fresh run."""
        return {p.name for p in self.path.iterdir()} if self.path.is_dir() else None

    def remove_new_entries(self, before: set[str] | None, keep=()) -> None:
        """Remove what a failed run added: the folder if it made it, else only the entries it added; the
        entries named in ``keep`` stay (finished work a later call resumes from)."""
        if before is None and not keep:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if entry.name not in (before or ()) and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if before is None and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def grid(self, step: int) -> Path:
        return self.path / "samples" / f"step-{step:07d}.png"

    def digests(self, rank: int, what: str) -> Path:
        """Per-process hashes a run records with ``record_digests`` (``what``: adapter or base)."""
        return self.path / f"{what}-digests-rank{rank}.txt"

    def generator(self, full: bool, ema: bool = False) -> Path:
        """Where the trained generator is: a diffusers folder (full fine-tuning) or an adapter file."""
        suffix = "_ema" if ema else ""
        return self.path / (f"generator_model{suffix}" if full else f"generator_adapter{suffix}.safetensors")

    def read_config(self) -> dict:
        """The resolved configuration the run recorded, with the keys that export and sample read checked."""
        try:
            config = json.loads(self.config_file.read_text())
        except OSError:
            raise UserError(f"{self.path} is not a run folder ({CONFIG} missing)") from None
        except (ValueError, RecursionError):
            raise UserError(f"{self.config_file} is not readable JSON") from None
        check_run_config(config, self.config_file)
        return config


def _kind(value: object, kinds: tuple[type, ...]) -> bool:
    """``isinstance``, except that a JSON true/false is no number."""
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)




def check_teacher_keys(recorded: object, where: Path) -> None:
    """What a run's ``config.json`` and an export's ``wadi_one_step.json`` both record: the teacher (a run: its
    path; an export: its name, :func:`teacher_name`) and teacher_config (the same, or null)."""
    if not isinstance(recorded, dict):
        raise UserError(f"{where} is not a JSON object")
    if not isinstance(recorded.get("teacher"), str) or not recorded["teacher"]:
        raise UserError(f"{where}: 'teacher' must be the teacher's path or name (text)")
    if not _kind(recorded.get("teacher_config"), (str, type(None))):
        raise UserError(f"{where}: 'teacher_config' must be a path, a name or null")
    guidance = recorded.get("flux_guidance")
    if guidance is not None and (not _kind(guidance, (int, float)) or not math.isfinite(guidance) or guidance <= 0):
        raise UserError(f"{where}: 'flux_guidance' must be a number > 0 or null (got {guidance!r})")


def check_run_config(config: object, where: Path) -> None:
    """A run's ``config.json`` as export and sample read it: the teacher keys, the adapter method and
    ``vsd``, a table of :class:`VSDConfig`'s fields with values of their types."""
    check_teacher_keys(config, where)
    if config.get("adapter") not in adapters.METHODS:
        raise UserError(f"{where}: 'adapter' must be one of {', '.join(adapters.METHODS)} (got {config.get('adapter')!r})")
    from .config import check_vsd_table  # the [vsd] rules have one owner

    check_vsd_table(config.get("vsd"), str(where))


def source_kind(source: str | os.PathLike) -> str:
    """``teacher`` (a diffusers pipeline folder), ``run`` (a run folder) or ``export`` (an exported
    one-step model); anything else is a :class:`UserError`."""
    source = Path(source)
    if (source / CONFIG).is_file() and (source / "checkpoints").is_dir():
        return RUN
    if (source / ONE_STEP_INFO).is_file():
        return EXPORT
    if (source / "model_index.json").is_file():
        return TEACHER
    if not source.exists():
        raise UserError(f"{source} does not exist")
    raise UserError(f"{source} is neither a run folder, an exported one-step model ({ONE_STEP_INFO}) "
                    "nor a teacher pipeline (model_index.json)")


def run_teacher(config: dict, text: bool = True) -> Teacher:
    """The teacher a run was made from (its ``config.json`` records the paths and a FLUX teacher's guidance input;
    runs made before ``flux_guidance`` existed used the pipeline's default)."""
    return load_teacher(config["teacher"], config=config.get("teacher_config"), text=text,
                        flux_guidance=config.get("flux_guidance"))


@dataclass
class OneStepModel:
    """A one-step generator beside the teacher it was distilled from.

    ``generator`` is the network to call in one step: for adapter runs the teacher's own denoiser with
    the generator adapter attached and active (one shared base), for full fine-tuning the trained copy,
    for an export the merged denoiser (of a self-contained export, ``teacher`` is the export's own pipeline and
    ``generator`` its denoiser). ``adapter_file`` is the run's adapter file (None otherwise)."""

    teacher: Teacher
    generator: nn.Module
    vsd: VSDConfig
    config: dict
    adapter_file: Path | None = None


def load_run_generator(run_dir: str | os.PathLike, ema: bool = False, text: bool = True) -> OneStepModel:
    """The generator of a finished run, unmerged (LoRaD, LoRA, DoRA) or as trained (full)."""
    run = RunFolder(run_dir)
    config = run.read_config()
    full = config["adapter"] == "full"
    path = run.generator(full, ema)
    if not path.exists():
        raise UserError(f"{run.path} has no {path.name} (unfinished run{', or no EMA' if ema else ''})")
    teacher = run_teacher(config, text=text)
    vsd = VSDConfig(**config["vsd"])
    if full:
        return OneStepModel(teacher, load_denoiser(path), vsd, config)
    adapters.load_adapter(teacher.denoiser, path, GENERATOR)
    adapters.activate(teacher.denoiser, GENERATOR)
    return OneStepModel(teacher, teacher.denoiser, vsd, config, path)


def one_step_alpha(teacher: Teacher, config: dict) -> float:
    """The a_T of the one step: the run's ``[vsd] alpha_T``, else the teacher schedule's own last value."""
    alpha_T = config["vsd"]["alpha_T"]
    return float(teacher.alphas_cumprod[-1]) if alpha_T is None else float(alpha_T)


def teacher_name(recorded: str | None) -> str | None:
    """How an export records its teacher: ``embedded`` for the shipped one, else the folder's (or file's)
    name: provenance, never a path (an export is self-contained and may be moved)."""
    if recorded is None:
        return None
    from . import embedded

    try:
        if os.path.samefile(recorded, embedded.teacher_path()):
            return EMBEDDED_TEACHER
    except OSError:  # the recorded teacher is gone: its name is still what the run recorded
        pass
    return Path(recorded).name


def write_one_step_info(out: Path, teacher: Teacher, config: dict, pipeline: str, source: dict | None = None) -> Path:
    """``wadi_one_step.json`` of an export: the parametrisation, the timestep and a_T of the one step (beside the
    schedule's own last value), the pipeline class and its one-step call, the teacher by name and, with
    ``source``, where the weights came from (an imported file: its name and SHA-256)."""
    info = {"prediction_type": teacher.prediction_type, "timestep": teacher.num_timesteps - 1,
            "alpha_T": one_step_alpha(teacher, config), "schedule_alpha_T": float(teacher.alphas_cumprod[-1]),
            **({"sigma_max": float(teacher.sigmas[-1])} if teacher.sigmas is not None else {}),
            "pipeline": pipeline, "scheduler": scheduler_summary(teacher), "one_step_call": one_step_call(teacher),
            "teacher": teacher_name(config["teacher"]), "teacher_config": teacher_name(config.get("teacher_config")),
            **({"flux_guidance": teacher.guidance} if teacher.guidance is not None else {}),
            **({"source": source} if source is not None else {})}
    return atomic_write_text(out / ONE_STEP_INFO, json.dumps(info, indent=2) + "\n")


def is_pipeline(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder: a teacher, or a self-contained export."""
    return (Path(path) / "model_index.json").is_file()


def _recorded_path(export: Path, recorded: str | None) -> Path | None:
    """The teacher (or teacher_config) a model folder without a pipeline of its own records: ``embedded`` (the
    shipped teacher) or an existing absolute path (exports made before they held their pipeline)."""
    if recorded is None:
        return None
    if recorded == EMBEDDED_TEACHER:
        from . import embedded

        return embedded.teacher_path()
    if not Path(recorded).is_absolute() or not Path(recorded).exists():
        raise UserError(f"{export} holds no pipeline of its own (model_index.json) and the teacher it records, "
                        f"{recorded!r}, is not found; export the run again for a self-contained pipeline")
    return Path(recorded)


def load_export(path: str | os.PathLike) -> OneStepModel:
    """An exported one-step model. Self-contained (the export is a pipeline): its own pipeline, whose denoiser
    is the merged one. A model folder with ``wadi_one_step.json`` only: that denoiser beside the recorded teacher's
    text encoder and VAE."""
    path = Path(path)
    info = _one_step_info(path)
    vsd = VSDConfig(alpha_T=info["alpha_T"])
    guidance = info.get("flux_guidance")  # the run's FLUX guidance input (FluxPipeline's guidance_scale)
    if is_pipeline(path):
        teacher = _flow_checked(load_teacher(path, flux_guidance=guidance), info, path)
        return OneStepModel(teacher, teacher.denoiser, vsd, info)
    teacher = load_teacher(_recorded_path(path, info["teacher"]),
                           config=_recorded_path(path, info.get("teacher_config")), flux_guidance=guidance)
    return OneStepModel(_flow_checked(teacher, info, path), load_denoiser(path), vsd, info)


def _flow_checked(teacher: Teacher, info: dict, path: Path) -> Teacher:
    """An a_T of 0 (a flow export's: its one step starts at sigma_max) only with a flow teacher."""
    if info["alpha_T"] == 0 and teacher.sigmas is None:
        raise UserError(f"{path / ONE_STEP_INFO}: 'alpha_T' must be a number between 0 and 1")
    return teacher


def load_one_step(source: str | os.PathLike) -> OneStepModel:
    """The one-step model of a run (the adapter unmerged) or of an export (merged)."""
    kind = source_kind(source) if Path(source).exists() else None
    if kind not in (RUN, EXPORT):
        raise UserError(f"{source} is neither a run folder nor an exported one-step model ({ONE_STEP_INFO})")
    return load_run_generator(source) if kind == RUN else load_export(source)


def is_export(path: Path) -> bool:
    """A folder ``export`` wrote (it may be replaced by the next export to it)."""
    return (Path(path) / ONE_STEP_INFO).is_file()


def check_output_for(source: str | os.PathLike, out: str | os.PathLike, *, folder: bool = True, ours=None,
                     inputs: tuple = (), overwrite: bool = False) -> Path:
    """The output policy (:func:`wadi_analysis.outputs.check_output`) for ``out`` made from ``source``
    (and ``inputs``): apart from the teacher (and an export read); a folder replaced whole, if non-empty
    only when ``ours`` or ``overwrite``. A run may hold outputs in a new entry of its own (``export RUN --out
    RUN/one-step``, as the quick start does), never in its files nor the run itself or a folder around it."""
    inputs = [*source_inputs(source), *inputs]
    if source_kind(source) == RUN:
        run, inputs = RunFolder(source), inputs[1:]
        run_path, target = run.path.resolve(), Path(os.path.abspath(out)).resolve()
        if target == run_path or target in run_path.parents:
            relation = "is" if target == run_path else "contains"
            raise UserError(f"{out} {relation} the run {source}; choose an output apart from it")
        if run_path in target.parents:
            entry = run_path / target.relative_to(run_path).parts[0]
            if entry in {p.resolve() for p in run.written()} or entry.name.startswith("."):
                raise UserError(f"{out} lies inside the run's own {entry.name}; choose a new name")
    return check_output(out, inputs, folder=folder, replace=folder, overwrite=overwrite, ours=ours)


def source_inputs(source: str | os.PathLike) -> list[Path]:
    """What reading ``source`` (a run, an export or a teacher) reads: itself and, for a run or a model-only
    export, the teacher folder it records; outputs must keep apart from all of them."""
    source = Path(source)
    kind = source_kind(source)
    if kind == TEACHER:
        return [source]
    if kind == RUN:
        config = RunFolder(source).read_config()
        return [source] + [Path(p) for p in (config["teacher"], config.get("teacher_config")) if p]
    info = _one_step_info(source)
    if is_pipeline(source):  # self-contained: it reads nothing else
        return [source]
    return [source] + [p for p in (_recorded_path(source, info["teacher"]),
                                   _recorded_path(source, info.get("teacher_config"))) if p]


def _one_step_info(path: Path) -> dict:
    """An export's ``wadi_one_step.json``, checked: the teacher keys and a_T in (0, 1)."""
    try:
        info = json.loads((path / ONE_STEP_INFO).read_text())
    except (OSError, ValueError, RecursionError):
        raise UserError(f"{path / ONE_STEP_INFO} is not readable JSON") from None
    check_teacher_keys(info, path / ONE_STEP_INFO)
    lowest = 0 if info.get("prediction_type") == "flow" else None  # a flow teacher's one step starts at a = 0
    if not _kind(info.get("alpha_T"), (int, float)) or not (info["alpha_T"] == lowest or 0 < info["alpha_T"] < 1):
        raise UserError(f"{path / ONE_STEP_INFO}: 'alpha_T' must be a number between 0 and 1")
    return info


def load_sampler(source: str | os.PathLike) -> tuple[Teacher, nn.Module, VSDConfig | None]:
    """What to sample from ``source``: (teacher, network, VSD settings) for a run or an export (one
    step), (teacher, its denoiser, None) for a teacher pipeline (multi-step)."""
    if source_kind(source) == TEACHER:
        teacher = load_teacher(source)
        return teacher, teacher.denoiser, None
    model = load_one_step(source)
    return model.teacher, model.generator, model.vsd
