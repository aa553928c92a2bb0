"""Several samples per prompt: each input row becomes ``samples`` units of work, keyed by (id, sample).

:class:`SampledSource` wraps the job's source. Row ``p`` of the input yields units
``p * N + 0 .. p * N + N - 1``, one per sample, and the rest of batchrun (the reader, the done bitmap,
the shards' positions) works on units as it works on rows: exactly-once holds per (id, sample), and a
crash in the middle of a row's samples resumes only the missing ones. A row's samples are adjacent
in the feed, so the dispatcher's workers take them up side by side rather than one after another.

Changing ``samples`` between runs of one output is refused (it is part of the job's identity): the
unit numbering depends on it, and a refusal is the rule that keeps the output exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from batchrun.records import Row
from batchrun.sources import DoneMask, Source

__all__ = ["SampledSource"]


class SampledSource:
    """``source`` with each row repeated ``samples`` times, one unit per sample. See the module docstring."""

    def __init__(self, source: Source, samples: int) -> None:
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        self.inner = source
        self.samples = samples
        self.description = f"{source.description}, {samples} samples per row"
        self.schema: pa.Schema = source.schema

    def count(self) -> int | None:
        """Units of work: rows times samples."""
        rows = self.inner.count()
        return None if rows is None else rows * self.samples

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def find_duplicate_ids(self) -> list:
        return self.inner.find_duplicate_ids()

    def pending_batches(self, batch_size: int = 1024, done: DoneMask | None = None) -> Iterator[tuple[int, list[Row]]]:
        """The units ``done`` does not mark, as ``(units left out, units)``: a row whose every sample is
        done is left out by the inner source before it becomes a Python object, as plain rows are."""
        n = self.samples
        rows_done = None if done is None else _RowsDone(done, n)
        for skipped_rows, rows in self.inner.pending_batches(batch_size=max(1, batch_size // n), done=rows_done):
            units: list[Row] = []
            for row in rows:
                pending = range(n) if done is None else np.flatnonzero(done.pending_mask(row.position * n, n))
                units.extend(
                    Row(position=row.position * n + int(sample), id=row.id, columns=row.columns, sample=int(sample))
                    for sample in pending
                )
            yield skipped_rows * n + len(rows) * n - len(units), units

    def batches(self, batch_size: int = 1024) -> Iterator[list[Row]]:
        """Units in order: each row's samples together. ``batch_size`` counts units (at least one row's)."""
        n = self.samples
        for batch in self.inner.batches(batch_size=max(1, batch_size // n)):
            yield [
                Row(position=row.position * n + sample, id=row.id, columns=row.columns, sample=sample)
                for row in batch
                for sample in range(n)
            ]


class _RowsDone:
    """The done mask of input rows, from the done mask of units: a row is done when all its samples are."""

    def __init__(self, units: DoneMask, samples: int) -> None:
        self._units = units
        self._samples = samples

    def pending_mask(self, start: int, count: int) -> np.ndarray:
        n = self._samples
        units: np.ndarray = np.asarray(self._units.pending_mask(start * n, count * n)).reshape(count, n)
        return np.asarray(units.any(axis=1), dtype=bool)
