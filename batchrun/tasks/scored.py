"""A job's task with its scores: the scorers' columns join the output schema (see :mod:`batchrun.scoring`).

The wrapper changes no request and no parse: it only declares the columns, so that they are part of
the data schema fixed before the first row. The runner fills them in on each result record before
the record is committed (:meth:`ScoredTask.score`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batchrun.scoring import Scoring

if TYPE_CHECKING:
    import pyarrow as pa

    from batchrun.records import Row
    from batchrun.scoring import ScorerSpec
    from batchrun.tasks.base import PreparedRequest, Task

__all__ = ["ScoredTask"]


class ScoredTask:
    """``inner``, whose output schema ends with the score columns; everything else is the inner task's."""

    def __init__(self, inner: Task, specs: tuple[ScorerSpec, ...], search: tuple[str, ...] = ()) -> None:
        import pyarrow as pa

        self.inner = inner
        self.name = inner.name
        self.scoring = Scoring(specs, search)
        clash = [f.name for f in self.scoring.fields() if f.name in inner.output_schema.names]
        if clash:
            raise ValueError(f"the score column {clash[0]} clashes with an output column of task {inner.name}")
        self.output_schema: pa.Schema = pa.schema([*inner.output_schema, *self.scoring.fields()])

    def __getattr__(self, name: str) -> Any:
        # redraw / read / kind / ... of a structured or sampled inner task, as if unwrapped.
        return getattr(self.inner, name)

    def prepare(self, row: Row) -> PreparedRequest:
        return self.inner.prepare(row)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        return self.inner.parse(status, headers, body)

    def describe(self, request: PreparedRequest) -> str:
        return self.inner.describe(request)

    def score(self, record: Any) -> Any:
        """``record`` with its scores (a result), or unchanged (a failure)."""
        return self.scoring.score(record)
