"""Reading a spec file's YAML: PyYAML's safe loader, refusing duplicate keys and alias bombs."""

from __future__ import annotations

from typing import Any

import yaml

from batchrun.errors import SpecError


class _DuplicateKey(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


class _AliasBomb(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


#: How many nodes YAML aliases may add to a spec once expanded (a "billion laughs" file adds billions).
MAX_ALIAS_EXPANSION = 10_000


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping and aliases that expand too far.

    PyYAML keeps the last of two equal keys without a word, so a job would silently run with half of
    what its file says. The check walks the composed node tree first, where key paths and line
    numbers are still known. Keys brought in by a ``<<`` merge may be overridden, as YAML intends.

    An alias shares its node in the composed tree, but everything that walks the loaded spec sees it
    expanded: a few lines of nested aliases make billions of values. Before anything is constructed,
    the tree's expanded size is counted (each node once per path reaching it, memoised per node, so the
    count itself is cheap), and a file whose aliases add more than :data:`MAX_ALIAS_EXPANSION` nodes,
    or an alias inside its own anchor, is refused.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_alias_bombs(node)
        _refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


def _refuse_alias_bombs(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            line = node.start_mark.line + 1
            raise _AliasBomb(f"line {line}", "an alias refers to the node that contains it (a recursive structure); "
                                             "a job spec cannot use one")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        open_nodes.discard(key)
        sizes[key] = total
        if total - len(sizes) > MAX_ALIAS_EXPANSION:  # more nodes expanded than the file holds, by far
            raise _AliasBomb(
                "(yaml)",
                f"its aliases (*name) expand to more than {MAX_ALIAS_EXPANSION:,} extra values; a spec "
                "needs few: refused, as a file that grows without limit when read (a 'billion laughs')",
            )
        return total

    size(root)


def _refuse_duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias to a node already checked (or to one of its parents)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[tuple[str, Any], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key_path = path
            if isinstance(key_node, yaml.ScalarNode):
                key_path = f"{path}.{key_node.value}" if path else str(key_node.value)
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in first_lines:
                    raise _DuplicateKey(
                        key_path,
                        f"is given twice (lines {first_lines[key]} and {line}); YAML would keep only the last, "
                        "silently dropping the other: keep one",
                    )
                first_lines[key] = line
            _refuse_duplicate_keys(value_node, key_path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{index}]", seen)


def _yaml_error(file: str, exc: yaml.YAMLError) -> SpecError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{context}, {problem}" if context else problem
    if mark is not None:
        return SpecError(file, f"line {mark.line + 1}, column {mark.column + 1}", f"invalid YAML: {detail}")
    return SpecError(file, "(yaml)", f"invalid YAML: {detail}")

