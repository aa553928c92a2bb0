"""Input rows, streamed: Parquet (a file, a folder or a glob), JSONL, or a ``datasets`` dataset.

Every source reads in batches, so memory stays flat however large the input is, and gives rows in
one deterministic order. ``Row.position`` is the row's 0-based index in that order and is what
resume relies on, so the order depends only on the input itself:

- Parquet, JSONL and OpenAI batch files are read in the sorted order of their paths (plain string order:
  ``part-10`` comes before ``part-2``), each file from its first row to its last.
- A folder written by ``Dataset.save_to_disk`` is read from its memory-mapped Arrow table.
- Anything else under ``input.dataset`` goes through ``datasets.load_dataset_builder(...)
  .as_streaming_dataset(split)``, which is what ``load_dataset(..., streaming=True)`` does, keeping
  the builder so that the resolved data files are known. Rows come as Arrow, so ``Image`` columns
  stay raw ``{"bytes", "path"}`` dicts and nothing is decoded here.

Relative paths are resolved against the current working directory, and error messages say which
directory that was.

Fingerprints (``Source.fingerprint()``) identify the input's *content*, not where it lives, so a
job resumes after the project folder is moved or copied:

- each file is named relative to the input's root (the folder, the glob's fixed prefix, or the
  file itself) and contributes its size and a content digest: for Parquet, a hash of the footer
  (it holds every row group's offsets, sizes and statistics); for other files, a hash of the whole
  file up to 64 MiB, or of its first and last MiB beyond that;
- modification times are left out on purpose: a copy (``cp``, a download, a checkout) changes them
  while the data stays the same, and a fingerprint that changes then would refuse a valid resume;
- ``id_column`` is part of the fingerprint (it decides the ids in the output); ``limit`` is not, so
  a job may be resumed with a higher limit to extend it;
- a streamed dataset adds its config (path, name, split, revision, options). Hub data files are
  resolved with their commit, so an unpinned ``revision`` still fingerprints what was read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import InputError
from batchrun.facts import OPENAI_BATCH_ID
from batchrun.records import Row, storable
from batchrun.spec import DatasetSpec, InputSpec

__all__ = ["Source", "open_source"]

# Nested JSONL values (lists, objects) are typed this many at a time during the open scan: enough
# for pyarrow to infer well, few enough that memory stays flat.
JSONL_NESTED_SAMPLE = 1024
# Files up to this size are hashed whole for the fingerprint; larger ones by their head and tail.
FULL_DIGEST_MAX_BYTES = 64 * 2**20
SAMPLE_DIGEST_BYTES = 2**20
# At most this many duplicated ids are reported: enough to find the problem, short enough to read.
MAX_DUPLICATES_REPORTED = 10
# Inputs up to this many rows are scanned for duplicate ids exactly, in a Counter (tens of MB at most);
# larger ones by 8-byte hashes, confirmed exactly.
EXACT_ID_SCAN_ROWS = 200_000
# Batch size for scans that read only the id column.
ID_SCAN_BATCH = 65_536
# Parquet is read through a buffered stream rather than whole column chunks at once, so that a
# file written as one huge row group (pandas' default) still reads in bounded memory.
PARQUET_BUFFER_SIZE = 4 * 2**20
# A JSON escape of a UTF-16 surrogate: a line holding one may decode to a string UTF-8 cannot store.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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


def open_source(spec: InputSpec) -> Source:
    """Open the input a job spec names, checking what can be checked without reading every row.

    Raises :class:`InputError` for a missing or unreadable input, an ``id_column`` the input does
    not have, or an id column of an unusable type. (Whether ``keep_columns`` and the prompt's
    columns exist is the job's preflight to check, against :attr:`Source.schema`.)
    """
    if spec.kind == "parquet":
        source: _BaseSource = ParquetSource(spec)
    elif spec.kind == "jsonl":
        source = JsonlSource(spec)
    elif spec.kind == "openai_batch":
        source = OpenAIBatchSource(spec)
    elif spec.kind == "dataset":
        assert spec.dataset is not None
        saved = _saved_dataset_folder(spec.dataset)
        source = SavedDatasetSource(spec, saved) if saved else StreamedDatasetSource(spec)
    else:  # pragma: no cover - the spec parser only produces the three kinds above
        raise InputError(f"unknown input kind {spec.kind!r}")
    _check_columns(spec, source)
    return source


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


# --------------------------------------------------------------------------------------------------
# What every source shares: turning column data into rows, and the duplicate-id scan.


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
    if isinstance(chunk, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_integer(chunk.type):
            return chunk.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
        values = np.asarray(chunk.to_numpy(zero_copy_only=False), dtype=object)
    else:
        values = np.asarray(chunk, dtype=object)
    # pandas' vectorised SipHash: deterministic and far faster than hashing in a Python loop.
    import pandas as pd  # heavy: loaded only for the duplicate-id scan

    return pd.util.hash_array(values, categorize=False)


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


def _non_empty(tables: Iterable[pa.Table | pa.RecordBatch]) -> Iterator[pa.Table | pa.RecordBatch]:
    for table in tables:
        if table.num_rows:
            yield table


def _take(chunk: Any, indices: np.ndarray) -> Any:
    """The rows of ``chunk`` (Arrow, or a list) at ``indices``."""
    if isinstance(chunk, (pa.Table, pa.RecordBatch)):
        return chunk.take(pa.array(indices, type=pa.int64()))
    return [chunk[int(i)] for i in indices]


# --------------------------------------------------------------------------------------------------
# Files: resolution and digests shared by Parquet and JSONL.


def _resolve_files(pattern: str, key: str, suffixes: tuple[str, ...]) -> tuple[list[Path], Path]:
    """The files ``pattern`` names, in sorted order, and the root their names are relative to."""
    cwd = os.getcwd()
    if glob.has_magic(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputError(f"{key}: {pattern!r} matches no files (relative to {cwd})")
        return [Path(p) for p in matches], _glob_root(pattern)
    path = Path(pattern)
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and not _is_hidden(p, path)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise InputError(f"{key}: folder {pattern!r} holds no {'/'.join(suffixes)} files (relative to {cwd})")
        return files, path
    if path.is_file():
        return [path], path.parent
    raise InputError(f"{key}: no such file or folder: {pattern!r} (relative to {cwd})")


def _is_hidden(path: Path, root: Path) -> bool:
    # Spark and Hadoop leave _SUCCESS, _metadata and .crc files next to their data.
    return any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _file_digest(path: Path) -> str:
    """A hash of the file's content: all of it when small, its first and last MiB when large."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_MAX_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(f.read(SAMPLE_DIGEST_BYTES))
            f.seek(size - SAMPLE_DIGEST_BYTES)
            digest.update(f.read(SAMPLE_DIGEST_BYTES))
    return digest.hexdigest()


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------------------------------
# Parquet


class ParquetSource(_BaseSource):
    """Rows from Parquet files, read with ``ParquetFile.iter_batches`` one file at a time.

    Every file must have the same columns and types as the first one, checked from the footers at
    open time so that a mismatch fails before the job starts. Types that differ only in their offsets'
    width (``string`` and ``large_string``, ``binary`` and ``large_binary``, nested too) are one type:
    the large one, to which the other files' batches are cast as they are read.
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None
        self.files, root = _resolve_files(spec.path, "input.parquet", (".parquet", ".parq", ".pq"))
        self._rows: list[int] = []
        self._identity: list[dict[str, Any]] = []
        schema = None
        schemas: list[pa.Schema] = []
        for path in self.files:
            try:
                meta = pq.read_metadata(path)
                file_schema = meta.schema.to_arrow_schema()
                footer = _parquet_footer_digest(path)
            except (OSError, pa.ArrowException, ValueError) as exc:
                raise InputError(f"input.parquet: cannot read {str(path)!r} as Parquet: {exc}") from None
            schemas.append(file_schema)
            if schema is None:
                schema, first = file_schema, path
            elif (unified := _unified_schema(schema, file_schema)) is not None:
                schema = unified
            else:
                raise InputError(
                    f"input.parquet: {str(path)!r} has different columns or types than {str(first)!r}: "
                    f"{_schema_line(file_schema)} vs {_schema_line(schema)}"
                )
            self._rows.append(meta.num_rows)
            self._identity.append(
                {"name": _relative_name(path, root), "size": path.stat().st_size, "footer": footer}
            )
        self.schema = schema
        # Files whose batches are cast to the unified schema (a string column where another has large_string).
        self._cast = {path for path, s in zip(self.files, schemas, strict=True) if not s.equals(schema)}
        total = sum(self._rows)
        self.description = f"parquet: {spec.path} ({_plural(len(self.files), 'file')}, {_plural(total, 'row')})"

    def _total_rows(self) -> int:
        return sum(self._rows)

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "parquet", "id_column": self.id_column, "files": self._identity})

    def _open(self, path: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path, buffer_size=PARQUET_BUFFER_SIZE, pre_buffer=False)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"input.parquet: cannot read {str(path)!r} as Parquet: {exc}") from None

    def _record_batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        read = 0
        for path in self.files:
            if self.limit is not None and read >= self.limit:
                return
            parquet = self._open(path)
            try:
                for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
                    read += batch.num_rows
                    yield self._unified(path, batch)
                    if self.limit is not None and read >= self.limit:
                        return
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"input.parquet: cannot read {str(path)!r}: {exc}") from None
            finally:
                parquet.close()

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[pa.RecordBatch | int]:
        if done is None:
            return _non_empty(self._record_batches(batch_size))
        return self._undone_record_batches(batch_size, done)

    def _undone_record_batches(self, batch_size: int, done: DoneMask) -> Iterator[pa.RecordBatch | int]:
        """Row groups whose every row is done are skipped unread (their row count is given instead):
        a resume after 90% of a million rows then decodes only the row groups that are left."""
        start = 0
        for path, rows in zip(self.files, self._rows, strict=True):
            if self.limit is not None and start >= self.limit:
                return
            if rows and not done.pending_mask(start, rows).any():
                yield rows
                start += rows
                continue
            parquet = self._open(path)
            try:
                for group in range(parquet.metadata.num_row_groups):
                    group_rows = parquet.metadata.row_group(group).num_rows
                    if group_rows and not done.pending_mask(start, group_rows).any():
                        yield group_rows
                    else:
                        batches = parquet.iter_batches(batch_size=batch_size, row_groups=[group])
                        yield from _non_empty(self._unified(path, batch) for batch in batches)
                    start += group_rows
                    if self.limit is not None and start >= self.limit:
                        return
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"input.parquet: cannot read {str(path)!r}: {exc}") from None
            finally:
                parquet.close()

    def _unified(self, path: Path, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` of ``path`` in the unified schema's types (the same batch when its file has them)."""
        if path not in self._cast:
            return batch
        return batch.cast(pa.schema([self.schema.field(name) for name in batch.schema.names]))

    def _id_chunks(self) -> Iterator[pa.Array]:
        assert self.id_column is not None
        for batch in self._record_batches(ID_SCAN_BATCH, columns=[self.id_column]):
            yield batch.column(0)


def _parquet_footer_digest(path: Path) -> str:
    """The hash of a Parquet file's footer: its row groups' offsets, sizes and statistics."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            raise ValueError("the file is too small to be Parquet")
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] != b"PAR1":
            raise ValueError("no Parquet footer (the file is truncated or was never closed)")
        length = int.from_bytes(tail[:4], "little")
        if length + 12 > size:
            raise ValueError("the Parquet footer length is larger than the file")
        f.seek(size - 8 - length)
        return hashlib.sha256(f.read(length)).hexdigest()


def _large(type_: pa.DataType) -> pa.DataType:
    """``type_`` with every string and binary (nested ones too) in its large form."""
    if pa.types.is_string(type_):
        return pa.large_string()
    if pa.types.is_binary(type_):
        return pa.large_binary()
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        field = type_.value_field.with_type(_large(type_.value_type))
        return pa.list_(field) if pa.types.is_list(type_) else pa.large_list(field)
    if pa.types.is_struct(type_):
        return pa.struct([type_.field(i).with_type(_large(type_.field(i).type)) for i in range(type_.num_fields)])
    return type_


def _unified_schema(a: pa.Schema, b: pa.Schema) -> pa.Schema | None:
    """One schema for two files that differ at most in string/large_string, binary/large_binary; else None."""
    if a.names != b.names:
        return None
    fields = []
    for fa, fb in zip(a, b, strict=True):
        if fa.nullable != fb.nullable:
            return None
        if fa.type.equals(fb.type):
            fields.append(fa)
        elif _large(fa.type).equals(_large(fb.type)):
            fields.append(fa.with_type(_large(fa.type)))
        else:
            return None
    return pa.schema(fields, metadata=a.metadata)


def _schema_line(schema: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


# --------------------------------------------------------------------------------------------------
# JSONL


class JsonlSource(_BaseSource):
    """Rows from JSON Lines files, one object a line, read line by line.

    JSON has no schema, and a streamed run must never meet a row that the output cannot hold after
    it has paid for the answer. So the whole input is scanned once when it is opened (it is read
    anyway for the count and the fingerprint), keeping only a small summary per column, and every
    column gets a type that all its values fit (see :class:`_JsonlTypes`):

    - only integers: int64; integers and decimals: float64; only strings, or only booleans: their type;
    - only lists, or only objects: the Arrow type they all unify to;
    - anything else (integers and strings, an integer beyond int64, lists of mixed types...): string,
      with each value that is not a string written as its JSON text (id ``7`` becomes ``"7"``).

    Rows are handed out already converted to those types, so ``Row.id`` and ``Row.columns`` match
    :attr:`schema`. Columns are the keys of all rows, in order of first appearance; a key missing
    from a row is ``None``. Blank lines are skipped and take no position. A line that is not a JSON
    object raises :class:`InputError` naming the file and line, when the input is opened.
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None
        self.files, root = _resolve_files(spec.path, "input.jsonl", (".jsonl", ".ndjson", ".json"))
        self._identity = [
            {"name": _relative_name(p, root), "size": p.stat().st_size, "digest": _file_digest(p)} for p in self.files
        ]
        types = _JsonlTypes()
        for value in self._objects(self.unencodable):
            types.add(value)
        self.schema, self._converters = types.settle()
        self._names = self.schema.names
        self._count = types.rows
        self.description = f"jsonl: {spec.path} ({_plural(len(self.files), 'file')}, {_plural(self._count, 'row')})"

    def _objects(self, unencodable: list[str] | None = None) -> Iterator[dict[str, Any]]:
        for _where, value in _json_objects(
            self.files, "input.jsonl", "a JSON object", name_files=True, unencodable=unencodable, id_key=self.id_column
        ):
            yield value

    def _settled(self, value: dict[str, Any]) -> dict[str, Any]:
        columns = {name: value.get(name) for name in self._names}
        for name, convert in self._converters.items():
            if columns[name] is not None:
                columns[name] = convert(columns[name])
        return columns

    def _total_rows(self) -> int:
        return self._count

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "jsonl", "id_column": self.id_column, "files": self._identity})

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[list[dict[str, Any]]]:
        return _in_batches((self._settled(value) for value in self._objects()), batch_size)

    def _id_chunks(self) -> Iterator[list[Any]]:
        assert self.id_column is not None
        convert = self._converters.get(self.id_column)
        chunk: list[Any] = []
        for value in self._objects():
            item = value.get(self.id_column)
            chunk.append(convert(item) if convert is not None and item is not None else item)
            if len(chunk) >= ID_SCAN_BATCH:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _json_text(value: Any) -> str:
    """A JSON value as text for a string column: strings unchanged, anything else as its JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


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


# --------------------------------------------------------------------------------------------------
# datasets


def _saved_dataset_folder(spec: DatasetSpec) -> Path | None:
    """The folder of a dataset written by ``save_to_disk`` that ``spec`` names, if it names one."""
    path = Path(spec.path)
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        split_folder = path / spec.split
        if not split_folder.is_dir():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise InputError(
                f"input.dataset.split: {spec.path!r} has no split {spec.split!r}; available splits: {', '.join(splits)}"
            )
        path = split_folder
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        unused = [k for k in ("name", "data_files", "data_dir", "revision") if getattr(spec, k) is not None]
        if unused or spec.options:
            raise InputError(
                f"input.dataset: {spec.path!r} was written by save_to_disk; "
                f"{', '.join(unused + (['options'] if spec.options else []))} do not apply to it"
            )
        return path
    return None


class SavedDatasetSource(_BaseSource):
    """Rows from a folder written by ``Dataset.save_to_disk``, read from its memory-mapped table."""

    def __init__(self, spec: InputSpec, folder: Path) -> None:
        super().__init__(spec)
        import datasets  # heavy; only imported when a dataset input is used

        try:
            dataset = datasets.load_from_disk(str(folder))
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise InputError(f"input.dataset: cannot load {str(folder)!r} (written by save_to_disk): {exc}") from None
        self.folder = folder
        self._table: pa.Table = dataset.data.table
        self.schema = dataset.features.arrow_schema
        self._num_rows = dataset.num_rows
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".arrow")
        self._identity = [{"name": p.name, "size": p.stat().st_size, "digest": _file_digest(p)} for p in files]
        assert spec.dataset is not None
        self.description = (
            f"dataset: {spec.dataset.path} (saved with save_to_disk, split {spec.dataset.split}, "
            f"{_plural(self._num_rows, 'row')})"
        )

    def _total_rows(self) -> int:
        return self._num_rows

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "saved-dataset", "id_column": self.id_column, "files": self._identity})

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[pa.Table]:
        # Slices of a memory-mapped table cost nothing until converted, and only one is converted
        # at a time.
        return _non_empty(self._slices(self._table, batch_size))

    def _slices(self, table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
        stop = table.num_rows if self.limit is None else min(table.num_rows, self.limit)
        for start in range(0, stop, batch_size):
            yield table.slice(start, min(batch_size, stop - start))

    def _id_chunks(self) -> Iterator[pa.Array]:
        column = self._table.select([self.id_column])
        for piece in self._slices(column, ID_SCAN_BATCH):
            yield piece.column(0).combine_chunks()


class StreamedDatasetSource(_BaseSource):
    """Rows from ``datasets``' streaming mode: Hub datasets, data files, local folders of files."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        import datasets  # heavy; only imported when a dataset input is used

        config = spec.dataset
        assert config is not None
        self.config = config
        try:
            self._builder = datasets.load_dataset_builder(
                config.path,
                name=config.name,
                data_dir=config.data_dir,
                data_files=config.data_files,
                revision=config.revision,
                **dict(config.options),
            )
            self._dataset = self._builder.as_streaming_dataset(split=config.split)
        except Exception as exc:  # datasets raises many types here (FileNotFoundError, ValueError, hub errors)
            raise InputError(
                f"input.dataset: cannot open {config.path!r} (split {config.split!r}, relative to {os.getcwd()}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        features = self._dataset.features
        if features is not None:
            self.schema = features.arrow_schema
        else:
            # Builders like CSV and JSON only know their columns once they read; peek at one batch.
            first = next(self._arrow_tables(self._dataset, 64), None)
            self.schema = first.schema if first is not None else pa.schema([])
        self.description = f"dataset: {config.path} (split {config.split}, streamed)"

    def _arrow_tables(self, dataset: Any, batch_size: int) -> Iterator[pa.Table]:
        try:
            # The Arrow format skips feature decoding: Image columns stay {"bytes", "path"}.
            yield from dataset.with_format("arrow").iter(batch_size=batch_size)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"input.dataset: reading {self.config.path!r} failed: {type(exc).__name__}: {exc}"
            ) from None

    def _total_rows(self) -> int | None:
        splits = self._builder.info.splits
        if splits and self.config.split in splits and splits[self.config.split].num_examples:
            return splits[self.config.split].num_examples
        return None

    def fingerprint(self) -> str:
        config = self.config
        files: list[Any] = []
        data_files = self._builder.config.data_files
        if data_files and config.split in data_files:
            resolved = [str(f) for f in data_files[config.split]]
            local = [Path(f) for f in resolved if os.path.isfile(f)]
            root = Path(os.path.commonpath([str(p.resolve().parent) for p in local])) if local else Path(".")
            for name in resolved:
                path = Path(name)
                if path.is_file():
                    files.append(
                        {"name": _relative_name(path, root), "size": path.stat().st_size, "digest": _file_digest(path)}
                    )
                else:
                    files.append({"name": name})  # Hub files carry their commit in the resolved URL
        payload = {
            "kind": "dataset",
            "id_column": self.id_column,
            "path": config.path if not files else None,
            "name": config.name,
            "split": config.split,
            "revision": config.revision,
            "options": dict(config.options),
            "module_hash": getattr(self._builder, "hash", None) if not files else None,
            "files": files,
        }
        return _fingerprint(payload)

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[pa.Table]:
        return _non_empty(self._arrow_tables(self._dataset, batch_size))

    def _id_chunks(self) -> Iterator[pa.Array]:
        ids = self._dataset.select_columns([self.id_column])
        for table in self._arrow_tables(ids, ID_SCAN_BATCH):
            yield table.column(0).combine_chunks()


