"""dvc.yaml's code deps match the code: each stage depends on every mpprop module (and package
data file, such as the C++ kernel source) that the command it runs can import.

All static (ast, yaml): no mpprop module is imported. For each stage, the `mpprop <command>`
in its cmd is mapped to the command's function in cli.py (the group's `@main.command`s); the
mpprop modules imported inside that function are its roots, and their import closure over the
package (imports at top level and inside functions, followed recursively) is what the stage
runs. Package data files (non-Python files under src/mpprop, e.g. csrc/edge_gate.cpp, which
kernels.py compiles) count when a module of the closure names them in a string.
"""

from __future__ import annotations

import ast
import re
import shlex
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mpprop"
PACKAGE_DIR = REPO / "src" / PACKAGE
CLI = PACKAGE_DIR / "cli.py"
DVC_YAML = REPO / "dvc.yaml"

# Modules the stages deliberately do not depend on (dvc.yaml's header says so): every command
# goes through them, so a change to either would rerun the whole pipeline.
# - cli.py: the command line itself (option parsing, printing); what a stage computes is in
#   the stage modules below it.
# - config.py, params_schema.py: the params loader and its schema; the params values that
#   change a stage's outputs are its `params:` deps, key by key.
EXCLUDED = {
    "src/mpprop/cli.py",
    "src/mpprop/config.py",
    "src/mpprop/params_schema.py",
    # config.py's fallback params outside a project folder: a DVC project has params.yaml
    "src/mpprop/defaults.yaml",
}

# click >= 8.2 derives a command's name from its function's name this way
_CLICK_SUFFIXES = ("_command", "_cmd", "_group", "_grp")


def rel(path: Path) -> str:
    return path.resolve().relative_to(REPO).as_posix()


def module_file(name: str) -> Path | None:
    """The file of module `name` (dotted, e.g. mpprop.data) in src/, or None if not ours."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.resolve().relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(node: ast.AST, importer: Path) -> set[Path]:
    """Files of the mpprop modules imported anywhere under `node` (top level, functions)."""
    package = module_name(importer)
    if importer.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[Path] = set()
    for sub in ast.walk(node):
        names: list[str] = []
        if isinstance(sub, ast.Import):
            # `import mpprop.a.b` imports mpprop.a and mpprop.a.b
            for alias in sub.names:
                parts = alias.name.split(".")
                names += [".".join(parts[: i + 1]) for i in range(len(parts))]
        elif isinstance(sub, ast.ImportFrom):
            if sub.level:
                base = package.split(".")[: len(package.split(".")) - (sub.level - 1)]
                base_name = ".".join(base + ([sub.module] if sub.module else []))
            else:
                base_name = sub.module or ""
            names.append(base_name)
            # `from mpprop import kernels`: a submodule when such a module exists
            names += [f"{base_name}.{alias.name}" for alias in sub.names]
        for name in names:
            path = module_file(name)
            if path is not None:
                found.add(path.resolve())
    return found


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def import_closure(roots: set[Path]) -> set[Path]:
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imported_modules(parse(path), path) - seen
    return seen


def package_data_files() -> list[Path]:
    return sorted(
        p.resolve() for p in PACKAGE_DIR.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    )


def loaded_data_files(modules: set[Path]) -> set[Path]:
    """Package data files named (by file name) in a string constant of one of `modules`."""
    strings = {
        node.value for module in modules for node in ast.walk(parse(module))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    # the whole name: "efermi.pth.tar" (a published checkpoint) does not name efermi.pt
    return {f for f in package_data_files()
            if any(re.search(rf"(?<![\w.-]){re.escape(f.name)}(?![\w.-])", s) for s in strings)}


def _is_group_command(decorator: ast.expr) -> bool:
    func = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(func, ast.Attribute) and func.attr == "command"
            and isinstance(func.value, ast.Name) and func.value.id == "main")


def _command_name(func: ast.FunctionDef, decorator: ast.expr) -> str:
    if isinstance(decorator, ast.Call):
        if decorator.args and isinstance(decorator.args[0], ast.Constant):
            return decorator.args[0].value
        for kw in decorator.keywords:
            if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                return kw.value.value
    name = func.name.lower()
    for suffix in _CLICK_SUFFIXES:
        if name.endswith(suffix) and name != suffix[1:]:
            name = name[: -len(suffix)]
            break
    return name.replace("_", "-")


@cache
def cli_commands() -> dict[str, set[Path]]:
    """Each `mpprop` command -> the files of the mpprop modules imported in its function."""
    commands: dict[str, set[Path]] = {}
    for node in parse(CLI).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if _is_group_command(decorator):
                commands[_command_name(node, decorator)] = imported_modules(node, CLI)
    return commands


@cache
def group_value_options() -> frozenset[str]:
    """The `mpprop` group's options that take a value (e.g. --params, -S/--set)."""
    options: set[str] = set()
    for node in parse(CLI).body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr == "option"
                        and not any(kw.arg in ("is_flag", "count") for kw in decorator.keywords)):
                    options |= {
                        a.value for a in decorator.args
                        if isinstance(a, ast.Constant) and str(a.value).startswith("-")
                    }
    return frozenset(options)


