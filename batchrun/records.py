"""The values that flow through a job: an input row, and the one record it ends in.

A :class:`Row` comes out of a source; exactly one :class:`RowResult` or :class:`RowFailure` goes
into the sink for it. ``position`` is the row's 0-based index in the source's deterministic order;
resume uses it to know what is done without keeping every id in memory.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SAMPLE_COLUMN", "FailureType", "Row", "RowFailure", "RowResult", "http_failure_type", "storable"]

#: The output column of a unit's sample index, when a job draws several samples per row.
SAMPLE_COLUMN = "sample"


class FailureType(enum.StrEnum):
    """The ``error_type`` of a failure row: a short stable name that users filter on and export writes.

    Besides these, a row the endpoint refused with an HTTP status has ``http_<status>``
    (:func:`http_failure_type`). A ``StrEnum``: its members are the very strings stored in Parquet.
    """

    # Sent, and no usable answer came back (retryable).
    TIMEOUT = "timeout"  # no complete answer within request_timeout
    CONNECTION = "connection"  # no connection, or it broke mid-answer
    BAD_BODY = "bad_body"  # a 200 whose body is an error object, truncated or not JSON
    NOT_AN_IMAGE = "not_an_image"  # text-to-image: an answer Pillow cannot decode
    WRONG_IMAGE_FORMAT = "wrong_image_format"  # text-to-image: an image in another format than asked
    # Sent, and the answer is final for the row (not retried).
    ENDPOINT_PAUSED = "endpoint_paused"  # the proxy said the endpoint is paused
    ANSWER_TOO_LARGE = "answer_too_large"  # an answer past max_answer_bytes
    INVALID_OUTPUT = "invalid_output"  # not valid against the output schema, after retries.invalid_output
    OUTPUT_SCHEMA = "output_schema"  # an answer whose values the output's Parquet columns cannot hold
    # Never sent: the row itself cannot become a request.
    TEMPLATE = "template"  # the prompt template cannot be rendered for this row
    EMPTY_PROMPT = "empty_prompt"  # the prompt (or its column) is empty or null
    BAD_PROMPT = "bad_prompt"  # the prompt column holds something that is not text
    BAD_SEED = "bad_seed"  # text-to-image: the row's seed is not a usable number
    BAD_IMAGE = "bad_image"  # vision: the input image cannot be read or decoded
    BAD_CONVERSATION = "bad_conversation"  # a conversation that cannot be sent (role, content, last turn)
    BAD_SCHEMA = "bad_schema"  # a per-row output schema that is not a usable JSON Schema
    BAD_REQUEST = "bad_request"  # an OpenAI batch line with no body object
    UNSUPPORTED_REQUEST = "unsupported_request"  # an OpenAI batch line batchrun cannot serve
    BATCH_EXPIRED = "batch_expired"  # mode: batch: the provider's batch ended before this request ran (retried)
    BAD_TEXTS = "bad_texts"  # rerank: the row's candidate texts are not a non-empty list of strings
    # Answered, and the answer cannot be kept.
    EMBEDDING_DIMENSION = "embedding_dimension"  # an embedding of another length than the job's first


def http_failure_type(status: int) -> str:
    """The ``error_type`` of a row the endpoint answered with HTTP ``status`` (``http_422``)."""
    return f"http_{status}"


# The per-row records (and tasks.base.PreparedRequest) are slots dataclasses, not frozen ones: a frozen
# __init__ sets each field through object.__setattr__, about a microsecond a record at several records a
# row (15% of batchrun's own per-row work in benchmarks/client_ceiling.py). Nothing changes a record once
# made: dataclasses.replace makes a new one.
@dataclass(slots=True)
class Row:
    """One input row. ``id`` is the id column's value, or ``position`` when the job names none.

    With several samples per prompt (``samples: N``), a row is one (input row, ``sample``) unit and
    ``position`` numbers units: ``input position * N + sample`` (see :mod:`batchrun.samples`).
    """

    position: int
    id: Any
    columns: dict[str, Any]
    sample: int = 0


@dataclass(slots=True)
class RowResult:
    """A row that succeeded. ``output`` holds the task's columns (``generated_text``, ...)."""

    position: int
    id: Any
    kept: dict[str, Any]
    output: dict[str, Any]
    latency_s: float
    attempts: int


@dataclass(slots=True)
class RowFailure:
    """A row that failed. ``retryable`` failures are tried again on the next run; others are final.

    ``kept`` holds the kept input columns, as for a result, so that a failure can be read without
    joining it back to the input.
    """

    position: int
    id: Any
    error_type: str  # a FailureType, or http_failure_type(status)
    error: str
    status: int | None
    attempts: int
    retryable: bool
    kept: dict[str, Any] = field(default_factory=dict)


#: UTF-16 surrogates: a Python string can hold one alone (JSON's ``"\ud83d"``), UTF-8 cannot.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: What a lone surrogate becomes in the output: the Unicode replacement character.
REPLACEMENT = "\ufffd"


def storable(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (nested in dicts and lists too) replaced by U+FFFD.

    Parquet stores text as UTF-8, which has no encoding for a lone surrogate: one such character
    would make a whole shard fail to build. The same object comes back when nothing needed replacing.
    """
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return _SURROGATE.sub(REPLACEMENT, value)
        return value
    if isinstance(value, dict):
        items = [(storable(k), storable(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    if isinstance(value, (list, tuple)):
        values = [storable(v) for v in value]
        if all(v is v0 for v, v0 in zip(values, value, strict=True)):
            return value
        return type(value)(values) if isinstance(value, list) else tuple(values)
    return value

