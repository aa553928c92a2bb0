"""The import graph of batchrun has no circle: no module imports one that imports it back.

Imports under ``if TYPE_CHECKING:`` count too: a circle hidden from the interpreter is still a circle
for the reader and for the next refactoring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import batchrun

PACKAGE_DIR = Path(batchrun.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The batchrun modules that ``path`` imports (a package's ``from pkg import name`` names a submodule if one exists)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from batchrun.emulator import vision` imports the submodule; `from .x import Y` imports x.
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import batchrun.emulator.config` also runs batchrun.emulator; the edge that matters is the leaf.
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a path that ends where it starts, or None."""
    visiting: list[str] = []
    state: dict[str, str] = {}

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        visiting.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*visiting[visiting.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        visiting.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_must_see():
    graph = import_graph()
    assert "batchrun.emulator.control_plane" in graph["batchrun.emulator.server"]
    assert "batchrun.emulator.vision" in graph["batchrun.emulator.data_plane"]  # from batchrun.emulator import vision
    assert "batchrun.errors" in graph["batchrun.cli"]  # an absolute import
    assert "batchrun.cli.parser" in graph["batchrun.cli"]  # a relative import, from a package's __init__
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_emulator_imports_one_that_imports_it_back():
    graph = import_graph()
    emulator = {name: {t for t in targets if t.startswith("batchrun.emulator")}
                for name, targets in graph.items() if name.startswith("batchrun.emulator")}
    assert find_cycle(emulator) is None


def test_no_module_of_batchrun_imports_one_that_imports_it_back():
    assert find_cycle(import_graph()) is None
