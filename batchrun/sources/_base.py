"""What every source shares: the :class:`Source` protocol, column data as rows, the duplicate-id scan."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from batchrun.errors import InputError
from batchrun.records import Row
from batchrun.spec import InputSpec

# At most this many duplicated ids are reported: enough to find the problem, short enough to read.
MAX_DUPLICATES_REPORTED = 10
# Inputs up to this many rows are scanned for duplicate ids exactly, in a Counter (tens of MB at most);
# larger ones by 8-byte hashes, confirmed exactly.
EXACT_ID_SCAN_ROWS = 200_000
# Batch size for scans that read only the id column.
ID_SCAN_BATCH = 65_536


class DoneMask(Protocol):
    """The positions that already have their final record (:class:`~batchrun.output.DoneSet`)."""

    def pending_mask(self, start: int, count: int) -> np.ndarray:
        """A bool per position ``start .. start+count-1``: True where the row is not done."""
        ...


@runtime_checkable
class Source(Protocol):
    """Where a job's rows come from. Open one with :func:`open_source`."""

    description: str
    """One line for logs and the progress bar, e.g. ``parquet: data/ (3 files, 1200 rows)``."""
    schema: pa.Schema
    """The input columns as Arrow types; templates and ``keep_columns`` are checked against it."""

    def count(self) -> int | None:
        """The number of rows the job will read (after ``limit``) when that is cheap to know."""
        ...

    def fingerprint(self) -> str:
        """A stable hex digest of the input's identity; resume refuses a changed input."""
        ...

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        """Rows in deterministic order, at most ``batch_size`` at a time, positions 0..N-1."""
        ...

    def pending_batches(self, batch_size: int = 1024, done: DoneMask | None = None) -> Iterator[tuple[int, list[Row]]]:
        """Like :meth:`batches`, leaving out the rows ``done`` marks: ``(rows left out, rows)`` per stretch read."""
        ...

    def find_duplicate_ids(self) -> list:
        """A few id values that occur more than once (``[]`` when ids are unique or positional)."""
        ...


def _check_columns(spec: InputSpec, source: _BaseSource) -> None:
    names = source.schema.names
    available = ", ".join(names) if names else "(none)"
    if spec.id_column is not None:
        if spec.id_column not in names:
            raise InputError(
                f"input.id_column: the input has no column {spec.id_column!r}; "
                f"available columns: {available} ({source.description})"
            )
        id_type = source.schema.field(spec.id_column).type
        if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            raise InputError(
                f"input.id_column: column {spec.id_column!r} has type {id_type}; "
                "ids must be integers or strings"
            )


