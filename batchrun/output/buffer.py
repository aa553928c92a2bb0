"""Rows waiting for their shard, kept column-wise because Arrow builds columns ~20x faster than rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from batchrun.errors import redact
from batchrun.output.schema import BOOKKEEPING_COLUMNS, FAILED_COLUMNS
from batchrun.records import storable

__all__ = ["CONVERSION_ERRORS", "ShardBuffer", "fits", "prepare_conversions", "storable"]

#: What building an Arrow array from Python values raises for a value that does not fit its type
#: (UnicodeEncodeError: a string UTF-8 cannot hold, should one get past :func:`storable`).
CONVERSION_ERRORS = (
    pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError, UnicodeEncodeError,
)


def prepare_conversions() -> None:
    """Make pyarrow's first conversion of a Python list now, while the job starts.

    Before its first ``pa.array`` of a list, pyarrow imports pandas (when installed) to ask whether the
    list is pandas-like: ~0.4 s of imports, once per process. Left to the first shard, that import ran
    in the committing thread while requests were in flight, holding the interpreter's lock for most of
    it and so holding back their answers (benchmarks/RESULTS.md, the client ceiling).
    """
    pa.array([], type=pa.int64())


def estimate_bytes(value: Any) -> int:
    """A cheap guess at a value's size in a buffer: exact for text and bytes, flat for the rest."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, dict):
        return sum(estimate_bytes(v) for v in value.values())
    return 8


def fits(value: Any, type_: pa.DataType) -> bool:
    """Whether ``value`` converts to ``type_``."""
    try:
        pa.array([value], type=type_)
    except CONVERSION_ERRORS:
        return False
    return True


class ShardBuffer:
    """The rows of the next ``data`` or ``failed`` shard.

    ``value_columns`` are the columns a record's dicts fill in, in schema order: for data, the kept
    input and output columns (between the id and ``latency_s``); for failed, the kept input columns
    (between the id and ``error_type``).
    """

    def __init__(self, kind: str, schema: pa.Schema) -> None:
        if kind not in ("data", "failed"):
            raise ValueError(f"a shard is 'data' or 'failed', not {kind!r}")
        self.kind = kind
        self.schema = schema
        self.id_column = schema.names[0]
        tail = len(BOOKKEEPING_COLUMNS) if kind == "data" else len(FAILED_COLUMNS)
        self.value_columns: list[str] = schema.names[1:-tail]
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.positions: list[int] = []
        self.retryable = 0
        self.estimated_bytes = 0
        self.replaced = 0  # values whose lone surrogates became U+FFFD (see storable)

    def __len__(self) -> int:
        return len(self.positions)

    def append_result(
        self, position: int, id_: Any, values: Mapping[str, Any], latency_s: float, attempts: int
    ) -> None:
        """Add a successful row; ``values`` holds its kept input and output columns (missing ones are null)."""
        cols = self.columns
        size = 16 + estimate_bytes(id_)
        for name in self.value_columns:
            value = values.get(name)
            cols[name].append(value)
            # Text is most values: its size asked here, without a call for each.
            size += len(value) if type(value) is str else estimate_bytes(value)
        cols["latency_s"].append(latency_s)
        cols["attempts"].append(attempts)
        self._append_row(position, id_, size)

    def append_failure(
        self,
        position: int,
        id_: Any,
        *,
        error_type: str,
        error: str,
        status: int | None,
        attempts: int | None,
        retryable: bool,
        kept: Mapping[str, Any],
    ) -> None:
        """Add a failed row; ``kept`` holds its kept input columns (missing ones are null)."""
        cols = self.columns
        size = 32 + len(error) + len(error_type) + estimate_bytes(id_)
        for name in self.value_columns:
            value = kept.get(name)
            cols[name].append(value)
            size += estimate_bytes(value)
        cols["error_type"].append(error_type)
        cols["error"].append(error)
        cols["status"].append(status)
        cols["attempts"].append(attempts)
        cols["retryable"].append(retryable)
        self.retryable += bool(retryable)
        self._append_row(position, id_, size)

    def _append_row(self, position: int, id_: Any, size: int) -> None:
        self.columns[self.id_column].append(id_)
        self.positions.append(position)
        self.estimated_bytes += size

    def to_table(self) -> pa.Table:
        return pa.Table.from_arrays([self._array(field) for field in self.schema], schema=self.schema)

    def _array(self, field: pa.Field) -> pa.Array:
        """One column as Arrow. Values are buffered as they came; a lone surrogate (which UTF-8 cannot
        encode) is replaced here, in the rare column that holds one, rather than looked for in every value."""
        values = self.columns[field.name]
        try:
            return pa.array(values, type=field.type)
        except UnicodeEncodeError:
            self._replace_surrogates(values)
        return pa.array(values, type=field.type)

    def _replace_surrogates(self, values: list[Any]) -> None:
        """Make every value of a column :func:`storable`, in place, counting the values that changed."""
        stored = [storable(value) for value in values]
        self.replaced += sum(1 for new, old in zip(stored, values, strict=True) if new is not old)
        values[:] = stored  # kept replaced: a later try (after unconvertible rows are diverted) sees the same

    def unconvertible_rows(self) -> dict[int, tuple[str, str]]:
        """The rows that cannot be converted: index -> (first bad column, what is wrong with it).

        Only for the slow path after :meth:`to_table` failed: each column is tried whole, and only a
        column that fails is tried value by value.
        """
        bad: dict[int, tuple[str, str]] = {}
        for field in self.schema:
            values = self.columns[field.name]
            try:
                pa.array(values, type=field.type)
                continue
            except CONVERSION_ERRORS:
                pass
            self._replace_surrogates(values)  # a lone surrogate is stored as U+FFFD, never a reason to fail
            for index, value in enumerate(values):
                if index in bad:
                    continue
                try:
                    pa.array([value], type=field.type)
                except CONVERSION_ERRORS as exc:
                    problem = f"column {field.name!r}: expected {field.type}, got {type(value).__name__}"
                    detail = str(exc).strip()
                    if detail:
                        problem += f" ({detail[:200]})"
                    bad[index] = (field.name, redact(problem))
        return bad

    def value(self, column: str, index: int, type_: pa.DataType) -> Any:
        """The value at ``index`` in ``column`` when it converts to ``type_``, else None (no column: None)."""
        values = self.columns.get(column)
        if values is None:
            return None
        value = values[index]
        return value if fits(value, type_) else None

    def remove(self, indices: set[int]) -> None:
        """Drop the rows at ``indices`` (the byte estimate is left as is: it only triggers rotation)."""
        for name, values in self.columns.items():
            self.columns[name] = [v for i, v in enumerate(values) if i not in indices]
        self.positions = [p for i, p in enumerate(self.positions) if i not in indices]
        if self.kind == "failed":
            self.retryable = sum(1 for v in self.columns["retryable"] if v)

    def clear(self) -> None:
        for values in self.columns.values():
            values.clear()
        self.positions.clear()
        self.retryable = 0
        self.estimated_bytes = 0
        self.replaced = 0
