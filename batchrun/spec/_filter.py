"""A step's ``filter:``: which of the previous step's rows a step reads.

Either a condition over the row's columns, such as ``score_judge >= 4`` or
``score_judge >= 4 and finish_reason_generate == "stop"`` (comparisons, ``and``, ``or``, ``not``,
``in``, ``is None``, column names and literals; nothing else), or a Python function named
``module:function`` that takes the row as a dict and returns whether it goes on. A condition whose
column is null (a row whose scorer failed) is false: the row does not go on.
"""

from __future__ import annotations

import ast
import importlib
import operator
import re
from collections.abc import Callable
from typing import Any

__all__ = ["RowFilter", "compile_filter", "filter_columns", "is_function_filter"]

RowFilter = Callable[[dict[str, Any]], bool]

_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}


class _Null(Exception):
    """A column the condition compares is null: the condition is false for this row."""


def compile_filter(text: str) -> RowFilter:
    """The filter ``text`` says, or ValueError naming what is wrong with it (the spec reports it)."""
    if _FUNCTION.match(text):
        return _function(text)
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"not a condition ({exc.msg}): expected e.g. `score_judge >= 4`, or module:function") from None
    _check(tree)

    def keep(row: dict[str, Any]) -> bool:
        try:
            return bool(_evaluate(tree, row))
        except _Null:
            return False
        except TypeError:  # a comparison of a text column with a number: the row does not go on
            return False

    return keep


def is_function_filter(text: str) -> bool:
    """Whether ``text`` names a function (``module:function``) rather than a condition."""
    return bool(_FUNCTION.match(text))


def filter_columns(text: str) -> list[str]:
    """The column names a condition reads (none for a function)."""
    if _FUNCTION.match(text):
        return []
    return sorted({node.id for node in ast.walk(ast.parse(text, mode="eval")) if isinstance(node, ast.Name)})


def _function(text: str) -> RowFilter:
    module_name, _, name = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no function {name!r}")
    return lambda row: bool(function(row))


def _check(node: ast.AST) -> None:
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        _check(node.operand)
    elif isinstance(node, ast.Compare):
        if not all(type(op) in _COMPARE for op in node.ops):
            raise ValueError("only ==, !=, <, <=, >, >=, in, not in, is and is not compare")
        for part in (node.left, *node.comparators):
            _check(part)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for element in node.elts:
            _check(element)
    elif isinstance(node, (ast.Name, ast.Constant)):
        pass
    else:
        raise ValueError(f"{ast.unparse(node)!r} is not allowed: only columns, literals, comparisons, and, or, not")


def _evaluate(node: ast.AST, row: dict[str, Any]) -> Any:
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_evaluate(value, row) for value in node.values)
        return any(_evaluate(value, row) for value in node.values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, row)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, row)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, row)
            if (left is None or right is None) and not isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)):
                raise _Null
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_evaluate(element, row) for element in node.elts]
    if isinstance(node, ast.Name):
        if node.id not in row:
            raise KeyError(node.id)
        return row[node.id]
    assert isinstance(node, ast.Constant)
    return node.value
