"""The output folder: Parquet shards published atomically, a manifest, and the resume state.

Layout (a public contract)::

    OUTPUT/
      data/part-00003-r2.parquet      successful rows: id, kept input columns, output columns, latency_s, attempts
      failed/part-00004-r2.parquet    failed rows: id, error_type, error, status, attempts, retryable
      state/
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
there too and its rows are redone as well. Nothing the user can see is ever deleted. An error after
step 3 breaks the sink for the rest of the process (its rows may already count, so they are never
published again); the next open settles it. A row that does not fit the schema becomes a permanent
``output_schema`` failure instead of failing its whole shard.

Resume does not hold finished ids: it holds a bitmap over source positions (:class:`DoneSet`),
12.5 MB for 100 million rows, rebuilt at open from the sidecars of the listed shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.errors import OutputError, redact
from batchrun.records import RowFailure, RowResult

__all__ = [
    "FAILED_COLUMNS",
    "DoneSet",
    "OutputStatus",
    "OutputStore",
    "ParquetSink",
    "SinkCounters",
    "build_data_schema",
    "build_failed_schema",
    "read_status",
]

logger = logging.getLogger(__name__)

#: The columns of a failed shard after its id column.
FAILED_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("error_type", pa.string()),
    pa.field("error", pa.string()),
    pa.field("status", pa.int32()),
    pa.field("attempts", pa.int32()),
    pa.field("retryable", pa.bool_()),
)

#: The columns every data shard ends with, after the task's output columns.
_BOOKKEEPING_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("latency_s", pa.float64()),
    pa.field("attempts", pa.int32()),
)

_MANIFEST = "manifest.jsonl"
_PARQUET_SUFFIX = ".parquet"
_POSITIONS_SUFFIX = ".u64"
# Sidecars are little-endian whatever the machine, so an output folder can be moved between hosts.
_POSITION_DTYPE = np.dtype("<u8")


# --------------------------------------------------------------------------------------------------
# Schemas


def _features_dict(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features of ``schema``, honouring any ``huggingface`` metadata it carries."""
    # Imported here: datasets is heavy, and only schema building needs it.
    from datasets import Features

    return Features.from_arrow_schema(schema).to_dict()


