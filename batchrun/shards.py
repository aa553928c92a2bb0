"""Shards: one job split across machines by the schedulers teams already run (docs/shards.md).

    batchrun run JOB.yaml --shard I/N        shard I (0-based) of N
    batchrun run JOB.yaml --shard auto       Slurm arrays: SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT;
                                             Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX with
                                             --shard-count N (or BATCHRUN_SHARD_COUNT)

A row belongs to shard ``hash(id) mod N`` with a stable hash (BLAKE2b of the id's text): the partition
depends neither on the input's order nor on the machine that reads it, so every id has exactly one
shard. All shards write into the job's one output folder: their Parquet files share ``data/`` and
``failed/`` under names that start with the shard's (``data/shard-00001-of-00004-part-00003-r2.parquet``),
and each keeps its own lock, manifest, done-set and state in ``state/shards/shard-00001-of-00004/``
(output/layout.py). A shard run again resumes itself, exactly-once holds per shard, and the union,
``data/*.parquet``, holds every id once. An output split in another N, or written without ``--shard``,
is refused (``OutputStore.check_split``). A managed endpoint is shared by the shards: the first
resumes it, the last one out puts it down (endpoints/shared_endpoint.py).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrun.errors import BatchrunError
from batchrun.records import Row
from batchrun.sources import DoneMask, Source

__all__ = ["JobShard", "ShardedSource", "print_union", "shard_of", "sharded_spec", "union_status"]

class ShardError(BatchrunError):
    """A --shard that cannot be used (exit 2)."""


@dataclass(frozen=True, slots=True)
class JobShard:
    """One slice of the job: shard ``index`` (0-based) of ``count`` (``--shard I/N``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"--shard {self.index}/{self.count}: expected I/N with 0 <= I < N")

    @property
    def folder(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str, *, count: int | None = None, env: Mapping[str, str] | None = None) -> JobShard:
        """``I/N``, or ``auto`` to read the scheduler's variables (``count`` for Kubernetes' index)."""
        env = os.environ if env is None else env
        if text != "auto":
            match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
            if not match:
                raise ShardError(f"--shard {text!r}: expected I/N (shard I of N, from 0) or auto")
            return cls(int(match.group(1)), int(match.group(2)))
        if "SLURM_ARRAY_TASK_ID" in env:
            return cls._from_slurm(env, count)
        if "JOB_COMPLETION_INDEX" in env:
            total = count or (_number(env, "BATCHRUN_SHARD_COUNT") if "BATCHRUN_SHARD_COUNT" in env else None)
            if total is None:
                raise ShardError("--shard auto with JOB_COMPLETION_INDEX needs the count: --shard-count N (the "
                                 "Indexed Job's completions), `shards: N` in the spec, or BATCHRUN_SHARD_COUNT")
            return cls(_number(env, "JOB_COMPLETION_INDEX"), total)
        raise ShardError("--shard auto: none of SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX is set; "
                         "give --shard I/N")


    @classmethod
    def _from_slurm(cls, env: Mapping[str, str], count: int | None) -> JobShard:
        """A whole array (``--array=0-7``, or ``1-8``) numbers its shards; a subset run again
        (``--array=3,5``) counts only itself, so it needs the job's count: ``--shard-count N``, and then
        the task id is the shard (an array numbered from 0)."""
        index = _number(env, "SLURM_ARRAY_TASK_ID")
        if count is not None:
            # Every task of an array that reaches past the count refuses, not only the tasks past it:
            # --array=1-8 for 8 shards would otherwise run shards 1-7 and never shard 0.
            top = _number(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else index
            if max(index, top) >= count:
                raise ShardError(f"--shard auto: this array's task ids reach {max(index, top)}, not below the shard "
                                 f"count {count} (--shard-count, or the spec's shards): with a count given, the task "
                                 f"id is the shard, so number the array from 0 (--array=0-{count - 1})")
            return cls(index, count)
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ShardError("--shard auto: SLURM_ARRAY_TASK_COUNT is not set; give --shard-count N")
        total = _number(env, "SLURM_ARRAY_TASK_COUNT")
        first = _number(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        last = _number(env, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in env else first + total - 1
        if last - first + 1 != total:
            raise ShardError(f"--shard auto: this array ({total} tasks from {first} to {last}) is not a whole "
                             "array of the job, so it does not say how many shards there are. Run the tasks "
                             "of a subset with --shard-count N (the job's shard count; the task id is the shard)")
        return cls(index - first, total)


def _number(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShardError(f"{name}={env[name]!r} is not a number") from None


def shard_of(row_id: Any, count: int) -> int:
    """The shard an id belongs to: a stable hash of its text, the same on every machine and in every order."""
    digest = hashlib.blake2b(str(row_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def sharded_spec(spec: Any, shard: JobShard) -> Any:
    """The spec of one shard: the job's, writing its part of the job's output folder (OutputStore.for_spec)
    and sharing its managed endpoints with the other shards (endpoints/shared_endpoint.py). Refuses an output.path
    that names a folder per run: each shard would make its own."""
    from batchrun.provenance import has_template

    if has_template(spec.output.path):
        raise ShardError(
            f"--shard {shard}: output.path {spec.output.path!r} names a new folder per run ({{date}}, {{time}} or "
            "{run_id}), so each shard would write a folder of its own. Give every shard the same folder: "
            "--output DIR (for example with the date the array was submitted)"
        )
    return replace(spec, shard=shard)


class ShardedSource:
    """``source`` limited to the rows of one shard; positions stay the input's (the done-set's keys)."""

    def __init__(self, source: Source, shard: JobShard) -> None:
        self.inner = source
        self.shard = shard
        self.description = f"{source.description}, shard {shard}"
        self.schema: pa.Schema = source.schema

    def count(self) -> int | None:
        """Not known without reading every id: progress shows no total for a shard."""
        return None

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def find_duplicate_ids(self) -> list:
        return self.inner.find_duplicate_ids()

    def _mine(self, rows: list[Row]) -> list[Row]:
        count, index = self.shard.count, self.shard.index
        return [row for row in rows if shard_of(row.id, count) == index]

    def pending_batches(self, batch_size: int = 1024, done: DoneMask | None = None) -> Iterator[tuple[int, list[Row]]]:
        """The shard's rows not done; another shard's rows are neither sent nor counted as done here."""
        for skipped, rows in self.inner.pending_batches(batch_size=batch_size, done=done):
            yield skipped, self._mine(rows)

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        for rows in self.inner.batches(batch_size=batch_size):
            mine = self._mine(rows)
            if mine:
                yield mine


def union_status(root: str | Path) -> dict[str, Any]:
    """Rows ok and failed over every shard of ``root``, and each shard's own counts."""
    from batchrun.output import OutputStore, read_lock, read_status

    shards = {}
    for store in OutputStore.parts(root):
        if store.shard is None:
            continue
        status = read_status(store)
        lock = read_lock(store)
        running = lock.holder.describe() if lock is not None and lock.running and lock.holder is not None else None
        shards[store.shard] = {"ok": status.ok, "failed": status.failed, "failed_retryable": status.failed_retryable,
                               "data_shards": status.data_shards, "running": running}
    counted = ("ok", "failed", "failed_retryable", "data_shards")
    total = {key: sum(int(s[key] or 0) for s in shards.values()) for key in counted}
    count = int(next(iter(shards)).rsplit("-of-", 1)[1]) if shards else 0
    missing = [i for i in range(count) if f"shard-{i:05d}-of-{count:05d}" not in shards]
    return {"shards": shards, "count": count, "missing": missing, **total}


def print_union(root: str | Path, *, shown: str | Path | None = None) -> int:
    """`batchrun status` on a split job's output: the union, then each shard (``shown``: the output as named)."""
    union = union_status(root)
    print(f"output: {shown or root} ({len(union['shards'])} of {union['count']} shard(s) have run)")
    if union["missing"]:
        shown = ", ".join(map(str, union["missing"][:20])) + (", ..." if len(union["missing"]) > 20 else "")
        print(f"  not run yet: shard(s) {shown} of {union['count']}: their rows are not in the output "
              f"(run each with --shard I/{union['count']})")
    print(f"  ok: {union['ok']} rows in {union['data_shards']} file(s)")
    print(f"  failed: {union['failed']} final, {union['failed_retryable']} retryable (tried again on the next run)")
    for name, status in union["shards"].items():
        running = f"; running now: {status['running']}" if status["running"] else ""
        print(f"  {name}: ok {status['ok']}, failed {status['failed']}, retryable {status['failed_retryable']}"
              f"{running}")
    return 0
