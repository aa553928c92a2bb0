"""Parquet input: a file, a folder or a glob, read in bounded memory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import InputError
from batchrun.sources._base import ID_SCAN_BATCH, DoneMask, _BaseSource, _non_empty
from batchrun.sources._files import _fingerprint, _plural, _relative_name, _resolve_files
from batchrun.spec import InputSpec

# Parquet is read through a buffered stream rather than whole column chunks at once, so that a
# file written as one huge row group (pandas' default) still reads in bounded memory.
PARQUET_BUFFER_SIZE = 4 * 2**20

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
