"""The rows a step of a job reads: those the step before it committed, that pass its ``filter``.

Read from the previous step's output folder: only the shards its manifests list, in the order of
their source positions, so a row's position depends only on that output (and the filter). The
previous step's own columns (those it produced, not the input columns it kept) are renamed
``<column>_<step>``, so that ``generated_text_generate`` names what it holds and never clashes with
the columns the next step produces; a structured answer (``parsed``, from ``output_schema``) gives
one column per field, so a judge step's verdict ``{score, reason}`` is read as ``score_judge`` and
``reason_judge``; ``latency_s`` and ``attempts`` are left out. A
previous step with several samples per row gives one row per (id, sample): its id becomes
``"<id>/<sample>"``. The fingerprint covers the previous step's output (its settings' fingerprint
and when it was started, so a --fresh rerun of it is another input) and the filter.

Steps stream: while the previous step runs, its shards are read as they are published (only closed
files are listed, so a shard is never read half-written), and reading ends when it has ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.errors import InputError
from batchrun.facts import ID_COLUMN
from batchrun.records import SAMPLE_COLUMN
from batchrun.sources._base import ID_SCAN_BATCH, DoneMask, _BaseSource
from batchrun.sources._files import _fingerprint
from batchrun.spec import InputSpec

__all__ = ["StepSource", "committed_rows"]

#: Columns of a data shard about the request, not the row: a later step does not read them.
_REQUEST_COLUMNS = ("latency_s", "attempts")
#: How often a step reading a running one looks for newly published shards.
TAIL_POLL_S = 0.2
#: The column of a structured answer (output_schema): a later step reads its fields as columns.
_PARSED = "parsed"


def committed_rows(root: str | Path, kind: str = "data") -> tuple[pa.Table | None, list[Any]]:
    """The committed rows of ``kind`` (``data`` or ``failed``) of an output folder, in input order, and
    the shards they come from; ``(None, [])`` when there are none."""
    from batchrun.output import OutputStore
    from batchrun.output.manifest import read_manifest, read_positions, shard_problem

    root = Path(root).absolute()
    listed = [shard for part in OutputStore.parts(root) for shard in read_manifest(part.manifest_path).listed.values()]
    shards = sorted((s for s in listed if s.kind == kind and shard_problem(root, s, ()) is None), key=lambda s: s.file)
    if not shards:
        return None, []
    table = pa.concat_tables([pq.read_table(root / shard.file) for shard in shards], promote_options="default")
    try:
        positions = np.concatenate([read_positions(root, shard) for shard in shards])
    except OSError:  # a sidecar gone: the rows stay in shard order
        return table, shards
    if len(positions) == table.num_rows:
        table = table.take(pa.array(np.argsort(positions, kind="stable")))
    return table, shards


class StepSource(_BaseSource):
    """The rows of the previous step (``spec.path``) that pass ``spec.step_filter``.

    While the previous step runs (``spec.upstream_done`` not set), its shards are read as they are
    published, in the order the manifest lists them, and reading ends once it has ended and every
    listed shard is read. A row's position counts the rows that passed the filter before it, in that
    order: the previous step only ever adds shards, so positions are the same on every rerun.
    """

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        from batchrun.output import OutputStore

        assert spec.path is not None
        self.root = Path(spec.path).absolute()
        self.step = self.root.name
        self._done_event = spec.upstream_done
        store = OutputStore(self.root)
        self._store = store
        job = store.load_job() if store.exists() else None
        if job is None:
            raise InputError(f"input: the step before reads from {self.root}, which it has not written yet")
        # The output the rows come from, not only its settings: a --fresh rerun of it is another input.
        self._upstream = {"fingerprint": job.get("fingerprint"), "created_at": job.get("created_at")}
        self._id_name = spec.id_column or ID_COLUMN
        self._kept = set(job.get("kept_columns") or ())
        first = self._wait_for_first_shard()
        if first is None:
            empty = pa.table({self._id_name: pa.array([], pa.string())})
            self.schema = empty.schema
        else:
            self.schema = self._prepared(pq.read_table(self.root / first.file)).schema
        where = f", {spec.step_filter}" if spec.step_filter else ""
        self.description = f"step: the rows of {self.step}{where}"

    def _ended(self) -> bool:
        return self._done_event is None or self._done_event.is_set()

    def _listed(self) -> list[Any]:
        from batchrun.output import OutputStore
        from batchrun.output.manifest import read_manifest

        listed = [s for part in OutputStore.parts(self.root) for s in read_manifest(part.manifest_path).listed.values()]
        return sorted((s for s in listed if s.kind == "data"), key=lambda s: (s.seq, s.file))

    def _wait_for_first_shard(self) -> Any:
        while True:
            ended = self._ended()
            listed = self._listed()
            if listed or ended:
                return listed[0] if listed else None
            time.sleep(TAIL_POLL_S)

    def _prepared(self, table: pa.Table) -> pa.Table:
        """A shard of the previous step as this step reads it: renamed, then filtered (a filter naming a
        column the rows lack is an InputError, said on the first shard)."""
        return self._filtered(self._renamed(table, self._id_name, self._kept))

    def _renamed(self, table: pa.Table, id_column: str, kept: set[str]) -> pa.Table:
        names = table.column_names
        features = _features(table.schema)
        columns: dict[str, pa.ChunkedArray] = {}
        new_features: dict[str, Any] = {}
        ids = table.column(id_column) if id_column in names else None
        if ids is not None and SAMPLE_COLUMN in names and SAMPLE_COLUMN not in kept:
            ids = pc.binary_join_element_wise(pc.cast(ids, pa.string()), pc.cast(table.column(SAMPLE_COLUMN),
                                                                                   pa.string()), "/")
            new_features[id_column] = {"dtype": "string", "_type": "Value"}
        elif features and id_column in features:
            new_features[id_column] = features[id_column]
        if ids is not None:
            columns[id_column] = ids
        for name in names:
            if name == id_column or name in _REQUEST_COLUMNS:
                continue
            column_type = table.schema.field(name).type
            if name == _PARSED and name not in kept and pa.types.is_struct(column_type):
                # A structured answer (a judge's verdict): each of its fields is a column of its own.
                nested = (features or {}).get(name)
                for index in range(column_type.num_fields):
                    field = column_type.field(index)
                    target = f"{field.name}_{self.step}"
                    columns[target] = pc.struct_field(table.column(name), [index])
                    if isinstance(nested, dict) and field.name in nested:
                        new_features[target] = nested[field.name]
                continue
            target = name if name in kept else f"{name}_{self.step}"
            columns[target] = table.column(name)
            if features and name in features:
                new_features[target] = features[name]
        renamed = pa.table(columns)
        if features is not None and set(new_features) == set(renamed.column_names):
            renamed = renamed.replace_schema_metadata(
                {b"huggingface": json.dumps({"info": {"features": new_features}}).encode()})
        return renamed

    def _filtered(self, table: pa.Table) -> pa.Table:
        text = self.spec.step_filter
        if text is None:
            return table
        from batchrun.spec._filter import compile_filter, filter_columns

        missing = [name for name in filter_columns(text) if name not in table.column_names]
        if missing:
            raise InputError(f"filter {text!r}: the rows of {self.step} have no column {missing[0]!r}; "
                             f"their columns: {', '.join(table.column_names)}")
        try:
            keep = compile_filter(text)
        except ValueError as exc:
            raise InputError(f"filter {text!r}: {exc}") from None
        if table.num_rows == 0:
            return table
        wanted = filter_columns(text) or table.column_names
        mask = []
        for offset in range(0, table.num_rows, ID_SCAN_BATCH):
            for row in table.slice(offset, ID_SCAN_BATCH).select(wanted).to_pylist():
                try:
                    mask.append(keep(row))
                except Exception as exc:  # a function filter that raises: said, not a traceback
                    raise InputError(f"filter {text!r} failed on a row: {type(exc).__name__}: {exc}") from None
        return table.filter(pa.array(mask, pa.bool_()))

    def _total_rows(self) -> int | None:
        if not self._ended():
            return None  # still growing
        return sum(self._prepared(pq.read_table(self.root / s.file)).num_rows for s in self._listed())

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "step", "step": self.step, "id_column": self.id_column,
                             "upstream": self._upstream, "filter": self.spec.step_filter})

    def content_fingerprint(self) -> str:
        """The fingerprint, and the shards read so far: what a step that only filters is written from."""
        shards = [{"file": s.file, "rows": s.rows, "crc32": s.crc32, "bytes": s.bytes} for s in self._listed()]
        return _fingerprint({"rows": self.fingerprint(), "shards": shards})

    def find_duplicate_ids(self) -> list:
        return []  # unique by construction: the previous step holds each id (and sample) once

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[pa.Table]:
        read: set[str] = set()
        while True:
            ended = self._ended()  # before listing: a shard published after this is listed below
            new = [s for s in self._listed() if s.file not in read]
            for shard in new:
                read.add(shard.file)
                table = self._prepared(pq.read_table(self.root / shard.file))
                for start in range(0, table.num_rows, batch_size):
                    yield table.slice(start, batch_size)
            if not new:
                if ended:
                    return
                time.sleep(TAIL_POLL_S)

    def _id_chunks(self) -> Iterator[pa.Array]:
        for chunk in self._chunks(ID_SCAN_BATCH):
            yield chunk.column(self.id_column or ID_COLUMN).combine_chunks()



def _features(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    return features if isinstance(features, dict) else None
