"""Checkpoints of a run, with one owner for saving, finding and loading them (edm2's ``CheckpointIO``).

``RUN/checkpoints/step-NNNNNNN/`` holds what the run needs to go on exactly where it stopped:

    generator.safetensors, fake.safetensors   the trainable tensors of both roles
    generator_ema.safetensors                 the generator's EMA (runs with ``ema_decay``)
    optimizers.pt                             both optimisers' states
    rng-RANK.pt                               every process's sampling RNG
    state.json                                the step (and how many regression pairs the run made)

It is written to a temporary folder and renamed when complete, so a checkpoint is whole or absent;
only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..distill import ROLES, Roles, TrainingError
from ..runs import RunFolder
from .ema import AdapterEMA


class CheckpointIO:
    """Saves and restores the training state of ``roles``, their optimisers, the RNG and the EMA."""

    def __init__(self, run: RunFolder, roles: Roles, optimizers: dict, rng: torch.Generator,
                 ema: AdapterEMA | None = None, accelerator=None, keep: int = 2, scalers: dict | None = None) -> None:
        self.run, self.roles, self.optimizers, self.rng, self.ema = run, roles, optimizers, rng, ema
        self.scalers = scalers  # fp16 loss scalers per role (their scale is training state too)
        self.accelerator, self.keep = accelerator, keep
        self.rank = accelerator.process_index if accelerator else 0
        self.state: dict = {}  # more of state.json, fixed when the run starts (e.g. "regression_pairs")

    def _barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def save(self, step: int) -> Path:
        """Rank 0 writes the roles, optimisers, EMA and step; every rank its own RNG state."""
        final = self.run.checkpoint(step)
        tmp = final.with_name(f".{final.name}.tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save({"rng": self.rng.get_state()}, tmp / f"rng-{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            for role in ROLES:
                save_file({k: v.detach().contiguous().cpu() for k, v in self.roles.named_parameters(role).items()},
                          tmp / f"{role}.safetensors")
            if self.ema is not None:
                save_file(self.ema.state_dict(), tmp / "generator_ema.safetensors")
            states = {role: opt.state_dict() for role, opt in self.optimizers.items()}
            states.update({f"{role}_scaler": scaler.state_dict() for role, scaler in (self.scalers or {}).items()
                           if scaler.is_enabled()})
            torch.save(states, tmp / "optimizers.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **self.state}))
            os.replace(tmp, final)
            for old in self.run.checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, path: Path) -> int:
        """Restore everything from checkpoint ``path``; returns its step. Every file is validated against
        this run before it is used, and the loop loads before it writes: a tampered checkpoint is refused
        with one line and no file of the run changed."""
        step = read_step(path)
        processes = self.accelerator.num_processes if self.accelerator else 1
        written_by = len(list(path.glob("rng-*.pt")))
        if written_by != processes:
            raise TrainingError(f"checkpoint {path} was written by {written_by} process(es); resume it with as many "
                                f"(this run has {processes})")
        roles = read_roles(path, self.roles)
        ema = None
        if self.ema is not None:
            if not (path / "generator_ema.safetensors").is_file():
                raise TrainingError(f"checkpoint {path} has no EMA weights but this run uses ema_decay")
            ema = _matching_tensors(path / "generator_ema.safetensors", self.ema.state_dict())
        states = _torch_file(path / "optimizers.pt")
        if not isinstance(states, dict) or any(not isinstance(states.get(role), dict) for role in self.optimizers):
            raise TrainingError(f"{path / 'optimizers.pt'} does not hold this run's optimiser states")
        rng = _rng_state(path / f"rng-{self.rank}.pt", self.rng)
        copy_roles(roles, self.roles)
        if ema is not None:
            self.ema.load_state_dict(ema)
        for role, optimizer in self.optimizers.items():
            _load_optimizer(optimizer, states[role], path / "optimizers.pt", role)
        for role, scaler in (self.scalers or {}).items():
            if scaler.is_enabled() and isinstance(states.get(f"{role}_scaler"), dict):
                try:
                    scaler.load_state_dict(states[f"{role}_scaler"])
                except (KeyError, TypeError, ValueError, RuntimeError):
                    raise TrainingError(f"{path / 'optimizers.pt'}: the {role} loss-scaler state is damaged") from None
        self.rng.set_state(rng)
        return step


def read_regression_pairs(path: Path, most: int) -> int | None:
    """How many regression pairs the run of checkpoint ``path`` made (None: not recorded, or none made); at
    most ``most``, the run's ``regression_pairs`` (more would be another run's, or a tampered file)."""
    count = json.loads((path / "state.json").read_text()).get("regression_pairs")  # read_step checked the file
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= most):
        raise TrainingError(f"{path / 'state.json'}: regression_pairs must be an integer from 1 to this run's "
                            f"regression_pairs ({most}), not {count!r}")
    return count


def read_step(path: Path) -> int:
    """The step of checkpoint ``path`` (state.json), checked against its folder name."""
    try:
        step = json.loads((path / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        raise TrainingError(f"{path / 'state.json'} is not a checkpoint state (JSON with the step)") from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise TrainingError(f"{path / 'state.json'}: step must be a positive integer (got {step!r})")
    if path.name.startswith("step-") and path.name != f"step-{step:07d}":
        raise TrainingError(f"{path / 'state.json'} says step {step}, its folder {path.name}")
    return step


def read_roles(path: Path, roles: Roles) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint ``path``'s tensors of every role, each file checked to be exactly ``roles``' parameters."""
    return {role: _matching_tensors(path / f"{role}.safetensors", roles.named_parameters(role)) for role in ROLES}