def _with_hf_metadata(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``huggingface`` metadata that tells ``datasets`` how to decode each column.

    Derived with ``Features.from_arrow_schema``, which keeps features already declared in the
    schema's metadata (an ``Image`` over ``struct<bytes, path>``) and infers the rest from the types.
    """
    features = _features_dict(schema)
    metadata = dict(schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return schema.with_metadata(metadata)


def build_data_schema(
    input_schema: pa.Schema,
    *,
    id_column: str | None,
    keep_columns: Sequence[str] | None,
    output_schema: pa.Schema,
) -> pa.Schema:
    """The schema of every data shard, fixed before the first row so that all shards agree.

    The id column comes first (an int64 ``id`` holding the position when ``id_column`` is None),
    then the kept input columns in input order (all of them when ``keep_columns`` is None), then the
    task's output columns, then ``latency_s`` and ``attempts``. Features declared in either schema's
    ``huggingface`` metadata (such as ``Image``) are carried over.
    """
    input_features = _features_dict(input_schema)
    output_features = _features_dict(output_schema)

    if id_column is None:
        id_field = pa.field("id", pa.int64())
        id_feature: dict[str, Any] = {"dtype": "int64", "_type": "Value"}
    else:
        if id_column not in input_schema.names:
            raise OutputError(f"the id column {id_column!r} is not in the input (columns: {input_schema.names})")
        id_field = input_schema.field(id_column)
        id_feature = input_features[id_column]

    if keep_columns is None:
        kept_names = [name for name in input_schema.names if name != id_column]
        if id_column is None and "id" in kept_names:
            raise OutputError(
                "the input has a column named 'id', which clashes with the generated id column; "
                "set id_column: id to use it as the id, or list keep_columns without it"
            )
    else:
        missing = [name for name in keep_columns if name not in input_schema.names]
        if missing:
            raise OutputError(f"keep_columns names {missing}, which the input does not have")
        wanted = set(keep_columns)
        kept_names = [name for name in input_schema.names if name in wanted and name != id_field.name]

    taken = {id_field.name: "the id column"}
    for name in kept_names:
        taken[name] = "a kept input column"
    for field in [*output_schema, *_BOOKKEEPING_COLUMNS]:
        if field.name in taken:
            raise OutputError(
                f"the output column {field.name!r} clashes with {taken[field.name]} of the same name; "
                f"list keep_columns without {field.name!r}, or rename the input column"
            )
        taken[field.name] = "an output column"

    fields = [id_field, *(input_schema.field(n) for n in kept_names), *output_schema, *_BOOKKEEPING_COLUMNS]
    features = {id_field.name: id_feature}
    features.update({n: input_features[n] for n in kept_names})
    features.update(output_features)
    features.update(_features_dict(pa.schema(list(_BOOKKEEPING_COLUMNS))))
    # Field-level metadata from the input (pandas, ...) is not ours to carry into the output.
    schema = pa.schema([f.remove_metadata() for f in fields])
    return schema.with_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})


def build_failed_schema(data_schema: pa.Schema, id_column: str) -> pa.Schema:
    """The schema of every failed shard: the data schema's id column, then :data:`FAILED_COLUMNS`."""
    return _with_hf_metadata(pa.schema([data_schema.field(id_column).remove_metadata(), *FAILED_COLUMNS]))


# --------------------------------------------------------------------------------------------------
# Durable file helpers


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive power loss (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable enough.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it. Not atomic: only for files that are not yet trusted."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new one, never half."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.tmp"
    _write_durably(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _move_aside(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` under a name that does not overwrite anything already there."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{path.stem}.{n}{path.suffix}"
    os.replace(path, target)
    _fsync_dir(folder)
    _fsync_dir(path.parent)
    return target


def _read_json(path: Path) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputError(f"{path} is not valid JSON ({exc}); restore it or pass --fresh") from exc


def _json_bytes(value: dict) -> bytes:
    # redact(): state files must never hold the token, wherever a value in them came from.
    return redact(json.dumps(value, indent=2, sort_keys=True, default=str)).encode() + b"\n"


# --------------------------------------------------------------------------------------------------
# The output folder


class OutputStore:
    """The output folder of one job: where things live, job.json, summary.json, and setting it aside."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.failed_dir = self.root / "failed"
        self.state_dir = self.root / "state"

    def __repr__(self) -> str:
        return f"OutputStore({str(self.root)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.state_dir / _MANIFEST

    @property
    def positions_dir(self) -> Path:
        return self.state_dir / "positions"

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir / "tmp"

    @property
    def retired_dir(self) -> Path:
        return self.state_dir / "retired"

    @property
    def orphans_dir(self) -> Path:
        return self.state_dir / "orphans"

    def exists(self) -> bool:
        """Whether the folder holds a previous run: a job.json, a manifest, or any shard."""
        if (self.state_dir / "job.json").exists() or self.manifest_path.exists():
            return True
        return any(any(d.glob(f"*{_PARQUET_SUFFIX}")) for d in (self.data_dir, self.failed_dir) if d.is_dir())

    def check_writable(self) -> None:
        """Prove the folder can be written before anything costs money (reliability.md §3).

        Creates the root and ``state/`` if needed, writes and removes a probe file, then removes every
        folder it created, whether the probe succeeded or not: ``batchrun validate`` promises to change
        nothing, and the run creates what it needs when the sink opens.
        """
        created: list[Path] = []
        probe = self.state_dir / f".write-probe-{os.getpid()}"
        try:
            for folder in reversed([self.state_dir, *self.state_dir.parents]):
                if not folder.exists():
                    folder.mkdir()
                    created.append(folder)
            _write_durably(probe, b"batchrun write probe\n")
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise OutputError(f"the output folder {self.root} is not writable: {exc}") from exc
        finally:
            # Innermost first; rmdir never removes a folder something else has written into meanwhile.
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def load_job(self) -> dict | None:
        """The job snapshot saved by a previous run, or None for a new output folder."""
        return _read_json(self.state_dir / "job.json")

    def save_job(self, job: dict) -> None:
        """Save the spec snapshot and config fingerprint atomically. Secrets are scrubbed."""
        self._save_state_file("job.json", job)

    def load_summary(self) -> dict | None:
        """The summary of the last run, or None."""
        return _read_json(self.state_dir / "summary.json")

    def write_summary(self, summary: dict) -> None:
        """Save the run's summary atomically. Secrets are scrubbed."""
        self._save_state_file("summary.json", summary)

    def _save_state_file(self, name: str, value: dict) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _replace_atomically(self.state_dir / name, _json_bytes(value), self.tmp_dir)
        except OSError as exc:
            raise OutputError(f"cannot write {self.state_dir / name}: {exc}") from exc

    def set_aside(self) -> Path:
        """For ``--fresh``: rename the folder to ``<root>.previous-<YYYYmmdd-HHMMSS>`` and return that path.

        Never deletes: a previous run's results may have cost hours of GPU time.
        """
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.root.with_name(f"{self.root.name}.previous-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.root.with_name(f"{self.root.name}.previous-{stamp}-{n}")
        try:
            os.rename(self.root, target)
        except OSError as exc:
            raise OutputError(f"cannot set {self.root} aside as {target}: {exc}") from exc
        _fsync_dir(target.parent)
        return target


# --------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True, slots=True)
class _Shard:
    """One published shard as the manifest describes it."""

    kind: str  # "data" or "failed"
    file: str  # relative to the output root, e.g. "data/part-00003-r2.parquet"
    positions: str  # relative to the output root
    rows: int
    retryable: int  # failed shards: how many of its rows are retryable
    seq: int


@dataclass
class _ManifestView:
    """What the manifest says: the shards that count, the ones retired, and where the log ends."""

    listed: dict[str, _Shard]
    retired: dict[str, str]  # file -> the folder under state/ it belongs in
    runs: int
    max_seq: int
    good_bytes: int  # offset just past the last complete line
    torn: bool  # the last line was cut short by a crash


def _read_manifest(path: Path) -> _ManifestView:
    """Replay ``manifest.jsonl``. A last line cut short by a crash mid-append is ignored."""
    view = _ManifestView(listed={}, retired={}, runs=0, max_seq=-1, good_bytes=0, torn=False)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return view
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc

    # (start, end, has_newline) of every line, so that a torn tail can be cut at an exact offset.
    spans: list[tuple[int, int, bool]] = []
    offset = 0
    while offset < len(raw):
        newline = raw.find(b"\n", offset)
        if newline == -1:
            spans.append((offset, len(raw), False))
            break
        spans.append((offset, newline, True))
        offset = newline + 1
    last_content = max((i for i, (a, b, _) in enumerate(spans) if raw[a:b].strip()), default=-1)

    for index, (start, end, has_newline) in enumerate(spans):
        line = raw[start:end]
        if line.strip():
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("a line is not a JSON object")
                _apply_event(view, event)
            except (ValueError, KeyError, TypeError) as exc:
                if index == last_content:
                    # Only the last line can be cut short by a crash; whatever it was, it never counted.
                    view.torn = True
                    return view
                raise OutputError(
                    f"{path} is damaged at line {index + 1} ({exc}); it is the record of what is done, "
                    "so batchrun will not guess: restore it, or pass --fresh to set this output aside"
                ) from exc
        # A complete object whose newline never made it still counts, but the file needs the newline.
        view.torn = not has_newline
        view.good_bytes = end + 1 if has_newline else end
    return view


def _apply_event(view: _ManifestView, event: dict) -> None:
    op = event.get("op")
    if op == "run":
        view.runs += 1
    elif op == "publish":
        shard = _Shard(
            kind=event["kind"],
            file=event["file"],
            positions=event["positions"],
            rows=int(event["rows"]),
            retryable=int(event.get("retryable", 0)),
            seq=int(event["seq"]),
        )
        view.listed[shard.file] = shard
        view.retired.pop(shard.file, None)
        view.max_seq = max(view.max_seq, shard.seq)
        replaced = event.get("replaces")
        if replaced:
            view.listed.pop(replaced, None)
            view.retired[replaced] = "retired"
    elif op == "retire":
        view.listed.pop(event["file"], None)
        view.retired[event["file"]] = event.get("aside", "retired")


def _shard_readable(root: Path, shard: _Shard, schema: pa.Schema | None) -> str | None:
    """Why ``shard`` cannot be trusted, or None when its footer, row count and sidecar agree."""
    path = root / shard.file
    try:
        # Opening reads the footer, which a writer that never closed did not write.
        with pq.ParquetFile(path) as parquet:
            rows = parquet.metadata.num_rows
            file_schema = parquet.schema_arrow
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError ... for a file with no footer
        return f"unreadable ({type(exc).__name__}: {exc})"
    if rows != shard.rows:
        return f"holds {rows} rows, the manifest says {shard.rows}"
    try:
        sidecar_bytes = (root / shard.positions).stat().st_size
    except OSError:
        return "its positions file is missing"
    if sidecar_bytes != shard.rows * _POSITION_DTYPE.itemsize:
        return "its positions file has the wrong size"
    if schema is not None and not file_schema.equals(schema, check_metadata=False):
        raise OutputError(
            f"{path} has a different schema from this job's ({file_schema} vs {schema}); shards of two "
            "schemas cannot be loaded as one dataset: use another output folder or pass --fresh"
        )
    return None


def _read_positions(root: Path, shard: _Shard) -> np.ndarray:
    return np.fromfile(root / shard.positions, dtype=_POSITION_DTYPE)


# --------------------------------------------------------------------------------------------------
# Resume state


class DoneSet:
    """The source positions that already have their final record, as a growable bitmap.

    One bit per position: 100 million rows take 12.5 MB, however long their ids are. The runner
    skips a row iff its position is in the set. ``ok``, ``failed`` and ``retried_failures`` are the
    figures found at :meth:`ParquetSink.open`.
    """

    def __init__(self) -> None:
        self._bits = bytearray()
        self.ok = 0
        self.failed = 0
        self.retried_failures = 0

    def __repr__(self) -> str:
        return f"DoneSet(ok={self.ok}, failed={self.failed}, retried_failures={self.retried_failures})"

    def __contains__(self, position: int) -> bool:
        byte = position >> 3
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << (position & 7)))

    @property
    def nbytes(self) -> int:
        """The memory held by the bitmap."""
        return len(self._bits)

    def _grow_to(self, byte_count: int) -> None:
        if byte_count > len(self._bits):
            # Grow by an eighth so that adding positions in order costs amortised O(1) while the
            # bitmap never holds much more than one bit per position seen.
            new_size = max(byte_count, len(self._bits) + len(self._bits) // 8, 4096)
            self._bits.extend(bytes(new_size - len(self._bits)))

    def add(self, position: int) -> bool:
        """Mark ``position`` done. Returns False if it already was."""
        if position < 0:
            raise ValueError(f"a position is never negative, got {position}")
        byte, mask = position >> 3, 1 << (position & 7)
        self._grow_to(byte + 1)
        if self._bits[byte] & mask:
            return False
        self._bits[byte] |= mask
        return True

    def add_many(self, positions: np.ndarray) -> None:
        """Mark every position of an array done (used when loading a shard's sidecar)."""
        if positions.size == 0:
            return
        positions = positions.astype(np.uint64, copy=False)
        self._grow_to(int(positions.max() >> np.uint64(3)) + 1)
        view = np.frombuffer(self._bits, dtype=np.uint8)
        try:
            bits = np.left_shift(np.uint8(1), (positions & np.uint64(7)).astype(np.uint8))
            np.bitwise_or.at(view, (positions >> np.uint64(3)).astype(np.intp), bits)
        finally:
            # The bytearray cannot grow while a numpy view of it is alive.
            del view


# --------------------------------------------------------------------------------------------------
# The sink


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


_ROW_GROUP_BYTES = 8 << 20

#: What building an Arrow array from Python values raises for a value that does not fit its type.
_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError)


def _estimate_bytes(value: Any) -> int:
    """A cheap guess at a value's size in a buffer: exact for text and bytes, flat for the rest."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, dict):
        return sum(_estimate_bytes(v) for v in value.values())
    return 8


def _fits(value: Any, type_: pa.DataType) -> bool:
    try:
        pa.array([value], type=type_)
    except _CONVERSION_ERRORS:
        return False
    return True


class _ShardBuffer:
    """Rows waiting for their shard, kept column-wise because Arrow builds columns ~20x faster than rows."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self.positions: list[int] = []
        self.retryable = 0
        self.estimated_bytes = 0

    def __len__(self) -> int:
        return len(self.positions)

    def to_table(self) -> pa.Table:
        arrays = [pa.array(self.columns[f.name], type=f.type) for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)

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
            except _CONVERSION_ERRORS:
                pass
            for index, value in enumerate(values):
                if index in bad:
                    continue
                try:
                    pa.array([value], type=field.type)
                except _CONVERSION_ERRORS as exc:
                    problem = f"column {field.name!r}: expected {field.type}, got {type(value).__name__}"
                    detail = str(exc).strip()
                    if detail:
                        problem += f" ({detail[:200]})"
                    bad[index] = (field.name, redact(problem))
        return bad

    def remove(self, indices: set[int]) -> None:
        """Drop the rows at ``indices`` (the byte estimate is left as is: it only triggers rotation)."""
        for name, values in self.columns.items():
            self.columns[name] = [v for i, v in enumerate(values) if i not in indices]
        self.positions = [p for i, p in enumerate(self.positions) if i not in indices]
        if "retryable" in self.columns:
            self.retryable = sum(1 for v in self.columns["retryable"] if v)

    def clear(self) -> None:
        for values in self.columns.values():
            values.clear()
        self.positions.clear()
        self.retryable = 0
        self.estimated_bytes = 0


class ParquetSink:
    """Writes every row's final record into Parquet shards, and knows what is done on resume.

    Call :meth:`open` first (it reconciles the folder after a crash and returns the :class:`DoneSet`),
    then :meth:`add` one record per row, :meth:`commit` now and then, and :meth:`close` at the end.
    Synchronous and not thread-safe: the runner calls it from one thread at a time.
    """

    def __init__(
        self,
        store: OutputStore,
        *,
        data_schema: pa.Schema,
        id_column: str,
        shard_rows: int = 10_000,
        shard_bytes: int = 64 << 20,
    ) -> None:
        if shard_rows < 1 or shard_bytes < 1:
            raise ValueError("shard_rows and shard_bytes must be positive")
        if data_schema.names[0] != id_column:
            raise ValueError(f"the data schema must start with the id column {id_column!r}")
        self.store = store
        self.id_column = id_column
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.data_schema = _with_hf_metadata(data_schema)
        self.failed_schema = build_failed_schema(data_schema, id_column)
        self.counters = SinkCounters()
        self.done: DoneSet | None = None
        self.run_id: str | None = None

        # The kept input and output columns, in schema order: what a RowResult's dicts fill in.
        self._value_columns = data_schema.names[1 : -len(_BOOKKEEPING_COLUMNS)]
        self._value_column_set = frozenset(self._value_columns)
        if data_schema.names[-len(_BOOKKEEPING_COLUMNS) :] != [f.name for f in _BOOKKEEPING_COLUMNS]:
            raise ValueError("the data schema must end with latency_s and attempts (see build_data_schema)")
        self._data = _ShardBuffer(self.data_schema)
        self._failed = _ShardBuffer(self.failed_schema)
        self._manifest = None
        self._next_seq = 0
        # Why publication failed after a shard became visible; once set, nothing more is written.
        self._broken: str | None = None

    def __repr__(self) -> str:
        return f"ParquetSink({str(self.store.root)!r}, run={self.run_id!r}, {self.counters})"

    # -- opening and resume ------------------------------------------------------------------------

    def open(self) -> DoneSet:
        """Reconcile the folder with its manifest, reopen retryable failures, and return the done-set."""
        store = self.store
        try:
            for folder in (store.data_dir, store.failed_dir, store.positions_dir, store.tmp_dir):
                folder.mkdir(parents=True, exist_ok=True)
            # Files under tmp/ were never renamed into place, so nothing counts on them.
            for leftover in store.tmp_dir.iterdir():
                if leftover.is_file():
                    leftover.unlink()

            view = _read_manifest(store.manifest_path)
            if view.torn:
                self._repair_manifest_tail(view)
            self._manifest = open(store.manifest_path, "ab")
            self.run_id = f"r{view.runs + 1}"
            self._next_seq = view.max_seq + 1
            # Recorded first, so that this run's shard names can never be reused by a later run.
            self._append({"op": "run", "run": self.run_id, "started": _now()})

            self._reconcile(view)
            done = DoneSet()
            self._reopen_retryable(view, done)
            for shard in view.listed.values():
                positions = _read_positions(store.root, shard)
                done.add_many(positions)
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
                raise OutputError(f"cannot open the output folder {store.root}: {exc}") from exc
            raise
        self.done = done
        return done

    def _repair_manifest_tail(self, view: _ManifestView) -> None:
        """Cut a torn last line off, or finish a complete one, so that appends start on a fresh line."""
        path = self.store.manifest_path
        with open(path, "r+b") as f:
            f.truncate(view.good_bytes)
            if view.good_bytes:
                f.seek(view.good_bytes - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())

    def _reconcile(self, view: _ManifestView) -> None:
        """Make the folders agree with the manifest, moving aside (never deleting) what does not."""
        store = self.store
        root = store.root
        for folder in (store.data_dir, store.failed_dir):
            for path in sorted(folder.glob(f"*{_PARQUET_SUFFIX}")):
                relative = path.relative_to(root).as_posix()
                if relative in view.listed:
                    continue
                # A retired shard whose move was cut short goes where its retirement said;
                # anything else was renamed but never recorded (a crash before the manifest append).
                aside = view.retired.get(relative, "orphans")
                target = _move_aside(path, store.state_dir / aside)
                if aside == "orphans":
                    logger.warning("sink.orphan_moved file=%s to=%s (not in the manifest; its rows are redone)", relative, target)
                self._move_sidecar_aside(relative, store.state_dir / aside)

        for relative, shard in list(view.listed.items()):
            problem = _shard_readable(root, shard, self.data_schema if shard.kind == "data" else self.failed_schema)
            if problem is None:
                continue
            logger.warning("sink.shard_unreadable file=%s problem=%s (its rows are redone)", relative, problem)
            # Recorded before the move: if the move is cut short, the next open finishes it.
            self._append({"op": "retire", "file": relative, "aside": "orphans", "reason": problem})
            del view.listed[relative]
            view.retired[relative] = "orphans"
            if (root / relative).exists():
                _move_aside(root / relative, store.orphans_dir)

    def _reopen_retryable(self, view: _ManifestView, done: DoneSet) -> None:
        """Retire each failed shard holding retryable rows, republishing only its permanent rows.

        Order: publish the replacement (sidecar, rename), then one manifest line that both lists the
        replacement and retires the old shard, then move the old shard to ``state/retired/``. A crash
        before the line leaves the old shard counting and the replacement an orphan; after it, the
        old shard is moved at the next open.
        """
        root = self.store.root
        for relative, shard in sorted(view.listed.items()):
            if shard.kind != "failed" or shard.retryable == 0:
                continue
            try:
                table = pq.read_table(root / relative).cast(self.failed_schema)
            except (pa.ArrowException, OSError) as exc:
                logger.warning("sink.shard_unreadable file=%s problem=%s (its rows are redone)", relative, exc)
                # A footer that reads but pages that do not: like any unreadable shard, redo its rows.
                self._append({"op": "retire", "file": relative, "aside": "orphans", "reason": f"unreadable ({exc})"})
                del view.listed[relative]
                _move_aside(root / relative, self.store.orphans_dir)
                continue
            positions = _read_positions(root, shard)
            permanent = ~np.asarray(table.column("retryable").fill_null(False).to_numpy(zero_copy_only=False))
            done.retried_failures += int((~permanent).sum())
            del view.listed[relative]
            view.retired[relative] = "retired"
            if permanent.any():
                kept = table.filter(pa.array(permanent))
                event = self._publish("failed", kept, positions[permanent], retryable=0, replaces=relative)
                view.listed[event["file"]] = _shard_from_event(event)
            else:
                self._append({"op": "retire", "file": relative, "aside": "retired", "reason": "retryable"})
            _move_aside(root / relative, self.store.retired_dir)
            self._move_sidecar_aside(relative, self.store.retired_dir)
            logger.info(
                "sink.failures_reopened file=%s retryable=%d permanent=%d",
                relative, int((~permanent).sum()), int(permanent.sum()),
            )  # fmt: skip

    def _move_sidecar_aside(self, relative: str, folder: Path) -> None:
        sidecar = self.store.positions_dir / (Path(relative).stem + _POSITIONS_SUFFIX)
        if sidecar.exists():
            _move_aside(sidecar, folder)

    def _remove_stray_sidecars(self, view: _ManifestView) -> None:
        """Remove sidecars of shards that were never published: internal state that vouches for nothing."""
        wanted = {Path(shard.positions).name for shard in view.listed.values()}
        for sidecar in self.store.positions_dir.glob(f"*{_POSITIONS_SUFFIX}"):
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
            if not values.keys() <= self._value_column_set:
                unknown = sorted(set(values) - self._value_column_set)
                raise OutputError(f"row {record.id!r} has columns {unknown} that the output schema does not declare")
        # Each position gets exactly one record: a second one would be a duplicate row in the output.
        if not self.done.add(record.position):
            raise OutputError(f"row {record.id!r} (position {record.position}) already has a record in {self.store.root}")

        if isinstance(record, RowResult):
            buffer = self._data
            cols = buffer.columns
            size = 16
            for name in self._value_columns:
                value = values.get(name)
                cols[name].append(value)
                size += _estimate_bytes(value)
            cols["latency_s"].append(record.latency_s)
            cols["attempts"].append(record.attempts)
        else:
            buffer = self._failed
            cols = buffer.columns
            cols["error_type"].append(record.error_type)
            cols["error"].append(record.error)
            cols["status"].append(record.status)
            cols["attempts"].append(record.attempts)
            cols["retryable"].append(record.retryable)
            buffer.retryable += bool(record.retryable)
            size = 32 + len(record.error) + len(record.error_type)
        cols[self.id_column].append(record.id)
        buffer.positions.append(record.position)
        buffer.estimated_bytes += size + _estimate_bytes(record.id)
        if len(buffer) >= self.shard_rows or buffer.estimated_bytes >= self.shard_bytes:
            self._commit_buffer("data" if buffer is self._data else "failed")

    def commit(self) -> None:
        """Publish whatever is buffered, data and failed, if anything."""
        self._refuse_if_broken()
        self._commit_buffer("data")
        self._commit_buffer("failed")

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

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _commit_buffer(self, kind: str) -> None:
        buffer = self._data if kind == "data" else self._failed
        if not len(buffer):
            return
        try:
            table = buffer.to_table()
        except _CONVERSION_ERRORS:
            # One row that does not fit must not hold back the others (or fail every run the same way).
            self._divert_unconvertible(kind, buffer)
            if not len(buffer):
                return
            try:
                table = buffer.to_table()
            except _CONVERSION_ERRORS as exc:
                raise OutputError(f"a buffered {kind} row does not fit the output schema: {exc}") from exc
        positions = np.asarray(buffer.positions, dtype=_POSITION_DTYPE)
        try:
            self._publish(kind, table, positions, retryable=buffer.retryable)
        except OSError as exc:
            if self._broken is not None:  # the shard was renamed into place: never publish these rows again
                raise self._broken_error() from exc
            # Nothing was visible yet: the buffer is kept, a later commit publishes it under a new
            # name, and the sidecar and temp file left behind vouch for nothing (removed at open).
            raise OutputError(f"cannot publish a {kind} shard in {self.store.root}: {exc}") from exc
        if kind == "data":
            self.counters.ok += len(buffer)
            self.counters.data_shards += 1
        else:
            self.counters.failed += len(buffer)
            self.counters.failed_shards += 1
        buffer.clear()

    def _divert_unconvertible(self, kind: str, buffer: _ShardBuffer) -> None:
        """Turn each row of ``buffer`` that cannot be converted into a permanent ``output_schema`` failure.

        Data rows move to the failed buffer (published with it); failed rows are rewritten in place.
        The positions stay in the done-set: each still ends in exactly one place.
        """
        bad = buffer.unconvertible_rows()
        unrecordable = [i for i, (column, _) in bad.items() if column == self.id_column]
        if unrecordable:
            index = unrecordable[0]
            raise OutputError(
                f"row at position {buffer.positions[index]} cannot be recorded at all: {bad[index][1]}"
            )
        cols = buffer.columns
        for index, (_, problem) in sorted(bad.items()):
            logger.warning(
                "sink.row_unconvertible position=%d problem=%s (recorded as a permanent failure)",
                buffer.positions[index], problem,
            )  # fmt: skip
            attempts = cols["attempts"][index]
            attempts = attempts if _fits(attempts, pa.int32()) else None
            if kind == "data":
                failed = self._failed
                failed.columns[self.id_column].append(cols[self.id_column][index])
                failed.columns["error_type"].append("output_schema")
                failed.columns["error"].append(problem)
                failed.columns["status"].append(None)
                failed.columns["attempts"].append(attempts)
                failed.columns["retryable"].append(False)
                failed.positions.append(buffer.positions[index])
                failed.estimated_bytes += 64 + len(problem)
            else:
                cols["error_type"][index] = "output_schema"
                cols["error"][index] = problem
                cols["status"][index] = None
                cols["attempts"][index] = attempts
                cols["retryable"][index] = False
        if kind == "data":
            buffer.remove(set(bad))
        else:
            buffer.retryable = sum(1 for v in cols["retryable"] if v)

    def _publish(
        self, kind: str, table: pa.Table, positions: np.ndarray, *, retryable: int, replaces: str | None = None
    ) -> dict:
        """Publish one shard: sidecar, temp file, fsync, rename, fsync folder, manifest line."""
        store = self.store
        seq = self._next_seq
        self._next_seq += 1
        stem = f"part-{seq:05d}-{self.run_id}"
        folder = store.data_dir if kind == "data" else store.failed_dir
        final = folder / f"{stem}{_PARQUET_SUFFIX}"
        sidecar = store.positions_dir / f"{stem}{_POSITIONS_SUFFIX}"
        tmp = store.tmp_dir / f"{stem}{_PARQUET_SUFFIX}.tmp"

        # The sidecar must be durable before the shard can be seen, or a listed shard could lack it.
        _write_durably(sidecar, positions.astype(_POSITION_DTYPE, copy=False).tobytes())
        _fsync_dir(store.positions_dir)
        # Row groups of about 8 MiB: the writer's buffers follow the row group, not the shard, which keeps
        # image shards' memory low, and the Hub's viewer reads small row groups of images quickly.
        row_group_rows = max(1, min(table.num_rows, int(table.num_rows * _ROW_GROUP_BYTES / max(1, table.nbytes))))
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=row_group_rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        # From here on the shard is visible, and its manifest line may be written, whole or in part,
        # even if an error follows: its rows must never be published again by this process.
        relative = final.relative_to(store.root).as_posix()
        try:
            _fsync_dir(folder)
            event = {
                "op": "publish",
                "kind": kind,
                "file": relative,
                "positions": sidecar.relative_to(store.root).as_posix(),
                "rows": table.num_rows,
                "retryable": retryable,
                "seq": seq,
                "run": self.run_id,
                "bytes": final.stat().st_size,
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
        self._manifest.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        self._manifest.flush()
        os.fsync(self._manifest.fileno())


def _shard_from_event(event: dict) -> _Shard:
    return _Shard(
        kind=event["kind"],
        file=event["file"],
        positions=event["positions"],
        rows=event["rows"],
        retryable=event["retryable"],
        seq=event["seq"],
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Status


@dataclass
class OutputStatus:
    """What an output folder holds, as far as its manifest vouches for it."""

    ok: int
    failed: int
    failed_retryable: int
    data_shards: int
    failed_shards: int
    last_summary: dict | None
    job: dict | None


def read_status(root: str | Path) -> OutputStatus:
    """Count what ``root`` holds without changing anything (no reconcile, no moves).

    Counts come from Parquet footers and the failed shards' ``retryable`` column; a listed shard that
    cannot be read is not counted, as resume would not count it either.
    """
    store = OutputStore(root)
    if store.root.exists() and not store.root.is_dir():
        raise OutputError(f"{store.root} is not an output folder (it is a file)")
    # A folder that does not exist yet holds no run: all counts are zero and job is None.
    view = _read_manifest(store.manifest_path)
    status = OutputStatus(
        ok=0,
        failed=0,
        failed_retryable=0,
        data_shards=0,
        failed_shards=0,
        last_summary=store.load_summary(),
        job=store.load_job(),
    )
    for relative, shard in view.listed.items():
        if _shard_readable(store.root, shard, None) is not None:
            continue
        if shard.kind == "data":
            status.data_shards += 1
            status.ok += shard.rows
            continue
        status.failed_shards += 1
        try:
            retryable = pq.read_table(store.root / relative, columns=["retryable"]).column("retryable")
        except Exception:  # a footer that reads but a column that does not: not counted, like resume
            continue
        n_retryable = int(pc.sum(retryable.fill_null(False)).as_py() or 0)
        status.failed_retryable += n_retryable
        status.failed += shard.rows - n_retryable
    return status