# --------------------------------------------------------------------------------------------------
# OpenAI batch files


#: The columns of an OpenAI batch file's rows. ``body`` is the request body's JSON text, so that the
#: bodies of any route (chat messages, completion prompts, tools ...) share one column type.
OPENAI_BATCH_SCHEMA = pa.schema(
    [
        pa.field(OPENAI_BATCH_ID, pa.string()),
        pa.field("method", pa.string()),
        pa.field("url", pa.string()),
        pa.field("body", pa.string()),
    ]
)


class OpenAIBatchSource(_BaseSource):
    """Rows from an OpenAI Batch input file: one request a line (``custom_id``, ``method``, ``url``, ``body``).

    The whole file is checked when it is opened, before anything is resumed: a line that is not a
    JSON object, a missing or non-string ``custom_id``, or a ``custom_id`` used twice raises
    :class:`InputError` naming the file and line. The ids are collected for that (a dict of the
    ids, about 100 bytes each: OpenAI caps a batch file at 50,000 requests). What a line asks for
    (its ``method``, ``url`` and ``body``) is the task's to judge, row by row: a request batchrun
    cannot serve becomes a failure row, not a refused job. Blank lines are skipped.
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None
        self.files, root = _resolve_files(spec.path, "input.openai_batch", (".jsonl", ".ndjson"))
        self._identity = [
            {"name": _relative_name(p, root), "size": p.stat().st_size, "digest": _file_digest(p)} for p in self.files
        ]
        self.schema = OPENAI_BATCH_SCHEMA
        seen: dict[str, str] = {}  # custom_id -> where it was first found
        for where, line in self._lines(self.unencodable):
            custom_id = line.get("custom_id")
            if custom_id is None or custom_id == "":
                raise InputError(f"input.openai_batch: {where}: the request has no custom_id")
            if not isinstance(custom_id, str):
                raise InputError(
                    f"input.openai_batch: {where}: custom_id must be a string, got {json.dumps(custom_id)}"
                )
            if custom_id in seen:
                raise InputError(
                    f"input.openai_batch: {where}: custom_id {custom_id!r} is used twice (first on {seen[custom_id]}); "
                    "every request needs its own custom_id, which names its result"
                )
            seen[custom_id] = where
        self._count = len(seen)
        self.description = (
            f"openai batch: {spec.path} ({_plural(len(self.files), 'file')}, {_plural(self._count, 'request')})"
        )

    def _lines(self, unencodable: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each request line as a JSON object, with where it is (``requests.jsonl, line 3``)."""
        expected = "a JSON object (custom_id, method, url, body)"
        yield from _json_objects(
            self.files, "input.openai_batch", expected, name_files=len(self.files) > 1, unencodable=unencodable,
            id_key=OPENAI_BATCH_ID,
        )

    @staticmethod
    def _columns(line: dict[str, Any]) -> dict[str, Any]:
        body = line.get("body")
        return {
            OPENAI_BATCH_ID: line["custom_id"],
            "method": None if line.get("method") is None else _json_text(line["method"]),
            "url": None if line.get("url") is None else _json_text(line["url"]),
            "body": None if body is None else json.dumps(body, ensure_ascii=False),
        }

    def _total_rows(self) -> int:
        return self._count

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "openai_batch", "files": self._identity})

    def find_duplicate_ids(self) -> list:
        """Always ``[]``: the file was refused at open time if a custom_id repeats (with its line)."""
        return []

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[list[dict[str, Any]]]:
        return _in_batches((self._columns(line) for _where, line in self._lines()), batch_size)

    def _id_chunks(self) -> Iterator[list[Any]]:
        chunk = [line["custom_id"] for _where, line in self._lines()]
        if chunk:
            yield chunk


