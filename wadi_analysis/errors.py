"""The one error every bad input becomes, and its one line for the user.

Library code raises :class:`UserError` (or a subclass: ``CheckpointError``, ``AdapterFileError``,
``TrainingError``) when the input, not the code, is at fault; the command-line boundary
(:mod:`wadi_analysis.cli_boundary`) turns it into ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import unicodedata


class UserError(Exception):
    """Bad input: its message is one line a user can act on."""


class InvalidValue(UserError, ValueError):
    """A bad argument value: a :class:`UserError` that Python callers may also catch as ``ValueError``."""


def one_line(message: object) -> str:
    """The message as one line: whitespace runs (newlines included) become single spaces."""
    return " ".join(str(message).split())


def terminal_safe(text: object) -> str:
    """``text`` with every control and format character (escape sequences, bells, bidi overrides)
    shown as a visible ``\\xNN`` / ``\\uNNNN`` escape: untrusted strings (tensor and file names,
    metadata) reach the terminal as text, never as commands to it. Tabs and newlines are kept."""
    return "".join(ch if ch in "\t\n" or unicodedata.category(ch) not in _HIDDEN else _escape(ch) for ch in str(text))


_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
