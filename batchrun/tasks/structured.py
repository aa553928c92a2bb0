"""Structured output around a text task: the schema goes out with every request, and answers are read.

:class:`StructuredTask` wraps the job's text task (text generation, chat, vision chat). Its
requests carry the row's JSON Schema the way the route takes it (docs/structured-output.md):

    text-generation      "parameters": {"grammar": {"type": "json", "value": SCHEMA}}
    chat / vision chat   "response_format": {"type": "json_object", "value": SCHEMA}
    serverless targets   "response_format": {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
                         (OpenAI's form, which the Inference Providers router takes)

:meth:`StructuredTask.accept` (the answer hook, :class:`~batchrun.tasks.base.AnswerHook`) turns an
answer's ``generated_text`` into the ``parsed`` column, or asks for a
:class:`~batchrun.tasks.base.Redraw`: the same request with a fresh seed (derived from the job's seed,
the row id and the try), up to ``retries.invalid_output`` times. Whether to redraw is decided by
:func:`batchrun.retry.next_step` alone (reliability.md §2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrun.errors import RequestFailed
from batchrun.images import derive_seed
from batchrun.records import FailureType
from batchrun.structured import InvalidAnswer, OutputSchema
from batchrun.task_kinds import task_kind
from batchrun.tasks.base import PreparedRequest, Redraw, Task, with_seed

if TYPE_CHECKING:
    from batchrun.records import Row

__all__ = ["StructuredTask"]


class StructuredTask:
    """``inner`` with a JSON Schema on every request and a ``parsed`` output column."""

    def __init__(self, inner: Task, schema: OutputSchema, *, job_seed: int | None = None,
                 openai_form: bool = False) -> None:
        self.inner = inner
        self.openai_form = openai_form
        self.name = inner.name
        self.kind = task_kind(inner.name)
        if self.kind.schema_parameter is None:
            raise ValueError(f"task {inner.name} has no structured output")
        self.schema = schema
        self.job_seed = job_seed
        self.output_schema: pa.Schema = inner.output_schema.append(schema.column)

    def prepare(self, row: Row) -> PreparedRequest:
        """The inner task's request for ``row``, with the row's schema where the route takes it."""
        request = self.inner.prepare(row)
        try:
            schema = self.schema.schema_of(row.columns)
        except InvalidAnswer as problem:  # a row's own schema column holds no usable schema
            raise RequestFailed(FailureType.BAD_SCHEMA, str(problem), retryable=False) from None
        payload = dict(request.payload)
        if self.openai_form:
            payload["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "output", "schema": schema, "strict": True}}
        elif self.kind.schema_parameter == "grammar":
            payload["parameters"] = {**payload.get("parameters", {}), "grammar": {"type": "json", "value": schema}}
        else:
            payload["response_format"] = {"type": "json_object", "value": schema}
        return PreparedRequest(request.path, payload, request.headers, request.outputs, answer_schema=schema)

    def redraw(self, request: PreparedRequest, row: Row, attempt: int) -> PreparedRequest:
        """``request`` again with a fresh seed for the ``attempt``-th try after an invalid answer."""
        assert self.kind.seed_path is not None, "every task with structured output takes a seed"
        seed = derive_seed(row.id, self.job_seed or 0, "invalid", row.sample, attempt)
        return with_seed(request, self.kind.seed_path, seed)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """The inner task's columns; :meth:`read` adds ``parsed``."""
        return self.inner.parse(status, headers, body)

    def read(self, request: PreparedRequest, outcome: dict[str, Any]) -> dict[str, Any]:
        """``outcome`` with its ``parsed`` value; InvalidAnswer when the text is not a valid document."""
        assert request.answer_schema is not None, "a request prepared by this task"
        text = outcome.get("generated_text") or ""
        outcome[self.schema.column.name] = self.schema.parse(text, dict(request.answer_schema))
        return outcome

    def accept(self, request: PreparedRequest, outputs: dict[str, Any], *, endpoint: str) -> dict[str, Any] | Redraw:
        """``outputs`` with their ``parsed`` value, or a redraw when the text is not a valid document."""
        try:
            return self.read(request, outputs)
        except InvalidAnswer as invalid:
            return Redraw(str(invalid), self.redraw)

    def describe(self, request: PreparedRequest) -> str:
        """What the inner task describes: the schema is not part of the prompt people read."""
        return self.inner.describe(request)
