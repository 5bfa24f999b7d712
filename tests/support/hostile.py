"""The hostile-input contract, checked the same way for every case of both CLIs.

A case runs one command in-process (typer's CliRunner; the console-script path through
``cli_boundary.main`` is checked by a subprocess test of its own) inside a folder holding everything
the case reads and writes. It must end with exit code 2, exactly one line ``error: ...`` on stderr
and nothing on stdout, no traceback, no file created, changed or deleted under the folder, and no
marker file written by a payload.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "PWNED"  # a payload that runs writes this file next to the inputs


@dataclass
class Case:
    """One hostile input: ``args`` (paths as str, relative to the case folder allowed via ``{root}``),
    and what the message must mention (``expect``, a substring, case-insensitive)."""

    id: str
    args: list[str]
    expect: str = ""
    env: dict[str, str] = field(default_factory=dict)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, link target or content hash, mode."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[key] = ("dir", path.stat().st_mode)
            else:
                entries[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return entries


def check_refused(result, root: Path, before: dict, expect: str = "") -> None:
    """The contract for one case (``result`` of CliRunner.invoke, ``before`` = snapshot(root))."""
    stderr, stdout = result.stderr, result.stdout
    assert result.exit_code == 2, f"exit {result.exit_code}; stderr: {stderr[-800:]!r}; exception: {result.exception!r}"
    assert "Traceback" not in stderr + stdout
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line: {stderr[-800:]!r}"
    assert "\x1b" not in stderr and "\x07" not in stderr, "a control character reached the terminal"
    assert stdout == "", f"stdout: {stdout[-300:]!r}"
    assert not (root / MARKER).exists(), "a payload ran"
    after = snapshot(root)
    assert after == before, f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:6]}"
    if expect:
        assert expect.lower() in lines[0].lower(), f"{expect!r} not in {lines[0]!r}"
