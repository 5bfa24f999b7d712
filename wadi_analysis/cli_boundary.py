"""The command-line boundary both CLIs share (``wadi-analyze``, ``wadi-distill``).

The promise: whatever goes wrong ends in ONE line ``error: ...`` on stderr, and the user's
terminal only ever sees sanitised text (:func:`~wadi_analysis.errors.terminal_safe`):

- bad input (:class:`~wadi_analysis.errors.UserError`, ``OSError`` and the app's other ``expected``
  types) and usage errors (an option out of range, a missing argument: click's exceptions, which
  typer would print as a five-line panel): exit code 2;
- Ctrl-C: ``error: interrupted``, exit code 130;
- anything else is a bug: ``error: internal error (...)`` naming the exception, exit code 2, and
  how to see the traceback: ``WADI_DEBUG=1`` lets it through unchanged.

Commands do not catch errors themselves: every command of an :class:`App` runs inside
:func:`guarded`, and the app's click group (:class:`OneLineErrors`) handles what happens while
parsing.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import NoReturn

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own click (typer._click), whose exceptions are not click's
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # older typer on the click package
    from click.exceptions import ClickException, NoArgsIsHelpError

from .errors import UserError, one_line, terminal_safe

INTERRUPTED_EXIT = 130
USAGE_EXIT = 2
DEBUG_VARIABLE = "WADI_DEBUG"


def debugging() -> bool:
    """``WADI_DEBUG=1``: internal errors keep their traceback."""
    return os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


def say_error(message: object) -> None:
    print(f"error: {terminal_safe(one_line(message))}", file=sys.stderr)


def fail(message: object) -> NoReturn:
    """One line on stderr, exit code 2: the contract for every bad input."""
    say_error(message)
    raise typer.Exit(USAGE_EXIT)


def describe(exc: BaseException) -> str:
    """The user's line for an expected exception: OS errors name the file and the reason."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and (exc.filename or exc.strerror):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc) or type(exc).__name__


def internal(exc: BaseException) -> str:
    """The line for a bug: what was raised, and how to see where."""
    detail = one_line(exc)[:300]
    return (f"internal error ({type(exc).__name__}{': ' + detail if detail else ''}); "
            f"rerun with {DEBUG_VARIABLE}=1 for the traceback and please report it")


def guarded(function, expected: tuple[type[BaseException], ...]):
    """``function`` with the boundary around it (``functools.wraps`` keeps typer's view of its options)."""
    @functools.wraps(function)
    def command(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            say_error("interrupted")
            raise typer.Exit(INTERRUPTED_EXIT) from None
        except (UserError, OSError, *expected) as exc:
            fail(describe(exc))
        except Exception as exc:
            if debugging():
                raise
            fail(internal(exc))
    return command


class OneLineErrors(TyperGroup):
    """The app's click group: usage errors become one ``error:`` line (exit 2), not typer's panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # no arguments: the help, as typer shows it
            print(exc.ctx.get_help() if exc.ctx else exc.format_message(), file=sys.stderr)
            code = USAGE_EXIT
        except ClickException as exc:
            say_error(exc.format_message())
            code = exc.exit_code
        except typer.Abort:
            say_error("interrupted")
            code = INTERRUPTED_EXIT
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


class App(typer.Typer):
    """A typer app whose every command runs inside the error boundary.

    ``expected``: exception types besides ``UserError`` and ``OSError`` that mean bad input for this
    app's library calls (e.g. ``ValueError`` from validation)."""

    def __init__(self, *, expected: tuple[type[BaseException], ...] = (), **kwargs) -> None:
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs.setdefault("cls", OneLineErrors)
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
        say_error("interrupted")
        sys.exit(INTERRUPTED_EXIT)
