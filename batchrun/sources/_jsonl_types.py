"""JSONL type inference: what each column held over the whole input, in memory that does not grow with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from batchrun.sources._json_lines import _json_text

# Nested JSONL values (lists, objects) are typed this many at a time during the open scan: enough
# for pyarrow to infer well, few enough that memory stays flat.
JSONL_NESTED_SAMPLE = 1024

class _JsonlTypes:
    """What each JSONL column held over the whole input, in memory that does not grow with it.

    Per column: the kinds of scalar seen (``bool``, ``int``, ``bigint`` beyond int64, ``float``,
    ``str``, ``nested``) and, for lists and objects, the Arrow type they unify to so far (typed
    :data:`JSONL_NESTED_SAMPLE` values at a time). Nulls say nothing about a type.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.kinds: dict[str, set[str]] = {}  # insertion order is the column order
        self.nested: dict[str, pa.DataType] = {}
        self.pending: dict[str, list[Any]] = {}
        self.untyped: set[str] = set()  # nested values with no common Arrow type: JSON text

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        for key, value in row.items():
            kinds = self.kinds.setdefault(key, set())
            if value is None:
                continue
            kind = type(value)
            if kind is bool:
                kinds.add("bool")
            elif kind is int:
                kinds.add("int" if -(2**63) <= value < 2**63 else "bigint")
            elif kind is float:
                kinds.add("float")
            elif kind is str:
                kinds.add("str")
            else:
                kinds.add("nested")
                if key not in self.untyped:
                    pending = self.pending.setdefault(key, [])
                    pending.append(value)
                    if len(pending) >= JSONL_NESTED_SAMPLE:
                        self._type_pending(key)

    def _type_pending(self, key: str) -> None:
        values = self.pending.pop(key, [])
        if not values or key in self.untyped:
            return
        try:
            found = pa.array(values).type
            known = self.nested.get(key)
            if known is not None and not known.equals(found):
                merged = pa.unify_schemas(
                    [pa.schema([("v", known)]), pa.schema([("v", found)])], promote_options="permissive"
                )
                found = merged.field("v").type
            self.nested[key] = found
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            self.untyped.add(key)
            self.nested.pop(key, None)

    def settle(self) -> tuple[pa.Schema, dict[str, Callable[[Any], Any]]]:
        """The schema every row fits, and the conversions (by column) that make each value fit it."""
        for key in list(self.pending):
            self._type_pending(key)
        fields = []
        converters: dict[str, Callable[[Any], Any]] = {}
        for key, kinds in self.kinds.items():
            if not kinds:
                kind: pa.DataType = pa.null()
            elif kinds == {"bool"}:
                kind = pa.bool_()
            elif kinds == {"int"}:
                kind = pa.int64()
            elif kinds <= {"int", "float"}:
                kind = pa.float64()
                converters[key] = float
            elif kinds == {"str"}:
                kind = pa.string()
            elif kinds == {"nested"} and key in self.nested:
                kind = self.nested[key]
            else:
                kind = pa.string()
                converters[key] = _json_text
            fields.append(pa.field(key, kind))
        return pa.schema(fields), converters