def copy_roles(tensors: dict[str, dict[str, torch.Tensor]], roles: Roles) -> None:
    """Copy :func:`read_roles`' tensors into ``roles``' parameters."""
    with torch.no_grad():
        for role, named_tensors in tensors.items():
            named = roles.named_parameters(role)
            for name, tensor in named_tensors.items():
                named[name].copy_(tensor)


def _matching_tensors(file: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, which must be exactly ``expected``'s names and shapes, finite."""
    try:
        tensors = load_file(file)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {file.parent} has no {file.name}") from None
    except Exception:  # safetensors raises its own error type, or OSError/ValueError, for a damaged file
        raise TrainingError(f"{file} is not a readable safetensors file") from None
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise TrainingError(f"{file} does not match this run's adapters "
                            f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise TrainingError(f"{file}: {name} has shape {tuple(tensor.shape)}, this run needs "
                                f"{tuple(expected[name].shape)} (other ranks or another model)")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise TrainingError(f"{file}: {name} is not a finite floating-point tensor")
    return tensors


def _torch_file(file: Path):
    """A ``torch.save`` file read with ``weights_only`` (never runs code from the file)."""
    try:
        return torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {file.parent} has no {file.name}") from None
    except Exception:  # UnpicklingError for a payload, RuntimeError/EOFError/... for damaged bytes
        raise TrainingError(f"{file} is not a torch file of plain tensors (damaged, or it holds other objects; "
                            "refused without running it)") from None


def _rng_state(file: Path, rng: torch.Generator) -> torch.Tensor:
    if not file.is_file():
        raise TrainingError(f"checkpoint {file.parent} was written by fewer processes (no {file.name})")
    stored = _torch_file(file)
    state = stored.get("rng") if isinstance(stored, dict) else None
    current = rng.get_state()
    if not isinstance(state, torch.Tensor) or state.dtype != current.dtype or state.shape != current.shape:
        raise TrainingError(f"{file} does not hold a random-generator state")
    probe = torch.Generator()
    try:  # the generator itself checks the state's contents
        probe.set_state(state)
    except (RuntimeError, ValueError, TypeError):
        raise TrainingError(f"{file} does not hold a valid random-generator state") from None
    return state


def _load_optimizer(optimizer, state: dict, file: Path, role: str) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError):
        raise TrainingError(f"{file}: the {role} optimiser state does not match this run's adapters") from None
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for value in optimizer.state.get(parameter, {}).values():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != parameter.shape:
                    raise TrainingError(f"{file}: the {role} optimiser state has shape {tuple(value.shape)} "
                                        f"for a parameter of shape {tuple(parameter.shape)}")


def resolve_resume(run: RunFolder, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` (None when the run has none yet) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = run.checkpoints()
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise TrainingError(f"{path} is not a checkpoint folder")
    return path
