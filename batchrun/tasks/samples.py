"""Several samples per prompt, on the task side: each sample its own seed, stored with its row.

:class:`SampledTask` wraps the job's task. Sample ``k`` of a row is sent with the seed derived from
the job's ``parameters.seed`` (0 when unset), the row id and ``k`` (:func:`~batchrun.images.derive_seed`),
so any sample can be drawn again; the output gains ``sample`` and ``seed`` columns (text-to-image has
its ``seed`` column already). Failure rows carry ``sample`` too: the runner lists it with the kept
columns of failed shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrun.images import derive_seed
from batchrun.records import SAMPLE_COLUMN
from batchrun.spec import PER_ROW, per_row_job_seed
from batchrun.task_kinds import task_kind
from batchrun.tasks.base import PreparedRequest, Task, with_seed

if TYPE_CHECKING:
    from batchrun.records import Row

__all__ = ["PER_ROW", "SAMPLE_COLUMN", "PerRowSeedTask", "SampledTask", "per_row_job_seed"]


class SampledTask:
    """``inner`` with the seed of each row's sample set, and ``sample`` / ``seed`` output columns."""

    def __init__(self, inner: Task, *, job_seed: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.kind = task_kind(inner.name)
        if self.kind.seed_path is None:
            raise ValueError(f"task {inner.name} cannot draw several samples (batchrun sets no seed for it)")
        self.job_seed = job_seed
        schema = inner.output_schema.append(pa.field(SAMPLE_COLUMN, pa.int32()))
        if "seed" not in schema.names:
            schema = schema.append(pa.field("seed", pa.int64()))
        self.output_schema: pa.Schema = schema

    def seed_for(self, row: Row) -> int:
        """The seed sample ``row.sample`` of ``row`` is drawn with; the same in every run."""
        return derive_seed(row.id, self.job_seed, "sample", row.sample)

    def prepare(self, row: Row) -> PreparedRequest:
        """The inner task's request for ``row``, drawn with the sample's own seed."""
        request = self.inner.prepare(row)
        seed = self.seed_for(row)
        assert self.kind.seed_path is not None
        request = with_seed(request, self.kind.seed_path, seed)
        outputs = {**request.outputs, SAMPLE_COLUMN: row.sample, "seed": seed}
        return PreparedRequest(request.path, request.payload, request.headers, outputs, request.answer_schema)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        return self.inner.parse(status, headers, body)

    def describe(self, request: PreparedRequest) -> str:
        return self.inner.describe(request)


#: ``parameters.seed`` of a job whose every row is sent with its own stable seed.
class PerRowSeedTask(SampledTask):
    """``parameters.seed: per-row`` with one sample per row: each row is sent with its own seed.

    The seed is :func:`~batchrun.images.derive_seed` of (job seed, row id), the same in every run and
    process, and is stored in the row's ``seed`` column, so any answer can be drawn again. With
    ``samples: N`` the job uses :class:`SampledTask` instead, whose seeds are already per row and per
    sample: one mechanism, two shapes of output.
    """

    def __init__(self, inner: Task, *, job_seed: int) -> None:
        super().__init__(inner, job_seed=job_seed)
        schema = inner.output_schema
        if "seed" not in schema.names:
            schema = schema.append(pa.field("seed", pa.int64()))
        self.output_schema = schema

    def seed_for(self, row: Row) -> int:
        """The seed ``row`` is sent with; the same in every run."""
        return derive_seed(row.id, self.job_seed)

    def prepare(self, row: Row) -> PreparedRequest:
        """The inner task's request for ``row``, with the row's own seed."""
        request = self.inner.prepare(row)
        seed = self.seed_for(row)
        assert self.kind.seed_path is not None
        request = with_seed(request, self.kind.seed_path, seed)
        return PreparedRequest(request.path, request.payload, request.headers, {**request.outputs, "seed": seed},
                               request.answer_schema)