def _json_objects(
    files: Sequence[Path], key: str, expected: str, *, name_files: bool, unencodable: list[str] | None = None,
    id_key: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every non-blank line of ``files`` as a JSON object, with where it is (``FILE, line N``).

    A file that cannot be opened, a line that is not JSON, or one that is not an object raises
    InputError naming ``key`` (the spec key) and the line. ``name_files``: say each file's path; else
    only its name (one file).

    JSON may escape a lone UTF-16 surrogate (``"\\ud83d"``, half an emoji), which UTF-8, and so the
    output, cannot hold: such a string is read with U+FFFD in its place, and the line's place (with
    its ``id_key`` value, when it has one) is appended to ``unencodable`` when given.
    """
    for path in files:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the `with` below; opening gets its own message
        except OSError as exc:
            raise InputError(f"{key}: cannot read {str(path)!r}: {exc}") from None
        with f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path if name_files else path.name}, line {number}"
                try:
                    value = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InputError(f"{key}: {where}: not valid JSON: {exc}") from None
                if not isinstance(value, dict):
                    raise InputError(f"{key}: {where}: expected {expected}, got {type(value).__name__}")
                if _SURROGATE_ESCAPE.search(raw):
                    stored = storable(value)
                    if stored is not value and unencodable is not None:
                        row_id = stored.get(id_key) if id_key is not None else None
                        unencodable.append(where if row_id is None else f"id {row_id!r} ({where})")
                    value = stored
                yield where, value


def _in_batches(values: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """``values`` in lists of at most ``size`` (``itertools.batched`` arrives in Python 3.12)."""
    batch: list[dict[str, Any]] = []
    for value in values:
        batch.append(value)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
