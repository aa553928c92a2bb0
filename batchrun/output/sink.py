"""The sink: every row's final record into Parquet shards, published in the order the package docstring draws."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.errors import OutputError, redact
from batchrun.output.buffer import CONVERSION_ERRORS, ShardBuffer, prepare_conversions
from batchrun.output.done import DoneSet
from batchrun.output.files import fsync_dir, move_aside, write_durably, write_error, write_file_durably
from batchrun.output.layout import PARQUET_SUFFIX, POSITIONS_SUFFIX, OutputStore
from batchrun.output.manifest import (
    POSITION_DTYPE,
    ManifestLog,
    ManifestView,
    ShardFile,
    file_crc32,
    read_manifest,
    read_positions,
    shard_problem,
)
from batchrun.output.schema import BOOKKEEPING_COLUMNS, build_failed_schema, kept_columns_of, with_hf_metadata
from batchrun.records import FailureType, RowFailure, RowResult

__all__ = ["ParquetSink", "SinkCounters"]

logger = logging.getLogger(__name__)

_ROW_GROUP_BYTES = 8 << 20


@dataclass
class SinkCounters:
    """What this run has committed so far."""

    ok: int = 0
    failed: int = 0
    data_shards: int = 0
    failed_shards: int = 0

    @property
    def shards(self) -> int:
        return self.data_shards + self.failed_shards


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ParquetSink:
    """Writes every row's final record into Parquet shards, and knows what is done on resume.

    Call :meth:`open` first (it reconciles the folder after a crash and returns the :class:`DoneSet`),
    then :meth:`add` one record per row, :meth:`commit` now and then, and :meth:`close` at the end.
    Synchronous and not thread-safe: the runner calls it from one thread at a time.

    ``kept_columns`` names the kept input columns of ``data_schema``: failed shards carry them too
    (see :func:`build_failed_schema`). Without it, failed shards hold no input columns.
    """

    def __init__(
        self,
        store: OutputStore,
        *,
        data_schema: pa.Schema,
        id_column: str,
        shard_rows: int = 10_000,
        shard_bytes: int = 64 << 20,
        kept_columns: Sequence[str] = (),
    ) -> None:
        if shard_rows < 1 or shard_bytes < 1:
            raise ValueError("shard_rows and shard_bytes must be positive")
        if data_schema.names[0] != id_column:
            raise ValueError(f"the data schema must start with the id column {id_column!r}")
        if data_schema.names[-len(BOOKKEEPING_COLUMNS) :] != [f.name for f in BOOKKEEPING_COLUMNS]:
            raise ValueError("the data schema must end with latency_s and attempts (see build_data_schema)")
        self.store = store
        self.id_column = id_column
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.data_schema = with_hf_metadata(data_schema)
        self.failed_schema = build_failed_schema(data_schema, id_column, kept_columns)
        # What failed shards written before kept columns were recorded look like: still accepted.
        self._legacy_failed_schema = build_failed_schema(data_schema, id_column)
        self.counters = SinkCounters()
        self.done: DoneSet | None = None
        self.run_id: str | None = None

        self._data = ShardBuffer("data", self.data_schema)
        self._failed = ShardBuffer("failed", self.failed_schema)
        self._value_column_set = frozenset(self._data.value_columns)
        self._kept_column_set = frozenset(self._failed.value_columns)
        self._manifest: ManifestLog | None = None
        self._next_seq = 0
        # Why publication failed after a shard became visible; once set, nothing more is written.
        self._broken: str | None = None

    def __repr__(self) -> str:
        return f"ParquetSink({str(self.store.root)!r}, run={self.run_id!r}, {self.counters})"

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening and resume ------------------------------------------------------------------------

    def open(self, *, retry_failed: bool = False) -> DoneSet:
        """Reconcile the folder with its manifest, reopen retryable failures, and return the done-set.

        ``retry_failed`` reopens final failures too (``batchrun run --retry-failed``): their rows are
        pending again, and their old records stop counting, as retryable ones do.
        """
        store = self.store
        prepare_conversions()  # pyarrow's one-time imports now, not at the first shard
        try:
            for folder in (store.data_dir, store.failed_dir, store.positions_dir, store.tmp_dir):
                folder.mkdir(parents=True, exist_ok=True)
            # Files under tmp/ were never renamed into place, so nothing counts on them.
            for leftover in store.tmp_dir.iterdir():
                if leftover.is_file():
                    leftover.unlink()

            view = read_manifest(store.manifest_path)
            self._manifest = ManifestLog(store.manifest_path, view)
            self.run_id = f"r{view.runs + 1}"
            self._next_seq = view.max_seq + 1
            # Recorded first, so that this run's shard names can never be reused by a later run.
            self._append({"op": "run", "run": self.run_id, "started": _now()})

            self._reconcile(view)
            done = DoneSet()
            self._reopen_retryable(view, done, everything=retry_failed)
            for shard in view.listed.values():
                done.add_many(read_positions(store.root, shard))
                if shard.kind == "data":
                    done.ok += shard.rows
                else:
                    done.failed += shard.rows
            self._remove_stray_sidecars(view)
        except BaseException as exc:
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None
            if isinstance(exc, OSError):
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise write_error(store.root, "its state (state/manifest.jsonl)", exc) from exc
                raise OutputError(f"cannot open the output folder {store.root}: {exc}") from exc
            raise
        self.done = done
        return done

    def _reconcile(self, view: ManifestView) -> None:
        """Make the folders agree with the manifest, moving aside (never deleting) what does not."""
        store = self.store
        root = store.root
        for folder in (store.data_dir, store.failed_dir):
            for path in sorted(folder.glob(f"*{PARQUET_SUFFIX}")):
                relative = path.relative_to(root).as_posix()
                if relative in view.listed or not store.owns(path.name):  # another shard's file is its own
                    continue
                # A retired shard whose move was cut short goes where its retirement said;
                # anything else was renamed but never recorded (a crash before the manifest append).
                aside = view.retired.get(relative, "orphans")
                target = move_aside(path, store.state_dir / aside)
                if aside == "orphans":
                    logger.warning(
                        "sink.orphan_moved file=%s to=%s (not in the manifest; its rows are redone)", relative, target
                    )
                self._move_sidecar_aside(relative, store.state_dir / aside)

        schemas = {"data": [self.data_schema], "failed": [self.failed_schema, self._legacy_failed_schema]}
        for relative, shard in list(view.listed.items()):
            problem = shard_problem(root, shard, schemas[shard.kind])
            if problem is None:
                continue
            logger.warning("sink.shard_unreadable file=%s problem=%s (its rows are redone)", relative, problem)
            # Recorded before the move: if the move is cut short, the next open finishes it.
            self._append({"op": "retire", "file": relative, "aside": "orphans", "reason": problem})
            del view.listed[relative]
            view.retired[relative] = "orphans"
            if (root / relative).exists():
                move_aside(root / relative, store.orphans_dir)

    def _read_failed_shard(self, relative: str) -> pa.Table:
        """A failed shard in this sink's failed schema; kept columns it lacks (an older shard) are null."""
        table = pq.read_table(self.store.root / relative)
        for name in kept_columns_of(self.failed_schema):
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, self.failed_schema.field(name).type))
        return table.select(self.failed_schema.names).cast(self.failed_schema)

    def _reopen_retryable(self, view: ManifestView, done: DoneSet, *, everything: bool = False) -> None:
        """Retire each failed shard holding retryable rows, republishing only its permanent rows
        (``everything``: retire every failed shard, its final failures reopened too).

        Order: publish the replacement (sidecar, rename), then one manifest line that both lists the
        replacement and retires the old shard, then move the old shard to ``state/retired/``. A crash
        before the line leaves the old shard counting and the replacement an orphan; after it, the
        old shard is moved at the next open.
        """
        root = self.store.root
        for relative, shard in sorted(view.listed.items()):
            if shard.kind != "failed" or (shard.retryable == 0 and not everything):
                continue
            try:
                table = self._read_failed_shard(relative)
            except (pa.ArrowException, OSError, KeyError) as exc:
                logger.warning("sink.shard_unreadable file=%s problem=%s (its rows are redone)", relative, exc)
                # A footer that reads but pages that do not: like any unreadable shard, redo its rows.
                self._append({"op": "retire", "file": relative, "aside": "orphans", "reason": f"unreadable ({exc})"})
                del view.listed[relative]
                move_aside(root / relative, self.store.orphans_dir)
                continue
            positions = read_positions(root, shard)
            permanent = ~np.asarray(table.column("retryable").fill_null(False).to_numpy(zero_copy_only=False))
            if everything:
                permanent[:] = False
            done.retried_failures += int((~permanent).sum())
            del view.listed[relative]
            view.retired[relative] = "retired"
            if permanent.any():
                kept = table.filter(pa.array(permanent))
                event = self._publish("failed", kept, positions[permanent], retryable=0, replaces=relative)
                view.listed[event["file"]] = ShardFile.from_event(event)
            else:
                reason = "retry_failed" if everything else "retryable"
                self._append({"op": "retire", "file": relative, "aside": "retired", "reason": reason})
            move_aside(root / relative, self.store.retired_dir)
            self._move_sidecar_aside(relative, self.store.retired_dir)
            logger.info(
                "sink.failures_reopened file=%s retryable=%d permanent=%d",
                relative, int((~permanent).sum()), int(permanent.sum()),
            )  # fmt: skip

    def _move_sidecar_aside(self, relative: str, folder: Path) -> None:
        sidecar = self.store.positions_dir / (Path(relative).stem + POSITIONS_SUFFIX)
        if sidecar.exists():
            move_aside(sidecar, folder)

    def _remove_stray_sidecars(self, view: ManifestView) -> None:
        """Remove sidecars of shards that were never published: internal state that vouches for nothing."""
        wanted = {Path(shard.positions).name for shard in view.listed.values()}
        for sidecar in self.store.positions_dir.glob(f"*{POSITIONS_SUFFIX}"):
            if sidecar.name not in wanted:
                sidecar.unlink()

    # -- writing -----------------------------------------------------------------------------------

    def add(self, record: RowResult | RowFailure) -> None:
        """Buffer one row's final record; publishes a shard when it reaches ``shard_rows`` or ``shard_bytes``."""
        self._refuse_if_broken()
        if self.done is None or self._manifest is None:
            raise RuntimeError("ParquetSink.add() needs an open sink: call open() first, and not after close()")
        if isinstance(record, RowResult):
            values = {**record.kept, **record.output}
            allowed = self._value_column_set
        else:
            values = record.kept
            allowed = self._kept_column_set
        if not values.keys() <= allowed:
            unknown = sorted(set(values) - allowed)
            raise OutputError(f"row {record.id!r} has columns {unknown} that the output schema does not declare")
        # Each position gets exactly one record: a second one would be a duplicate row in the output.
        if not self.done.add(record.position):
            raise OutputError(
                f"row {record.id!r} (position {record.position}) already has a record in {self.store.root}"
            )

        if isinstance(record, RowResult):
            buffer = self._data
            buffer.append_result(record.position, record.id, values, record.latency_s, record.attempts)
        else:
            buffer = self._failed
            buffer.append_failure(
                record.position, record.id, error_type=record.error_type, error=record.error,
                status=record.status, attempts=record.attempts, retryable=record.retryable, kept=values,
            )  # fmt: skip
        if len(buffer) >= self.shard_rows or buffer.estimated_bytes >= self.shard_bytes:
            self._commit_buffer(buffer)

    def commit(self) -> None:
        """Publish whatever is buffered, data and failed, if anything."""
        self._refuse_if_broken()
        self._commit_buffer(self._data)
        self._commit_buffer(self._failed)

    def close(self) -> None:
        """Commit what is buffered and release the manifest."""
        try:
            if self.done is not None:
                self.commit()
        finally:
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None

    def _refuse_if_broken(self) -> None:
        if self._broken is not None:
            raise self._broken_error()

    def _broken_error(self) -> OutputError:
        return OutputError(
            f"the output could not be committed: {self._broken}; "
            "run the job again: the next run resumes from what was published"
        )

    def _break(self, reason: str) -> None:
        """Stop writing for good: a shard is visible and may or may not be recorded in the manifest.

        Publishing its rows again could list them twice, and a manifest line may be cut short, so no
        further line may follow it. The next :meth:`open` settles it: a complete line counts the
        shard, a torn one is cut off and the shard moved to ``state/orphans/``.
        """
        self._broken = reason
        self._data.clear()
        self._failed.clear()
        logger.error("sink.broken reason=%s (nothing more is written; the next run reconciles)", redact(reason))

    def _commit_buffer(self, buffer: ShardBuffer) -> None:
        if not len(buffer):
            return
        try:
            table = buffer.to_table()
        except CONVERSION_ERRORS:
            # One row that does not fit must not hold back the others (or fail every run the same way).
            self._divert_unconvertible(buffer)
            if not len(buffer):
                return
            try:
                table = buffer.to_table()
            except CONVERSION_ERRORS as exc:
                raise OutputError(f"a buffered {buffer.kind} row does not fit the output schema: {exc}") from exc
        positions = np.asarray(buffer.positions, dtype=POSITION_DTYPE)
        try:
            self._publish(buffer.kind, table, positions, retryable=buffer.retryable)
        except OSError as exc:
            if self._broken is not None:  # the shard was renamed into place: never publish these rows again
                raise self._broken_error() from exc
            # Nothing was visible yet: the buffer is kept, and a later commit publishes it under a new name.
            raise write_error(self.store.root, f"a {buffer.kind} shard", exc) from exc
        if buffer.replaced:
            logger.warning(
                "sink.unencodable_replaced file_kind=%s values=%d (lone surrogates stored as U+FFFD)",
                buffer.kind, buffer.replaced,
            )  # fmt: skip
        if buffer.kind == "data":
            self.counters.ok += len(buffer)
            self.counters.data_shards += 1
        else:
            self.counters.failed += len(buffer)
            self.counters.failed_shards += 1
        buffer.clear()

    def _divert_unconvertible(self, buffer: ShardBuffer) -> None:
        """Turn each row of ``buffer`` that cannot be converted into a permanent ``output_schema`` failure.

        The rows leave ``buffer`` and join the failed buffer (the same one, for failed rows), keeping
        their id, attempts and every kept input value that fits. The positions stay in the done-set:
        each still ends in exactly one place.
        """
        bad = buffer.unconvertible_rows()
        unrecordable = [i for i, (column, _) in bad.items() if column == self.id_column]
        if unrecordable:
            index = unrecordable[0]
            raise OutputError(
                f"row at position {buffer.positions[index]} cannot be recorded at all: {bad[index][1]}"
            )
        failed = self._failed
        diverted = []
        for index, (_, problem) in sorted(bad.items()):
            logger.warning(
                "sink.row_unconvertible position=%d problem=%s (recorded as a permanent failure)",
                buffer.positions[index], problem,
            )  # fmt: skip
            kept = {name: buffer.value(name, index, failed.schema.field(name).type) for name in failed.value_columns}
            attempts = buffer.value("attempts", index, pa.int32())
            diverted.append((buffer.positions[index], buffer.columns[self.id_column][index], problem, attempts, kept))
        buffer.remove(set(bad))
        for position, id_, problem, attempts, kept in diverted:
            failed.append_failure(
                position, id_, error_type=FailureType.OUTPUT_SCHEMA, error=problem, status=None, attempts=attempts,
                retryable=False, kept=kept,
            )  # fmt: skip

    def _publish(
        self, kind: str, table: pa.Table, positions: np.ndarray, *, retryable: int, replaces: str | None = None
    ) -> dict:
        """Publish one shard: sidecar, temp file, fsync, rename, fsync folder, manifest line.

        A failure before the rename removes the sidecar and the temp file (nothing vouches for them)
        and raises :class:`OutputError` naming the shard; after it, the sink breaks (see :meth:`_break`).
        """
        store = self.store
        seq = self._next_seq
        self._next_seq += 1
        stem = f"{store.file_prefix}part-{seq:05d}-{self.run_id}"
        folder = store.data_dir if kind == "data" else store.failed_dir
        final = folder / f"{stem}{PARQUET_SUFFIX}"
        sidecar = store.positions_dir / f"{stem}{POSITIONS_SUFFIX}"
        tmp = store.tmp_dir / f"{stem}{PARQUET_SUFFIX}.tmp"
        relative = final.relative_to(store.root).as_posix()

        # Row groups of about 8 MiB: the writer's buffers follow the row group, not the shard, which keeps
        # image shards' memory low, and the Hub's viewer reads small row groups of images quickly.
        row_group_rows = max(1, min(table.num_rows, int(table.num_rows * _ROW_GROUP_BYTES / max(1, table.nbytes))))
        try:
            # The sidecar must be durable before the shard can be seen, or a listed shard could lack it.
            write_durably(sidecar, positions.astype(POSITION_DTYPE, copy=False).tobytes())
            fsync_dir(store.positions_dir)
            write_file_durably(
                tmp, lambda f: pq.write_table(table, f, compression="zstd", row_group_size=row_group_rows)
            )
            crc32 = file_crc32(tmp)  # read back from the page cache: what readers check a changed file against
            os.replace(tmp, final)
        except OSError as exc:
            for leftover in (tmp, sidecar):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise write_error(store.root, relative, exc) from exc
        # From here on the shard is visible, and its manifest line may be written, whole or in part,
        # even if an error follows: its rows must never be published again by this process.
        try:
            fsync_dir(folder)
            stat = final.stat()
            event = {
                "op": "publish",
                "kind": kind,
                "file": relative,
                "positions": sidecar.relative_to(store.root).as_posix(),
                "rows": table.num_rows,
                "retryable": retryable,
                "seq": seq,
                "run": self.run_id,
                "bytes": stat.st_size,
                "crc32": crc32,
                "mtime_ns": stat.st_mtime_ns,
                "time": _now(),
            }
            if replaces is not None:
                event["replaces"] = replaces
            self._append(event)
        except OSError as exc:
            self._break(f"recording {relative} in the manifest failed after it was renamed into place ({exc})")
            raise
        return event

    def _append(self, event: dict) -> None:
        """Append one line to the manifest and make it durable: this is the moment things count."""
        assert self._manifest is not None
        self._manifest.append(event)
