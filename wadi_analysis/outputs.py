"""One policy for every path the tools write (``--out``), so that nothing the user owns is lost.

- An output is never an input, never contains one and never lies inside one (paths compared after
  resolving links).
- Writes never follow links: an output path that is a symlink is refused.
- The kind must fit: a folder output is not an existing file, a file output not an existing folder,
  and the parent of an output is not a file.
- A folder that is replaced whole is replaced only when it is empty, was written by this project
  (``ours``: a marker file it holds), or the user said ``overwrite``.
- Everything is checked before the first write; outputs are staged next to their place (a hidden
  ``.NAME.tmp`` sibling) and renamed into place only when complete (:func:`staged_folder`;
  files: :func:`wadi_analysis.atomic.atomic_write`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, folder: bool,
                 replace: bool = False, overwrite: bool = False,
                 ours: Callable[[Path], bool] | None = None) -> Path:
    """``out`` if the policy allows writing it, else a :class:`UserError` naming why.

    ``folder``: the output is a folder (else a file). ``replace``: the folder is replaced whole (then
    an existing non-empty folder must be ``ours`` or ``overwrite`` given)."""
    out = Path(out)
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; outputs are never written through links")
    target = _resolved(out)
    for source in inputs:
        source_path = _resolved(source)
        if _inside(target, source_path) or _inside(source_path, target):
            relation = "is" if target == source_path else "lies inside" if _inside(target, source_path) else "contains"
            raise UserError(f"--out {out} {relation} the input {source}; choose an output apart from the inputs")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--out {out}: {parent} is a file, not a folder")
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; a folder is needed")
    if not folder and out.is_dir():
        raise UserError(f"--out {out} is a folder; a file is needed")
    if folder and replace and out.is_dir() and any(out.iterdir()) and not overwrite and not (ours and ours(out)):
        raise UserError(f"--out {out} is a non-empty folder this tool did not write; "
                        "choose another --out or pass --overwrite to replace it")
    return out


@contextmanager
def staged_folder(out: str | os.PathLike):
    """A temporary sibling folder to write into; on success it replaces ``out`` (checked before with
    :func:`check_output`), on failure it is removed and ``out`` is left as it was."""
    out = Path(out)
    stage = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.parent.mkdir(parents=True, exist_ok=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
