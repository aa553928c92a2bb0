"""Requests from an OpenAI batch file (``input.openai_batch``), sent as they are.

Each row is one request line: ``custom_id`` (the row id), ``method``, ``url`` and ``body`` (its JSON
text, see :class:`~batchrun.sources.OpenAIBatchSource`). The body goes to the OpenAI-compatible
route its ``url`` names, which TGI serves (``/v1/chat/completions``, ``/v1/completions``); the
spec's ``parameters`` fill in only what the body lacks. A line batchrun cannot serve (another
method or url, a body that is not an object, a streamed request) fails its row before any request.

The answer is kept whole, as the ``response_body`` column: ``batchrun export --format
openai-batch`` writes it back as the OpenAI batch output's ``response.body``. The usual text
columns are read from it too where the answer has them (``generated_text`` is null for an answer
whose message holds tool calls only), so a batch job's output reads like any chat job's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrun.errors import RequestFailed
from batchrun.records import FailureType
from batchrun.task_kinds import task_kind
from batchrun.tasks.base import PreparedRequest, bad_body, error_object, header, header_int, load_json, optional_int
from batchrun.tasks.text import OUTPUT_SCHEMA, describe_messages

if TYPE_CHECKING:
    from batchrun.records import Row
    from batchrun.spec import JobSpec

__all__ = ["BATCH_OUTPUT_SCHEMA", "BATCH_ROUTES", "OpenAIBatchTask"]

BATCH_ROUTES = ("/v1/chat/completions", "/v1/completions")
"""The ``url`` values of a request line that batchrun sends (the OpenAI-compatible routes TGI serves)."""

BATCH_OUTPUT_SCHEMA = OUTPUT_SCHEMA.append(pa.field("request_id", pa.string(), nullable=True)).append(
    pa.field("response_body", pa.string())
)
"""A batch job's columns: the text ones, the server's ``x-request-id`` when it sent one, and the
endpoint's answer as it came (JSON text)."""


def unsupported(message: str) -> RequestFailed:
    """The non-retryable failure of a request line that batchrun does not send."""
    return RequestFailed(FailureType.UNSUPPORTED_REQUEST, message, retryable=False)


class OpenAIBatchTask:
    """One OpenAI batch request line per row, its body sent to its own route and its answer kept whole."""

    kind = task_kind("openai-batch")
    name = kind.name
    output_schema = BATCH_OUTPUT_SCHEMA

    def __init__(self, *, parameters: Mapping[str, Any]) -> None:
        # TGI ignores the model name; "tgi" is what its docs send. The body's own "model" wins, and so
        # does every other key the body sets: the spec's parameters are defaults.
        self.parameters = {"model": "tgi", **parameters}

    @classmethod
    def from_spec(cls, spec: JobSpec) -> OpenAIBatchTask:
        """The task a validated spec describes."""
        return cls(parameters=spec.parameters)

    def prepare(self, row: Row) -> PreparedRequest:
        """The line's body, with the spec's parameters under it, for the route its ``url`` names."""
        columns = row.columns
        method, url = columns.get("method"), columns.get("url")
        if method != "POST":
            raise unsupported(f"method {method!r}: batchrun sends POST requests only")
        if url not in BATCH_ROUTES:
            raise unsupported(f"url {url!r}: batchrun sends {' and '.join(BATCH_ROUTES)}")
        text = columns.get("body")
        body = json.loads(text) if isinstance(text, str) else None
        if not isinstance(body, dict):
            raise RequestFailed(FailureType.BAD_REQUEST, "the request has no body object", retryable=False)
        if body.get("stream"):
            raise unsupported("stream: true: batchrun reads whole answers; remove stream from the body")
        return PreparedRequest(url, {**self.parameters, **body})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """The raw answer, and the text columns of a chat or a text completion where it has them."""
        doc = load_json(body)
        error = error_object(doc)
        if error is not None:
            raise bad_body(f"HTTP {status} carrying an error: {error}")
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad_body("the answer has no choices")
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        usage = doc.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        prompt_tokens = optional_int(usage.get("prompt_tokens"))
        finish = choice.get("finish_reason")
        return {
            "generated_text": text if isinstance(text, str) else None,
            "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": prompt_tokens if prompt_tokens is not None else header_int(headers, "x-prompt-tokens"),
            "completion_tokens": optional_int(usage.get("completion_tokens")),
            "request_id": header(headers, "x-request-id"),
            "response_body": body.decode("utf-8", "replace"),
        }

    def describe(self, request: PreparedRequest) -> str:
        """The route and what the body asks: its messages, or its prompt."""
        payload = request.payload
        if "messages" in payload:
            return f"POST {request.path}: {describe_messages(payload)}"
        return f"POST {request.path}: {payload.get('prompt', '')}"