class _BaseSource:
    description: str
    schema: pa.Schema

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.id_column = spec.id_column
        self.limit = spec.limit
        # Rows (``id 'x' (FILE, line N)``) whose strings held lone surrogates, read with U+FFFD in their place.
        self.unencodable: list[str] = []

    def count(self) -> int | None:
        total = self._total_rows()
        if total is None:
            return None
        return total if self.limit is None else min(total, self.limit)

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        for _, rows in self.pending_batches(batch_size):
            if rows:
                yield rows

    def pending_batches(self, batch_size: int = 1024, done: DoneMask | None = None) -> Iterator[tuple[int, list[Row]]]:
        """The rows ``done`` does not mark, as ``(rows left out, rows)`` for each stretch of the input read.

        Done rows are left out before they become Python objects: on resume after 90% of a million
        rows, turning the done ones into dicts only to drop them took seconds before the first
        request; a mask per stretch takes microseconds. Stretches wholly done give ``(n, [])``.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        position = 0
        for chunk in self._chunks(batch_size, done):
            count = chunk if isinstance(chunk, int) else len(chunk)  # an int: a done stretch, never read
            if self.limit is not None and position + count > self.limit:
                count = self.limit - position
                chunk = count if isinstance(chunk, int) else chunk[:count]
            offsets: Iterable[int] = range(count)
            if done is not None and not isinstance(chunk, int):
                pending = np.flatnonzero(done.pending_mask(position, count))
                if len(pending) == 0:
                    chunk = count
                elif len(pending) < count:
                    offsets = pending.tolist()
                    chunk = _take(chunk, pending)
            rows = [] if isinstance(chunk, int) else [
                Row(position=position + offset, id=self._row_id(position + offset, columns), columns=columns)
                for offset, columns in zip(offsets, self._dicts(chunk), strict=True)
            ]
            yield count - len(rows), rows
            position += count
            if self.limit is not None and position >= self.limit:
                return

    def _dicts(self, chunk: Any) -> list[dict[str, Any]]:
        """A chunk's rows as column dicts (an Arrow chunk is converted here, after done rows are left out)."""
        return chunk.to_pylist() if isinstance(chunk, (pa.Table, pa.RecordBatch)) else list(chunk)

    def _row_id(self, position: int, columns: dict[str, Any]) -> Any:
        if self.id_column is None:
            return position
        value = columns.get(self.id_column)
        if value is None:
            raise InputError(
                f"input.id_column: column {self.id_column!r} is null at row {position} ({self.description})"
            )
        return value

    def find_duplicate_ids(self) -> list:
        """Count the ids of a small input exactly; for a large one, hash every id to a uint64 (8 bytes a
        row), sort, and confirm adjacent equal hashes.

        A hash collision is only a candidate: a second pass collects the real values behind the
        candidate hashes and keeps those that really repeat. Null ids raise :class:`InputError`.
        """
        if self.id_column is None:
            return []
        expected = self.count()
        if expected is not None and expected <= EXACT_ID_SCAN_ROWS:
            # A small input is counted exactly, without pandas' hash (whose import alone is half a
            # second of `batchrun validate`).
            counts: Counter = Counter()
            for chunk in self._limited_id_chunks():
                counts.update(chunk.to_pylist() if isinstance(chunk, (pa.Array, pa.ChunkedArray)) else chunk)
            return [value for value, n in counts.items() if n > 1][:MAX_DUPLICATES_REPORTED]
        if expected is not None:
            hashes = np.empty(expected, dtype=np.uint64)
            filled = 0
            for chunk in self._limited_id_chunks():
                hashed = _hash_ids(chunk)
                if filled + len(hashed) > len(hashes):  # the count was a lower bound; grow
                    hashes = np.concatenate([hashes[:filled], np.empty(len(hashed) + filled, np.uint64)])
                hashes[filled : filled + len(hashed)] = hashed
                filled += len(hashed)
            hashes = hashes[:filled]
        else:
            parts = [_hash_ids(chunk) for chunk in self._limited_id_chunks()]
            hashes = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        if len(hashes) < 2:
            return []
        hashes.sort()
        repeated = hashes[1:][hashes[1:] == hashes[:-1]]
        if len(repeated) == 0:
            return []
        candidates = np.unique(repeated)
        seen: Counter = Counter()
        for chunk in self._limited_id_chunks():
            hashed = _hash_ids(chunk)
            for index in np.nonzero(np.isin(hashed, candidates))[0]:
                seen[_python_value(chunk[int(index)])] += 1
        duplicates = [value for value, n in seen.items() if n > 1]
        return duplicates[:MAX_DUPLICATES_REPORTED]

    def _limited_id_chunks(self) -> Iterator[Any]:
        """Id values in order, as Arrow arrays or lists, cut at ``limit``; nulls raise."""
        position = 0
        for chunk in self._id_chunks():
            if self.limit is not None and position + len(chunk) > self.limit:
                chunk = chunk[: self.limit - position]
            nulls = _first_null(chunk)
            if nulls is not None:
                raise InputError(
                    f"input.id_column: column {self.id_column!r} is null at row {position + nulls} ({self.description})"
                )
            yield chunk
            position += len(chunk)
            if self.limit is not None and position >= self.limit:
                return

    # Implemented by each source.
    def _total_rows(self) -> int | None:
        raise NotImplementedError

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[Any]:
        """The input in order, at most ``batch_size`` rows at a time: Arrow tables or record batches
        (converted by :meth:`_dicts` once done rows are left out), or lists of column dicts. A source
        that can skip a stretch ``done`` marks without reading it gives its row count (an int) instead."""
        raise NotImplementedError

    def _id_chunks(self) -> Iterator[Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


def _hash_ids(chunk: Any) -> np.ndarray:
    """A 64-bit hash of each id, the same for equal ids within one scan (both passes run in one process)."""
    if isinstance(chunk, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_integer(chunk.type):
            return chunk.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        if _string_like(chunk.type):
            # One type in the whole column: Python's own string hash (SipHash, cached on each str) tells
            # equal ids apart from unequal ones as well as pandas does, without pandas' import at start
            # (to_pylist: an Arrow string column's to_numpy goes through pandas).
            values = chunk.to_pylist()
            return np.fromiter(map(hash, values), dtype=np.int64, count=len(values)).view(np.uint64)
        values = np.asarray(chunk.to_numpy(zero_copy_only=False), dtype=object)
    else:
        values = np.asarray(chunk, dtype=object)
    # Values of mixed types (JSONL): pandas' vectorised SipHash of each value's text, far faster than
    # hashing in a Python loop (Python's hash would also make 1, 1.0 and True one id).
    import pandas as pd  # heavy: loaded only for this scan

    return pd.util.hash_array(values, categorize=False)


def _string_like(type_: pa.DataType) -> bool:
    return bool(pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_binary(type_)
                or pa.types.is_large_binary(type_))


def _first_null(chunk: Any) -> int | None:
    if isinstance(chunk, (pa.Array, pa.ChunkedArray)):
        if chunk.null_count == 0:
            return None
        return int(np.argmax(chunk.is_null().to_numpy(zero_copy_only=False)))
    for index, value in enumerate(chunk):
        if value is None:
            return index
    return None


def _python_value(value: Any) -> Any:
    return value.as_py() if isinstance(value, pa.Scalar) else value


class _TableSource(_BaseSource):
    """Rows of one Arrow table held whole (a memory-mapped saved dataset, or rows given in Python): its
    slices cost nothing until converted, and only one is converted at a time."""

    _table: pa.Table

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[pa.Table]:
        return _non_empty(self._slices(self._table, batch_size))

    def _slices(self, table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
        stop = table.num_rows if self.limit is None else min(table.num_rows, self.limit)
        for start in range(0, stop, batch_size):
            yield table.slice(start, min(batch_size, stop - start))

    def _id_chunks(self) -> Iterator[pa.Array]:
        column = self._table.select([self.id_column])
        for piece in self._slices(column, ID_SCAN_BATCH):
            yield piece.column(0).combine_chunks()


def _non_empty(tables: Iterable[pa.Table | pa.RecordBatch]) -> Iterator[pa.Table | pa.RecordBatch]:
    for table in tables:
        if table.num_rows:
            yield table


def _take(chunk: Any, indices: np.ndarray) -> Any:
    """The rows of ``chunk`` (Arrow, or a list) at ``indices``."""
    if isinstance(chunk, (pa.Table, pa.RecordBatch)):
        return chunk.take(pa.array(indices, type=pa.int64()))
    return [chunk[int(i)] for i in indices]
