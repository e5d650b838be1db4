"""The package's layers import only downward and no modules import each other in a cycle.

Layers, lowest first (a module may import its own layer and the layers below):

    core (engram/*.py) <- engram.storage <- engram.model <- engram.train / engram.distributed
        <- engram.experiments / engram.reports / engram.hf <- engram.cli

Every ``import`` and ``from ... import`` is read from the source with ``ast`` (at module level and inside
functions, relative and absolute), so a lazy import inside a function cannot hide an upward edge or a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import engram

PACKAGE_DIR = Path(engram.__file__).parent
CORE = "core"
LAYERS = {
    CORE: 0,
    "storage": 1,
    "model": 2,
    "train": 3,
    "distributed": 3,
    "experiments": 4,
    "reports": 4,
    "hf": 4,
    "cli": 5,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``engram.X...`` -> X when X is a layer package or ``engram.cli``; every other engram module is core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else CORE


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The engram modules ``module`` imports anywhere in ``source`` (``from pkg import submodule`` counts as the
    submodule when it is one)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(subs if len(subs) == len(node.names) else [target, *subs])
    return {m for m in found if m == "engram" or m.startswith("engram.")}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {m: imports_of(p.read_text(), m, p.name == "__init__.py", known) - {m} for m, p in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if LAYERS[layer_of(t)] > LAYERS[layer_of(m)]
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same edges between layers (``engram.train`` -> ``engram.distributed``, ...), self-edges dropped."""
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(layer_of(m), set()).update(layer_of(t) for t in targets if layer_of(t) != layer_of(m))
    return out


def test_engram_imports_only_downward():
    assert upward_imports(import_graph(PACKAGE_DIR)) == []


def test_no_modules_or_layer_packages_import_each_other_in_a_cycle():
    graph = import_graph(PACKAGE_DIR)
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == []


def test_the_checker_sees_upward_imports_inside_functions_and_relative_ones(tmp_path):
    root = tmp_path / "engram"
    for sub in ("storage", "model"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "table.py").write_text("def f():\n    from .model import io\n")  # core -> model, lazily
    (root / "model" / "io.py").write_text("import engram.storage.tiers\n")  # downward: allowed
    (root / "storage" / "tiers.py").write_text("from ..model.io import load_model\n")  # storage -> model
    graph = import_graph(root)
    assert graph["engram.table"] == {"engram.model.io"}
    assert upward_imports(graph) == [
        "engram.storage.tiers (storage) imports engram.model.io (model)",
        "engram.table (core) imports engram.model.io (model)",
    ]
    assert cycles(graph) == [["engram.model.io", "engram.storage.tiers"]]
    assert cycles(package_graph(graph)) == [["model", "storage"]]


@pytest.mark.parametrize(
    "module, layer",
    [
        ("engram", CORE),
        ("engram.table", CORE),
        ("engram.storage.tiers", "storage"),
        ("engram.hf.export", "hf"),
        ("engram.reports", "reports"),
        ("engram.cli", "cli"),
    ],
)
def test_every_module_maps_to_its_layer(module, layer):
    assert layer_of(module) == layer
