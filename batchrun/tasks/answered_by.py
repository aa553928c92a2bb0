"""Which endpoint answered each row, for a job with several (the ``endpoint`` output column).

A job that sends to several endpoints (``endpoint:`` as a list) records, in every result row, the label
of the endpoint whose answer it holds: with ``mixed_models: true`` it says which model wrote the row, and
otherwise it lets a bad replica or region be traced. The dispatcher fills the column (it alone knows
which endpoint answered); this layer declares it, so that it is part of the data schema from the first
row. A job with one endpoint has no such column: its outputs keep the shape they always had.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from batchrun.records import Row
    from batchrun.tasks.base import PreparedRequest, Task

__all__ = ["ENDPOINT_COLUMN", "AnsweredByTask"]

ENDPOINT_COLUMN = "endpoint"


class AnsweredByTask:
    """``inner``, whose output schema ends with the ``endpoint`` column; everything else is the inner task's."""

    def __init__(self, inner: Task) -> None:
        if ENDPOINT_COLUMN in inner.output_schema.names:
            raise ValueError(f"the {ENDPOINT_COLUMN} column clashes with an output column of task {inner.name}")
        self.inner = inner
        self.name = inner.name
        self.output_schema: pa.Schema = inner.output_schema.append(pa.field(ENDPOINT_COLUMN, pa.string()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, row: Row) -> PreparedRequest:
        return self.inner.prepare(row)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        return self.inner.parse(status, headers, body)

    def describe(self, request: PreparedRequest) -> str:
        return self.inner.describe(request)
