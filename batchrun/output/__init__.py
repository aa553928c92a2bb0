"""The output folder: Parquet shards published atomically, a manifest, and the resume state.

Layout (a public contract)::

    OUTPUT/
      data/part-00003-r2.parquet      successful rows: id, kept input columns, output columns, latency_s, attempts
      failed/part-00004-r2.parquet    failed rows: id, kept input columns, error_type, error, status, attempts,
                                      retryable (shards written by older versions have no kept input columns)
      state/
        lock                          the run writing this folder: flock + holder record (one writer at a time)
        job.json                      spec snapshot and config fingerprint (written by the runner)
        manifest.jsonl                one JSON line per event; the truth about what is published
        positions/<stem>.u64          per shard: its rows' source positions, little-endian uint64
        summary.json                  the last run's summary
        retired/                      failed shards replaced because their retryable rows are redone
        orphans/                      shards found on disk that the manifest does not vouch for
        tmp/                          files being written; never published, removed at open()

Together, ``data`` and ``failed`` hold every input id exactly once (reliability.md §1).

How a shard is published (the order is what makes a crash at any point harmless):

1. its positions sidecar is written and fsynced;
2. the Parquet file is written under ``state/tmp/``, closed and fsynced;
3. it is renamed (``os.replace``) into ``data/`` or ``failed/`` and that folder is fsynced;
4. a ``publish`` line is appended to ``state/manifest.jsonl`` and fsynced.

Only step 4 makes a shard count. At :meth:`ParquetSink.open`, anything the manifest does not list is
moved to ``state/orphans/`` and its rows are redone; a listed shard that cannot be read is moved
there too and its rows are redone as well. Nothing the user can see is ever deleted. A write that
fails before step 3 (a full disk) removes its sidecar and temp file and keeps the rows buffered; an
error after step 3 breaks the sink for the rest of the process (its rows may already count, so they
are never published again); the next open settles it. A row that does not fit the schema becomes a
permanent ``output_schema`` failure instead of failing its whole shard.

Resume does not hold finished ids: it holds a bitmap over source positions (:class:`DoneSet`),
12.5 MB for 100 million rows, rebuilt at open from the sidecars of the listed shards.

The modules, one responsibility each: ``layout`` (where things live, job.json, summary.json),
``files`` (durable writes), ``schema``, ``manifest``, ``buffer`` (a shard's rows), ``done``,
``sink``, ``status`` (read-only counts) and ``lock`` (one writer per folder).
"""

from typing import Any

from batchrun.output.done import DoneSet
from batchrun.output.layout import OutputStore
from batchrun.output.lock import LockState, OutputLock, read_lock
from batchrun.output.schema import FAILED_COLUMNS, build_data_schema, build_failed_schema, data_columns
from batchrun.output.sink import ParquetSink, SinkCounters
from batchrun.output.status import OutputStatus, read_status

# An object-store URL's store registers itself with the layout as it loads.
from batchrun.output import remote as _remote  # noqa: F401  (isort: skip)


def writer_lock(store: OutputStore) -> Any:
    """The lock that makes a run ``store``'s only writer: an :class:`OutputLock` on a folder, the
    shard's lease on an object store (whose store class brings its own ``writer_lock``)."""
    own = getattr(type(store), "writer_lock", None)
    return own(store) if own is not None else OutputLock(store)


def new_sink(store: OutputStore, **options: Any) -> Any:
    """The sink that writes ``store``: a :class:`ParquetSink` on a folder, the object store's own sink."""
    own = getattr(type(store), "new_sink", None)
    return own(store, **options) if own is not None else ParquetSink(store, **options)

__all__ = [
    "FAILED_COLUMNS",
    "DoneSet",
    "LockState",
    "OutputLock",
    "OutputStatus",
    "OutputStore",
    "ParquetSink",
    "SinkCounters",
    "build_data_schema",
    "build_failed_schema",
    "data_columns",
    "new_sink",
    "read_lock",
    "read_status",
    "writer_lock",
]
