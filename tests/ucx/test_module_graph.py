"""The modules of the ucx backend form layers: no import cycle, and only the package imports backend.py.

Read from the source with ast (imports under ``TYPE_CHECKING`` and inside
functions included: a cycle that only the type checker follows is still two
modules that need each other), without importing anything.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import tent_async.backends.ucx as ucx_package

PACKAGE = "tent_async.backends.ucx"
ROOT = Path(ucx_package.__file__).parent
# The order of docs/ucx.md's module list: each module may import only those before it.
LAYERS = [
    "_ucxx",
    "protocol",
    "control",
    "address",
    "progress",
    "rails",
    "pairing",
    "channel",
    "site",
    "cma",
    "scatter",
    "peer",
    "server",
    "backend",
]


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of the package that the file at ``path`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
            elif node.level == 0 and node.module and node.module.startswith(PACKAGE + "."):
                base = node.module.removeprefix(PACKAGE + ".")
            else:
                continue  # outside the package (or above it)
            if base:
                found.add(base.split(".")[0])
            else:  # from . import a, b
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name.removeprefix(PACKAGE + ".").split(".")[0])
    return found & modules


def _graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in ROOT.glob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = _graph()
    # Guards the reader itself: a parser that found nothing would pass the tests below.
    assert {"backend", "peer", "server", "site", "scatter"} <= graph.keys()
    assert {"peer", "server", "site"} <= graph["backend"]
    assert {"scatter", "site", "channel"} <= graph["peer"]
    assert "scatter" in graph["server"]
    assert "backend" in graph["__init__"]


def test_no_module_of_the_ucx_backend_imports_backend_py_but_the_package() -> None:
    graph = _graph()
    assert sorted(name for name, deps in graph.items() if "backend" in deps) == ["__init__"]


def test_the_ucx_backend_modules_import_each_other_without_a_cycle() -> None:
    # static_order() raises CycleError naming the modules of a cycle.
    order = list(graphlib.TopologicalSorter(_graph()).static_order())
    assert order[-1] == "__init__"


def test_each_module_imports_only_the_layers_below_it() -> None:
    graph = _graph()
    assert set(graph) == {*LAYERS, "__init__"}, "a new module: add it to LAYERS and to docs/ucx.md's list"
    upward = {m: sorted(graph[m] - set(LAYERS[:i])) for i, m in enumerate(LAYERS) if graph[m] - set(LAYERS[:i])}
    assert upward == {}
