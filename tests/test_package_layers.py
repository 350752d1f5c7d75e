"""The house's structure, from its imports: no import cycle between molora's modules and no package importing one
above it (at module level, inside a function or for type checking alike); the counter-tests show both checks fail
on a graph that breaks them. The order is the one docs/concepts/layout.md and ../shared/DESIGN.md draw."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "molora"
# Bottom to top: a module may import its own layer and the ones below it.
LAYERS = ("version", "utils", "files", "core", "deploy", "model", "analysis", "run", "ablation", "cli", "__init__")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """molora.core.config -> core's index; molora (the package's __init__) is the top."""
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "__init__")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the molora modules it imports}, every import statement wherever it stands."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("molora"):
                    graph[name].add(target)
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_sits_in_a_known_layer():
    graph = import_graph()
    assert len(graph) > 40
    for module in graph:
        layer_of(module)  # raises for a package LAYERS does not order


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_package_imports_one_above_it():
    assert upward_imports(import_graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {
        "molora.core.config": {"molora.core.routers"},
        "molora.core.routers": {"molora.core.config"},
        "molora.core.layer": {"molora.run.training"},
        "molora.run.training": set(),
    }
    assert cycles(graph) == [["molora.core.config", "molora.core.routers"]]
    assert upward_imports(graph) == ["molora.core.layer -> molora.run.training"]


def test_the_walk_sees_imports_inside_functions_and_for_type_checking(tmp_path):
    package = tmp_path / "molora"
    (package / "core").mkdir(parents=True)
    (package / "run").mkdir()
    for path in (package / "__init__.py", package / "core/__init__.py", package / "run/__init__.py"):
        path.write_text("")
    (package / "run" / "training.py").write_text("X = 1\n")
    (package / "core" / "layer.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from molora.run.training import X\n"
        "def f():\n    from ..run import training\n"
    )
    graph = import_graph(package)
    assert graph["molora.core.layer"] == {"molora.run", "molora.run.training"}


@pytest.mark.parametrize("old", sorted(__import__("molora").MOVED_MODULES))
def test_every_module_path_from_before_the_packages_still_imports(old):
    import importlib

    module = importlib.import_module(f"molora.{old}")
    assert module.__name__ == f"molora.{__import__('molora').MOVED_MODULES[old]}"  # the module that holds it now
    assert importlib.import_module(module.__name__) is module  # one module object under both names


def test_the_import_lines_readme_showed_before_the_packages_still_work():
    from molora.data import DataConfig
    from molora.inspect import RoutingRecorder, write_report
    from molora.integrations import MoLoRATrainer
    from molora.rank_gates import effective_ranks, prune_ranks
    from molora.rank_report import write_rank_report
    from molora.ranks import analyze_ranks
    from molora.routers import LinearRouter, register_router

    assert all(
        callable(name)
        for name in (DataConfig, RoutingRecorder, write_report, MoLoRATrainer, effective_ranks, prune_ranks)
    )
    assert all(callable(name) for name in (write_rank_report, analyze_ranks, LinearRouter, register_router))
