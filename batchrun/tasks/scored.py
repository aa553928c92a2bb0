"""A job's task with its scores: the scorers' columns join the output schema (see :mod:`batchrun.scoring`).

The wrapper changes no request and no parse: it only declares the columns, so that they are part of
the data schema fixed before the first row. The runner's scoring stage fills them in on each result
record, off the event loop and within a time bound, before the record is committed
(:class:`~batchrun.scoring.ScoringStage`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchrun.scoring import Scoring
from batchrun.tasks.base import ColumnsLayer

if TYPE_CHECKING:
    from batchrun.scoring import ScorerSpec
    from batchrun.tasks.base import Task

__all__ = ["ScoredTask"]


class ScoredTask(ColumnsLayer):
    """``inner``, whose output schema ends with the score columns; everything else is the inner task's."""

    def __init__(self, inner: Task, specs: tuple[ScorerSpec, ...], search: tuple[str, ...] = ()) -> None:
        import pyarrow as pa

        super().__init__(inner)
        self.scoring = Scoring(specs, search)
        clash = [f.name for f in self.scoring.fields() if f.name in inner.output_schema.names]
        if clash:
            raise ValueError(f"the score column {clash[0]} clashes with an output column of task {inner.name}")
        self.output_schema = pa.schema([*inner.output_schema, *self.scoring.fields()])
