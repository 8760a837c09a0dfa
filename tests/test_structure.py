"""The package's shape: MLflow only behind tracking/, and no import cycles."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

from conftest import REPO, subprocess_env

SRC = REPO / "src"
PACKAGE = SRC / "transferlab"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module ``module`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module or ""
            targets = [base.rstrip(".")] + [f"{base.rstrip('.')}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def test_no_import_cycle_among_the_package_s_modules() -> None:
    modules = _modules()
    graph = {m: _imported(m, p, modules) for m, p in modules.items()}
    # A package imports its own submodules by design (``data/__init__`` re-exports them).
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError:
        return
    raise AssertionError("no cycle found in a -> b -> c -> a")


def test_mlflow_is_imported_under_tracking_only() -> None:
    outside = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names) and "tracking" not in path.parts:
                outside.append(str(path.relative_to(SRC)))
    assert outside == []


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Every module in one new interpreter, the most deeply nested first: none needs another imported first."""
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    names = sorted(_modules(), key=lambda name: -name.count("."))
    proc = subprocess.run([sys.executable, "-c", code, *names], env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
