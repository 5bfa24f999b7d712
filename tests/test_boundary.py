"""The shared command-line boundary: one sanitised `error:` line for bad input, usage errors and bugs."""

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from wadi_analysis.cli_boundary import App, DEBUG_VARIABLE
from wadi_analysis.errors import UserError, terminal_safe

ESCAPES = "name\x1b]0;owned\x07\x1b[2J\u202e"
app = App(expected=(ValueError,))


@app.command()
def act(what: Annotated[str, typer.Argument()], count: Annotated[int, typer.Option(min=1)] = 1) -> None:
    raisers = {"user": lambda: UserError(f"bad {ESCAPES}\nsecond line"), "value": lambda: ValueError("bad value"),
               "os": lambda: FileNotFoundError(2, "No such file or directory", "/x/y"),
               "bug": lambda: ZeroDivisionError("division by zero"), "interrupt": lambda: KeyboardInterrupt(),
               "recursion": lambda: RecursionError("maximum recursion depth exceeded")}
    if what in raisers:
        raise raisers[what]()
    print("ok")


@app.command()
def other() -> None:
    """A second command, so that the app is a group as the real CLIs are."""


@pytest.mark.parametrize("args, code, text", [
    (["act", "user"], 2, "error: bad name\\x1b]0;owned\\x07\\x1b[2J\\u202e second line"),
    (["act", "value"], 2, "error: bad value"),
    (["act", "os"], 2, "error: /x/y: No such file or directory"),
    (["act", "bug"], 2, f"internal error (ZeroDivisionError: division by zero); rerun with {DEBUG_VARIABLE}=1"),
    (["act", "recursion"], 2, "internal error (RecursionError"),
    (["act", "interrupt"], 130, "error: interrupted"),
    (["act", "x", "--count", "0"], 2, "error: Invalid value for '--count'"),
    (["act"], 2, "error: Missing argument"),
    (["act", "x", "--nope"], 2, "error: No such option: --nope"),
    (["nope"], 2, "error: No such command"),
])
def test_every_failure_is_one_line(args, code, text):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert text in result.stderr and "Traceback" not in result.stderr and result.stdout == ""
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr


def test_success_and_help_are_untouched():
    runner = CliRunner()
    assert runner.invoke(app, ["act", "fine"]).stdout == "ok\n"
    helped = runner.invoke(app, ["act", "--help"])
    assert helped.exit_code == 0 and "--count" in helped.stdout


def test_debug_lets_a_bug_through(monkeypatch):
    monkeypatch.setenv(DEBUG_VARIABLE, "1")
    result = CliRunner().invoke(app, ["act", "bug"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_terminal_safe_shows_control_characters_as_text():
    assert terminal_safe("a\x1b[2Jb\tc\n\u200bd") == "a\\x1b[2Jb\tc\n\\u200bd"
    assert terminal_safe("Ünïcødé ok") == "Ünïcødé ok"


@pytest.mark.parametrize("script", ["wadi-analyze", "wadi-distill"])
def test_console_scripts_go_through_the_boundary(script, tmp_path):
    """The real entry points (``cli_boundary.main``), not CliRunner: a usage error and a missing input."""
    binary = Path(sys.executable).with_name(script)
    usage = subprocess.run([str(binary), "sample" if script == "wadi-distill" else "compare", "--nope"],
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and usage.stderr.startswith("error: ") and usage.stderr.count("\n") == 1
    missing = subprocess.run([str(binary), "export" if script == "wadi-distill" else "info", str(tmp_path / "no"),
                              *(["--out", str(tmp_path / "o")] if script == "wadi-distill" else [])],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()
