"""The layout's rules, checked on the source: thin commands, one-way imports, a true architecture map."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("wadi_analysis", "wadi_distill")
MAX_COMMAND_BODY = 25


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def command_bodies(cli: Path):
    """(command function name, lines of its body without the docstring) for every ``@app.command``."""
    for node in ast.parse(cli.read_text()).body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in node.decorator_list):
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(
                node.body[0].value, ast.Constant) else node.body
            yield node.name, body[-1].end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("cli", ["wadi_analysis/cli.py", "wadi_distill/cli.py"])
def test_commands_are_thin(cli):
    bodies = dict(command_bodies(REPO / cli))
    assert len(bodies) >= 6  # the parser found the commands
    too_long = {name: lines for name, lines in bodies.items() if lines > MAX_COMMAND_BODY}
    assert not too_long, f"commands longer than {MAX_COMMAND_BODY} lines: {too_long}"


def test_analysis_never_imports_distill():
    offenders = [str(p.relative_to(REPO)) for p in modules("wadi_analysis")
                 if any(name.startswith("wadi_distill") for name in imported_modules(p))]
    assert not offenders


def test_distill_shares_the_boundary_not_the_analysis_cli():
    offenders = [str(p.relative_to(REPO)) for p in modules("wadi_distill")
                 if any(name.startswith("wadi_analysis.cli.") or name == "wadi_analysis.cli"
                        for name in imported_modules(p))]
    assert not offenders


def test_the_loop_imports_neither_export_nor_the_loaders():
    imports = imported_modules(REPO / "wadi_distill" / "training" / "loop.py")
    assert not {name for name in imports if name.startswith("wadi_distill.export")}
    assert not {name for name in imports if name in ("wadi_distill.runs.load_one_step", "wadi_distill.runs.load_sampler")}


def test_readme_architecture_map_lists_every_module():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1]
    tree = re.search(r"```\n(.*?)```", section, re.S).group(1)
    listed, folders = set(), {}
    for line in tree.splitlines():
        match = re.match(r"^(\s*)(\S+)", line)
        if not match:
            continue
        indent, word = len(match.group(1)), match.group(2)
        if word.endswith("/"):
            folders = {k: v for k, v in folders.items() if k < indent}
            folders[indent] = word
        elif word.endswith(".py"):
            parents = [v for k, v in sorted(folders.items()) if k < indent]
            listed.add("".join(parents) + word)
    missing = [str(p.relative_to(REPO)) for package in PACKAGES for p in modules(package)
               if p.name != "__init__.py" and str(p.relative_to(REPO)) not in listed]
    assert not missing, f"modules missing from README's architecture map: {missing}"
    stale = [name for name in listed if name.startswith(PACKAGES) and not (REPO / name).is_file()]
    assert not stale, f"README's architecture map lists modules that do not exist: {stale}"
