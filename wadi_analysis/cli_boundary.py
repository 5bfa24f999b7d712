"""The command-line boundary both CLIs share (``wadi-analyze``, ``wadi-distill``).

The promise: bad input ends in ONE line ``error: ...`` on stderr and exit code 2; Ctrl-C ends in
``error: interrupted`` and exit code 130. Commands do not catch errors themselves: every command of
an :class:`App` runs inside :func:`guarded`, which turns :class:`~wadi_analysis.errors.UserError`,
``OSError`` and the app's other ``expected`` exception types into that line. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import NoReturn

import typer

from .errors import UserError, one_line

INTERRUPTED_EXIT = 130
USAGE_EXIT = 2


def fail(message: object) -> NoReturn:
    """One line on stderr, exit code 2: the contract for every bad input."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise typer.Exit(USAGE_EXIT)


def describe(exc: BaseException) -> str:
    """The user's line for an expected exception: OS errors name the file and the reason."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and (exc.filename or exc.strerror):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc) or type(exc).__name__


def guarded(function, expected: tuple[type[BaseException], ...]):
    """``function`` with the boundary around it (``functools.wraps`` keeps typer's view of its options)."""
    @functools.wraps(function)
    def command(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(INTERRUPTED_EXIT) from None
        except (UserError, OSError, *expected) as exc:
            fail(describe(exc))
    return command


class App(typer.Typer):
    """A typer app whose every command runs inside the error boundary.

    ``expected``: exception types besides ``UserError`` and ``OSError`` that mean bad input for this
    app's library calls (e.g. ``ValueError`` from validation)."""

    def __init__(self, *, expected: tuple[type[BaseException], ...] = (), **kwargs) -> None:
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("pretty_exceptions_enable", False)
        super().__init__(**kwargs)
        self.expected = tuple(expected)

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(function):
            register(guarded(function, self.expected))
            return function
        return decorator


def main(app: typer.Typer) -> None:
    """Run ``app`` as a console script; an interrupt outside any command also ends in one line."""
    try:
        app()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
