"""Finished pieces of a reproduction kept on disk, so a later call resumes instead of retraining.

A reproduction is hours on CPU (tens of (arm, seed) runs), longer than a session or a laptop's battery.
Each finished piece — the teacher's rows, and every (arm, seed) with its curve, its swaps and (seed 0) its
weight comparison — is written to ``results/<piece>.json`` the moment it is done, atomically, tagged with
the settings that made it. A later ``reproduce`` into the same folder reuses each piece whose tag equals its
own settings and retrains the rest; a failed or interrupted call keeps them (and what they depend on:
``compare/`` and ``plan.json``).

The tag is every setting except ``seeds`` (adding seeds reuses the seeds already trained), the run options
every arm starts from (``load_config()`` under the options the reproduction pins: a changed default
retrains), and digests of the teacher's U-Net and of the prompt file — contents, not paths, so a
fresh checkout elsewhere resumes, and a retrained embedded teacher invalidates everything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

RESULTS = "results"      # the stored pieces, inside a reproduction
COMPARE = "compare"      # each arm's first-seed weight comparison: compare/<arm>
PLAN = "plan.json"       # the analysis-derived placement of the plan arm
KEPT_ON_FAILURE = (RESULTS, COMPARE, PLAN)  # what finished pieces need; kept when a call fails
FORMAT = 2  # 2: curves flatten by window means (evaluation.intervals.flattened_at), not single points


PATH_OPTIONS = ("teacher", "prompts", "out", "cache_dir")  # where things are, not what: in the digests


def settings_tag(settings, teacher: Path, pinned: dict | None = None) -> dict:
    """What a stored piece must have been made with to be reused: ``settings`` (a dataclass) without its
    seeds, the run options the arms start from (``load_config(**pinned)``: the embedded defaults under the
    options the reproduction pins, without paths), and the sha256 of the teacher's U-Net weights and of
    the prompt file."""
    from ..config import load_config

    tag = {k: v for k, v in asdict(settings).items() if k != "seeds"}
    base = load_config(**(pinned or {}))
    options = {k: v for k, v in base.to_dict().items() if k not in PATH_OPTIONS}
    return json.loads(json.dumps({"format": FORMAT, "settings": tag, "run_options": options,
                                  "teacher_unet": _digest(sorted((Path(teacher) / "unet").glob("*.safetensors"))),
                                  "prompts": _digest([Path(base.prompts)])}))


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class ResultStore:
    """The ``results/`` folder of one reproduction: :meth:`load` a piece made with the same tag, :meth:`save`
    one (atomically). Pieces are named ``teacher`` or ``<arm>-seed<k>``."""

    def __init__(self, out: Path, tag: dict, resume: bool = True):
        self.folder = Path(out) / RESULTS
        self.tag = tag
        self.resume = resume

    @staticmethod
    def piece(name: str, seed: int | None = None) -> str:
        return name if seed is None else f"{name}-seed{seed}"

    def path(self, piece: str) -> Path:
        return self.folder / f"{piece}.json"

    def load(self, piece: str) -> dict | None:
        """The stored content of ``piece``, or None: not stored, resuming off, unreadable, or made with
        other settings (then it is retrained and overwritten)."""
        path = self.path(piece)
        if not self.resume or not path.is_file() or path.is_symlink():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("tag") != self.tag or "content" not in stored:
            return None
        return stored["content"]

    def save(self, piece: str, content: dict) -> None:
        from wadi_analysis.atomic import atomic_write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(piece), json.dumps({"tag": self.tag, "content": content}, indent=1,
                                                       default=_plain) + "\n")

    def has_results(self) -> bool:
        return self.folder.is_dir() and any(self.folder.glob("*.json"))


def _plain(value):
    """JSON for the numpy scalars a score row may hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")
