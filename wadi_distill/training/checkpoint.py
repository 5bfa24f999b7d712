"""Checkpoints of a run, with one owner for saving, finding and loading them (edm2's ``CheckpointIO``).

``RUN/checkpoints/step-NNNNNNN/`` holds what the run needs to go on exactly where it stopped:

    generator.safetensors, fake.safetensors   the trainable tensors of both roles
    generator_ema.safetensors                 the generator's EMA (runs with ``ema_decay``)
    optimizers.pt                             both optimisers' states
    rng-RANK.pt                               every process's sampling RNG
    state.json                                the step

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
                 ema: AdapterEMA | None = None, accelerator=None, keep: int = 2) -> None:
        self.run, self.roles, self.optimizers, self.rng, self.ema = run, roles, optimizers, rng, ema
        self.accelerator, self.keep = accelerator, keep
        self.rank = accelerator.process_index if accelerator else 0

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
            torch.save({role: opt.state_dict() for role, opt in self.optimizers.items()}, tmp / "optimizers.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            os.replace(tmp, final)
            for old in self.run.checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load(self, path: Path) -> int:
        """Restore everything from checkpoint ``path``; returns its step."""
        with torch.no_grad():
            for role in ROLES:
                named = self.roles.named_parameters(role)
                for name, tensor in load_file(path / f"{role}.safetensors").items():
                    if name not in named:
                        raise TrainingError(f"checkpoint {path} does not match this run's adapters ({name})")
                    named[name].copy_(tensor)
        if self.ema is not None:
            if not (path / "generator_ema.safetensors").is_file():
                raise TrainingError(f"checkpoint {path} has no EMA weights but this run uses ema_decay")
            self.ema.load_state_dict(load_file(path / "generator_ema.safetensors"))
        states = torch.load(path / "optimizers.pt", weights_only=True)
        for role, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[role])
        rng_file = path / f"rng-{self.rank}.pt"
        if not rng_file.is_file():
            raise TrainingError(f"checkpoint {path} was written by fewer processes (no {rng_file.name})")
        self.rng.set_state(torch.load(rng_file, weights_only=True)["rng"])
        return json.loads((path / "state.json").read_text())["step"]


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
