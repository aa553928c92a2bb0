"""Which module may import which: the layers of docs/architecture.md, checked on every import.

Every module of batchrun is parsed with ``ast``; every import counts, at the top, inside a function or
under ``TYPE_CHECKING``. A module may import its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import batchrun

PACKAGE = Path(batchrun.__file__).parent

# The table of docs/architecture.md, lowest layer first. A module belongs to the longest prefix that
# names it. The emulator stands apart (see the tests below).
LAYERS: dict[str, int] = {
    # 0 core: facts and the types everything shares; imports nothing above
    "batchrun.facts": 0, "batchrun.errors": 0, "batchrun.records": 0, "batchrun.holder": 0,
    "batchrun.lazy": 0, "batchrun.task_kinds": 0, "batchrun.__version__": 0,
    # 1 services: one concern each, usable by any stage
    "batchrun.transport": 1, "batchrun.stop": 1, "batchrun.cost": 1, "batchrun.progress": 1,
    "batchrun.breaker": 1, "batchrun.limit": 1, "batchrun.rate": 1, "batchrun.images": 1, "batchrun.structured": 1,
    "batchrun.scoring": 1, "batchrun.notify": 1, "batchrun.output": 1, "batchrun.publish.names": 1,
    "batchrun.gc_tuning": 1,
    # 2 the job spec: each section read by its owner (services above)
    "batchrun.spec": 2,
    # 3..6 the stages of the flow, each above the one it takes from
    "batchrun.sources": 3, "batchrun.samples": 3, "batchrun.reader": 3,
    "batchrun.tasks": 4, "batchrun.packing": 4,
    "batchrun.endpoints": 5,
    "batchrun.dispatch": 6, "batchrun.dispatch_stats": 6, "batchrun.retry": 6, "batchrun.routing": 6,
    "batchrun.batches": 6,
    # 7 the steps of a run, and the commands' work on outputs and runs
    "batchrun.preflight": 7, "batchrun.committer": 7, "batchrun.tally": 7, "batchrun.summary": 7,
    "batchrun.provenance": 7, "batchrun.run_record": 7, "batchrun.shards": 7, "batchrun.compare": 7,
    "batchrun.compare_html": 7, "batchrun.runs": 7, "batchrun.export": 7, "batchrun.preview": 7,
    "batchrun.publish": 7, "batchrun.endpoints.endpoint_shares": 7,
    # 8 the runner: only orders the steps
    "batchrun.runner": 8, "batchrun.steps": 8,
    # 9 the entry points
    "batchrun.cli": 9, "batchrun.__main__": 9, "batchrun": 9, "batchrun.api": 9,
}
EMULATOR = "batchrun.emulator"
#: Who may start the emulator: the `local:` endpoint and `batchrun emulate`.
EMULATOR_USERS = {"batchrun.endpoints.local", "batchrun.cli.endpoints"}

#: Imports that go up today, each with the reason it is tolerated; the list only shrinks.
KNOWN_UPWARD = {
    ("batchrun.endpoints.url", "batchrun.retry"): "is_paused_answer reads the proxy's paused page",
    ("batchrun.endpoints.pool", "batchrun.dispatch"): "type only: the pool attaches late endpoints to a Dispatcher",
}


def _module_name(path: Path) -> str:
    parts = ["batchrun", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, source: str, *, is_package: bool = False) -> set[str]:
    """Every batchrun module that the module ``name`` (whose text is ``source``) imports, wherever the
    import statement is."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:  # `from batchrun.x import y` imports the module batchrun.x.y when there is one
                child = f"{module}.{alias.name}"
                found.add(child if child in MODULES or child == "batchrun.__version__" else module)
    return {target for target in found if target == "batchrun" or target.startswith("batchrun.")}


def _layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md"
    return LAYERS[max(prefixes, key=len)]


def _is_emulator(module: str) -> bool:
    return module == EMULATOR or module.startswith(EMULATOR + ".")


IMPORTS = {name: _imports(name, path.read_text(), is_package=path.name == "__init__.py")
           for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(name for name in MODULES if not _is_emulator(name)))
def test_a_module_imports_only_its_own_layer_and_those_below(module: str) -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for target in sorted(IMPORTS[module])
        if not _is_emulator(target) and _layer(target) > _layer(module) and (module, target) not in KNOWN_UPWARD
    ]
    assert upward == []


def test_the_emulator_stands_apart_and_imports_only_the_core() -> None:
    wrong = [f"{name} imports {target}" for name in MODULES if _is_emulator(name) for target in IMPORTS[name]
             if not _is_emulator(target) and _layer(target) > 0]
    assert wrong == []


def test_only_the_local_endpoint_and_the_emulate_command_start_the_emulator() -> None:
    users = {name for name in MODULES if not _is_emulator(name) and any(map(_is_emulator, IMPORTS[name]))}
    assert users <= EMULATOR_USERS


def test_the_known_upward_imports_still_exist_so_that_the_list_only_shrinks() -> None:
    assert [pair for pair in KNOWN_UPWARD if pair[1] not in IMPORTS[pair[0]]] == []


def test_imports_inside_functions_relative_ones_and_type_only_ones_all_count() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import __version__\n"
        "if TYPE_CHECKING:\n    from batchrun.spec import JobSpec\n"
        "def late():\n    from .runner import run_job\n    import batchrun.dispatch\n"
    )
    assert _imports("batchrun.facts", source) == {
        "batchrun.__version__", "batchrun.spec", "batchrun.runner", "batchrun.dispatch",
    }
