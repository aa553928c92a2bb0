"""Which endpoint answered each row, for a job with several (the ``endpoint`` output column).

A job that sends to several endpoints (``endpoint:`` as a list) records, in every result row, the label
of the endpoint whose answer it holds: with ``mixed_models: true`` it says which model wrote the row, and
otherwise it lets a bad replica or region be traced. The dispatcher alone knows which endpoint answered:
it passes the label to this layer's answer hook (:meth:`AnsweredByTask.accept`), which fills the column.
The layer also declares the column, so that it is part of the data schema from the first row.
A job with one endpoint has no such column: its outputs keep the shape they always had.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrun.tasks.base import ColumnsLayer

if TYPE_CHECKING:
    from batchrun.tasks.base import PreparedRequest, Task

__all__ = ["ENDPOINT_COLUMN", "AnsweredByTask"]

ENDPOINT_COLUMN = "endpoint"


class AnsweredByTask(ColumnsLayer):
    """``inner``, whose output schema ends with the ``endpoint`` column; everything else is the inner task's."""

    def __init__(self, inner: Task) -> None:
        if ENDPOINT_COLUMN in inner.output_schema.names:
            raise ValueError(f"the {ENDPOINT_COLUMN} column clashes with an output column of task {inner.name}")
        super().__init__(inner)
        self.output_schema = inner.output_schema.append(pa.field(ENDPOINT_COLUMN, pa.string()))

    def accept(self, request: PreparedRequest, outputs: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        """``outputs`` with the label of the endpoint that answered."""
        outputs[ENDPOINT_COLUMN] = endpoint
        return outputs