def mpprop_commands(cmd: str | list[str]) -> list[str]:
    """The mpprop commands a stage's cmd runs, e.g. `mkdir -p x && mpprop tune ...` -> [tune]."""
    found = []
    for line in [cmd] if isinstance(cmd, str) else cmd:
        tokens = shlex.split(line)
        for i, token in enumerate(tokens):
            if token != PACKAGE:
                continue
            rest = iter(tokens[i + 1:])
            for arg in rest:
                if arg.startswith("-"):
                    if arg in group_value_options():
                        next(rest, None)
                    continue
                found.append(arg)
                break
    return found


def dvc_stages() -> dict[str, dict]:
    """Each stage's definition (a foreach stage's `do`)."""
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    return {name: stage["do"] if "foreach" in stage else stage for name, stage in stages.items()}


def stage_deps(stage: dict) -> set[str]:
    deps = set()
    for dep in stage.get("deps", []):
        dep = next(iter(dep)) if isinstance(dep, dict) else dep
        deps.add(str(dep).removeprefix("./").rstrip("/"))
    return deps


def required_code_deps(command: str) -> set[str]:
    modules = import_closure(cli_commands()[command])
    files = modules | loaded_data_files(modules)
    return {rel(f) for f in files} - EXCLUDED


def test_cli_commands_found():
    # guards the AST walk of cli.py: the pipeline's commands are there, each with its modules
    commands = cli_commands()
    for name in ("fetch", "featurize", "split", "tune", "train", "evaluate", "promote", "report"):
        assert commands.get(name), f"`mpprop {name}` or its stage module not found in cli.py"


def test_closure_follows_function_imports():
    # model.py imports kernels (`from mpprop import kernels`), kernels.py compiles the C++ source
    train = required_code_deps("train")
    assert {"src/mpprop/training.py", "src/mpprop/model.py", "src/mpprop/kernels.py",
            "src/mpprop/csrc/edge_gate.cpp"} <= train
    assert not train & EXCLUDED


def test_stages_depend_on_their_code():
    missing: dict[str, list[str]] = {}
    checked = 0
    for name, stage in dvc_stages().items():
        commands = mpprop_commands(stage["cmd"])
        unknown = [c for c in commands if c not in cli_commands()]
        assert not unknown, f"stage {name}: unknown mpprop command(s) {unknown} in its cmd"
        required = set().union(*(required_code_deps(c) for c in commands))
        checked += bool(commands)
        lacking = sorted(required - stage_deps(stage))
        if lacking:
            missing[name] = lacking
    assert checked, "no stage of dvc.yaml runs an mpprop command"
    assert not missing, "dvc.yaml stages miss code deps (modules their command can import):\n" + "\n".join(
        f"  {name}: {', '.join(files)}" for name, files in missing.items()
    )


def test_no_stale_code_deps():
    stale = {
        name: sorted(d for d in stage_deps(stage) if d.startswith("src/") and not (REPO / d).exists())
        for name, stage in dvc_stages().items()
    }
    stale = {name: deps for name, deps in stale.items() if deps}
    assert not stale, f"dvc.yaml deps on files that do not exist: {stale}"
