"""The layers hold: stages never import each other, the core imports no CLI, tracking,
tuning or validation framework (nor anything above it), a literal that a contract owns
(the bundle's file name, MLflow tag names) is spelled only by its owner, and params stay
typed after loading (sections read by attribute, never as dicts)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

from mpprop import registry, tracking

SRC = REPO / "src" / "mpprop"
# the core: structures, graphs, the model, the one batch loop, inference and their files
CORE = {"settings", "graph_cache", "batches", "model", "training", "losses", "device",
        "kernels", "stats", "bundle", "ood", "intervals", "inference", "graphs", "snapshot",
        "data", "outputs", "faults", "write_errors", "predict_inputs", "prediction_csv"}
FRAMEWORKS = {"click", "mlflow", "optuna", "optuna_integration", "pydantic"}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_stages_never_import_each_other():
    offenders = {p.name: sorted(m for m in imports_of(p) if m.startswith("mpprop.stages"))
                 for p in (SRC / "stages").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_imports_no_framework_and_nothing_above_it(module):
    imported = imports_of(SRC / f"{module}.py")
    frameworks = {m for m in imported if m.split(".")[0] in FRAMEWORKS}
    above = {m for m in imported if m.startswith("mpprop.")
             and m.split(".")[1] not in CORE}
    assert not frameworks, f"{module} imports {frameworks}"
    assert not above, f"{module} imports {above} (not core)"


def _string_literals(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


OWNED = {
    "bundle.py": {"model.pt"},
    "tracking.py": {v for k, v in vars(tracking).items()
                    if k.startswith("TAG_") and isinstance(v, str) and v.startswith("mpprop.")},
    "registry.py": set(registry.PARENT_TAGS),
}


def test_owned_literals_are_spelled_only_by_their_owner():
    files = [*SRC.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    found = {}
    for owner, literals in OWNED.items():
        assert literals, owner
        for path in files:
            if path.name == owner:
                continue
            clash = literals & _string_literals(path)
            if clash:
                found[str(path.relative_to(REPO))] = sorted(clash)
    assert not found


# the sections of params.yaml that are one model each (config.Params returns the model);
# `presets` and `property_specs` map names to entries and are looked up by name
SECTIONS = {"data", "graph", "split", "train", "tune", "mlflow", "predict", "evaluate",
            "report", "promote", "pretrain"}
DICT_METHODS = {"get", "update", "items", "keys", "values", "setdefault", "pop"}


def _is_section(node: ast.AST) -> bool:
    """`params.<section>` (also `x.params.<section>`)."""
    if not (isinstance(node, ast.Attribute) and node.attr in SECTIONS):
        return False
    owner = node.value
    return (isinstance(owner, ast.Name) and owner.id == "params") or (
        isinstance(owner, ast.Attribute) and owner.attr == "params")


def dict_lookups_of_params(path: Path) -> list[str]:
    """`params.<section>[...]`, `params.<section>.get(...)` (and the other dict methods)
    and `params.raw` in one file, as `file:line`."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        subscript = isinstance(node, ast.Subscript) and _is_section(node.value)
        method = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in DICT_METHODS and _is_section(node.func.value))
        raw = (isinstance(node, ast.Attribute) and node.attr == "raw"
               and isinstance(node.value, ast.Name) and node.value.id == "params")
        if subscript or method or raw:
            hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return hits


def test_params_are_read_by_attribute_after_loading():
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in dict_lookups_of_params(path)]
    assert not found, f"dict lookups of typed params sections: {found}"
