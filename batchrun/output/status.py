"""What an output folder holds, read without changing anything (``batchrun status``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchrun.errors import OutputError
from batchrun.output.layout import OutputStore
from batchrun.output.manifest import read_manifest, shard_problem

__all__ = ["OutputStatus", "read_status"]


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


def read_status(root: str | Path | OutputStore) -> OutputStatus:
    """Count what ``root`` holds without changing anything (no reconcile, no moves).

    Counts come from Parquet footers and the failed shards' ``retryable`` column; a listed shard that
    cannot be read is not counted, as resume would not count it either. A folder path counts the
    union of every store that writes into it (each shard of a split job); a store counts its own part.
    """
    if isinstance(root, OutputStore):
        counted = getattr(root, "read_status", None)  # an output in an object store counts its commit records
        return counted() if counted is not None else _read_part(root)
    from batchrun.output.stores.base import is_store_url

    if is_store_url(root):  # an object store: each writer's commit records, no part read
        parts = [read_status(store) for store in OutputStore.parts(root)]
    else:
        path = Path(root)
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path} is not an output folder (it is a file)")
        parts = [_read_part(store) for store in OutputStore.parts(path)]
    union = parts[0]
    for part in parts[1:]:
        for key in ("ok", "failed", "failed_retryable", "data_shards", "failed_shards"):
            setattr(union, key, getattr(union, key) + getattr(part, key))
        union.job = union.job or part.job
        union.last_summary = union.last_summary or part.last_summary
    return union


def _read_part(store: OutputStore) -> OutputStatus:
    # A folder that does not exist yet holds no run: all counts are zero and job is None.
    view = read_manifest(store.manifest_path)
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
        if shard_problem(store.root, shard, ()) is not None:
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
