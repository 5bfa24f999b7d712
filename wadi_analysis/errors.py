"""The one error every bad input becomes, and its one line for the user.

Library code raises :class:`UserError` (or a subclass: ``CheckpointError``, ``AdapterFileError``,
``TrainingError``) when the input, not the code, is at fault; the command-line boundary
(:mod:`wadi_analysis.cli_boundary`) turns it into ``error: ...`` and exit code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: its message is one line a user can act on."""


class InvalidValue(UserError, ValueError):
    """A bad argument value: a :class:`UserError` that Python callers may also catch as ``ValueError``."""


def one_line(message: object) -> str:
    """The message as one line: whitespace runs (newlines included) become single spaces."""
    return " ".join(str(message).split())
