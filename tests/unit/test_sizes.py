"""The house stays readable: no function in batchrun over 80 lines, no module over 700."""

from __future__ import annotations

import ast
from pathlib import Path

import batchrun

PACKAGE = Path(batchrun.__file__).parent
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 700


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_700_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_over_80_lines() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
