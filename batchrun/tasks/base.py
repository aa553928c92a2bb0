"""What every task shares: the request a row becomes, the Task protocol, prompts, and reading answers.

Light on purpose (no pyarrow, no Pillow at import): :mod:`batchrun.tasks` imports it eagerly, and
the spec parser imports :mod:`batchrun.tasks`.
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from batchrun.errors import RequestFailed
from batchrun.facts import MAX_MESSAGE_CHARS
from batchrun.records import FailureType

if TYPE_CHECKING:
    import pyarrow as pa

    from batchrun.records import Row

T = TypeVar("T")

__all__ = [
    "AnswerHook",
    "PreparedRequest",
    "Redraw",
    "Task",
    "answer_hooks",
    "dump_json",
    "join_url",
    "placeholder_column_problem",
    "prompt_column_problem",
    "render_prompt",
]

# Values a template placeholder cannot stand for: their Python repr is not text anyone meant to send.
_NOT_TEXT = (list, tuple, dict, set, frozenset, bytes, bytearray, memoryview)


@dataclass(slots=True)
class PreparedRequest:
    """A request ready to send: ``path`` relative to the endpoint base, and the JSON ``payload``.

    ``headers`` are sent with this request only (text-to-image's ``Accept``). ``outputs`` are output
    columns already known before sending (the seed a row was drawn with, whether its image was
    downsized); the dispatcher adds them to what :meth:`Task.parse` reads from the answer, so a
    task's parse never needs to know which row it is reading. ``answer_schema`` is the JSON Schema
    the answer must follow (structured output), or None.
    """

    path: str
    payload: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)
    answer_schema: Mapping[str, Any] | None = None


class Task(Protocol):
    """One kind of inference: builds requests from rows and reads answers into output columns."""

    name: str
    output_schema: pa.Schema

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``; raises a non-retryable RequestFailed when there can be none."""
        ...

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 2xx answer; raises a retryable RequestFailed for a bad body."""
        ...

    def describe(self, request: PreparedRequest) -> str:
        """What ``request`` asks, for people (previews, logs): images summarised, never base64."""
        ...


# --------------------------------------------------------------------------------------------------
# Answers: the hook through which a layer keeps an answer or asks for another


@dataclass(frozen=True, slots=True)
class Redraw:
    """An answer a task does not keep (not valid against the output schema): the row asks again.

    ``again(request, row, n)`` is the request for the ``n``-th redraw (the same, with a fresh seed).
    """

    reason: str
    again: Callable[[PreparedRequest, Row, int], PreparedRequest]


class AnswerHook(Protocol):
    """A task layer that looks at every answer before the row keeps it (structured output, answered-by)."""

    def accept(self, request: PreparedRequest, outputs: dict[str, Any], *, endpoint: str) -> dict[str, Any] | Redraw:
        """``outputs`` as the row keeps them (``endpoint`` answered), or a :class:`Redraw`."""
        ...


def answer_hooks(task: Task) -> tuple[AnswerHook, ...]:
    """The layers of ``task``'s stack with an ``accept`` of their own, innermost first.

    The dispatcher hands each answer through them in turn, and so knows no task layer by name. A
    wrapper that only passes attributes on (``ColumnsLayer``) is not a hook unless its class says so.
    """
    hooks: list[AnswerHook] = []
    layer: object = task
    while layer is not None:
        if callable(getattr(type(layer), "accept", None)):
            hooks.append(layer)  # type: ignore[arg-type]  # its class defines accept
        layer = getattr(layer, "inner", None)
    return tuple(reversed(hooks))


# --------------------------------------------------------------------------------------------------
# Prompts


def _type_name(value: Any) -> str:
    return "binary" if isinstance(value, (bytes, bytearray, memoryview)) else type(value).__name__


class _StrictColumns(Mapping[str, Any]):
    """The row's columns as ``format_map`` sees them: a missing or null column is a template error,
    and so is a value that is not a scalar (a list, a mapping, bytes)."""

    def __init__(self, columns: Mapping[str, Any]) -> None:
        self._columns = columns

    def __getitem__(self, key: str) -> Any:
        if key not in self._columns:
            raise RequestFailed(
                FailureType.TEMPLATE, f"the prompt template uses column {key!r}, which the row does not have",
                retryable=False,
            )
        value = self._columns[key]
        if value is None:
            raise RequestFailed(FailureType.TEMPLATE, f"column {key!r} is null in this row", retryable=False)
        if isinstance(value, _NOT_TEXT):
            raise RequestFailed(
                FailureType.TEMPLATE,
                f"column {key!r} holds a {_type_name(value)} value in this row; a template placeholder takes text "
                "or a number",
                retryable=False,
            )
        return value

    def __iter__(self) -> Iterator[str]:  # pragma: no cover - format_map only looks keys up
        return iter(self._columns)

    def __len__(self) -> int:  # pragma: no cover
        return len(self._columns)


@functools.lru_cache(maxsize=64)  # a job has one or two templates; a long-lived process may see more
def _plain_fields(template: str) -> tuple[tuple[str, str | None], ...] | None:
    """``template`` as (literal text, column name or None) pairs when every placeholder is a bare column
    name (no format spec, conversion, attribute or index): the common case, rendered without
    ``format_map``. None for any other template (or a malformed one). Worked out once per template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    plain = all(name is None or (name and not name.isdigit() and not any(c in name for c in ".[")
                                  and not spec and conversion is None)
                for _, name, spec, conversion in parsed)
    return tuple((literal, name) for literal, name, _, _ in parsed) if plain else None


def _render_plain(parts: tuple[tuple[str, str | None], ...], columns: Mapping[str, Any]) -> str | None:
    """The prompt of a plain template, as ``format_map`` writes it; None when a placeholder's column is
    missing, null or not a scalar (``format_map`` with :class:`_StrictColumns` then says which)."""
    out = []
    for literal, name in parts:
        out.append(literal)
        if name is not None:
            value = columns.get(name)
            if value is None or isinstance(value, _NOT_TEXT):
                return None
            out.append(value if type(value) is str else format(value, ""))
    return "".join(out)


def render_prompt(*, template: str | None, column: str | None, columns: Mapping[str, Any]) -> str:
    """The prompt for one row: ``template`` rendered with the row's columns, or one column's value.

    Templates use ``str.format_map`` placeholders (``"Summarise: {text}"``; ``"{{"`` is a literal
    brace); a placeholder takes text or a number. A placeholder naming a missing or null column, or
    one holding a list, a mapping or bytes, raises ``RequestFailed(error_type="template")``; so does a
    malformed template. With ``column``, a missing column is a ``template`` failure, a null value an
    ``empty_prompt`` failure, and a value that is not a string a ``bad_prompt`` failure (it is never
    sent as its Python repr). Exactly one of ``template`` and ``column`` is given. All are
    non-retryable.
    """
    if (template is None) == (column is None):
        raise ValueError("give exactly one of template and column")
    if template is not None:
        parts = _plain_fields(template)
        if parts is not None:
            try:
                rendered = _render_plain(parts, columns)
            except Exception:  # a value whose __format__ fails: format_map below says so as a row failure
                rendered = None
            if rendered is not None:
                return rendered
        try:  # any other template, and every row the quick way refuses: its failure is said here
            return template.format_map(_StrictColumns(columns))
        except RequestFailed:
            raise
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            # Positional "{}", "{0}", an unmatched brace, a bad format spec, "{a.missing}" ...
            raise RequestFailed(
                FailureType.TEMPLATE,
                f"the prompt template cannot be rendered for this row: {type(exc).__name__}: {exc}",
                retryable=False,
            ) from None
    assert column is not None
    if column not in columns:
        raise RequestFailed(FailureType.TEMPLATE, f"the row has no column {column!r}", retryable=False)
    value = columns[column]
    if value is None:
        raise RequestFailed(FailureType.EMPTY_PROMPT, f"column {column!r} is null in this row", retryable=False)
    if not isinstance(value, str):
        raise RequestFailed(
            FailureType.BAD_PROMPT,
            f"column {column!r} holds a {_type_name(value)} value in this row, not text; "
            "prompt.column must name a string column",
            retryable=False,
        )
    return value


def prompt_column_problem(field: pa.Field) -> str | None:
    """Why ``field`` cannot be ``prompt.column``, or ``None`` when it can (a string column).

    Numbers are refused too: a prompt that is a number is almost certainly the wrong column.
    Meant for preflight, so that the mistake costs nothing: each row would fail with ``bad_prompt``.
    """
    import pyarrow as pa  # callers hold a schema, so pyarrow is loaded already

    kind = field.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(kind):
        return None
    return (
        f"column {field.name!r} has type {kind}, not text; prompt.column must name a string column "
        "(use prompt.template to build the prompt from other columns)"
    )


def placeholder_column_problem(field: pa.Field) -> str | None:
    """Why ``field`` cannot fill a ``{placeholder}`` of ``prompt.template``, or ``None`` when it can.

    Text, numbers, booleans, dates and times format as text; lists, structs, maps and binary
    values do not (each row would fail with a ``template`` failure naming the column).
    """
    import pyarrow as pa

    kind = field.type
    if pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (
        pa.types.is_fixed_size_binary(kind)
    ):
        return (
            f"column {field.name!r} has type {kind}; a template placeholder takes text or a number, "
            "not a list, a struct or binary data"
        )
    return None


def _is_string_view(kind: pa.DataType) -> bool:
    import pyarrow as pa

    check = getattr(pa.types, "is_string_view", None)
    return bool(check(kind)) if check is not None else False


class ColumnsLayer:
    """A wrapper that only declares output columns: requests and parses are ``inner``'s, and so is any
    other attribute (a structured or sampled inner task's ``redraw``, ``read``, ``kind``...).

    The subclass sets ``output_schema`` (inner's plus its columns); who fills the columns in says so.
    """

    output_schema: pa.Schema

    def __init__(self, inner: Task) -> None:
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy being built): no recursion through it
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prepare(self, row: Row) -> PreparedRequest:
        return self.inner.prepare(row)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        return self.inner.parse(status, headers, body)

    def describe(self, request: PreparedRequest) -> str:
        return self.inner.describe(request)


def find_layer(task: Any, kind: type[T]) -> T | None:
    """The layer of type ``kind`` in ``task``'s stack of wrappers (each holds the next as ``inner``).

    The wrappers (samples, structured output, scores) stack in an order set by ``make_task``; whoever
    needs one of them finds it here rather than assuming it is outermost.
    """
    while task is not None:
        if isinstance(task, kind):
            return task
        task = getattr(task, "inner", None)
    return None


def with_seed(request: PreparedRequest, seed_path: tuple[str, ...], seed: int) -> PreparedRequest:
    """``request`` with ``seed`` at ``seed_path`` of its payload (copied along the path, never mutated)."""
    payload = dict(request.payload)
    node = payload
    for key in seed_path[:-1]:
        node[key] = dict(node.get(key) or {})
        node = node[key]
    node[seed_path[-1]] = seed
    return PreparedRequest(request.path, payload, request.headers, request.outputs, request.answer_schema)


# --------------------------------------------------------------------------------------------------
# URLs and answers


def join_url(base: str, path: str) -> str:
    """``base`` + ``path`` with exactly one slash between them.

    ``base`` may carry a path of its own (a proxy prefix) and may already end with ``path``
    (a user who pasted the full chat URL): then it is used as it is.
    """
    trimmed = base.rstrip("/")
    if path in ("", "/"):
        return trimmed + "/"
    suffix = "/" + path.strip("/")
    if trimmed.endswith(suffix):
        return trimmed
    return trimmed + suffix


def bad_body(message: str) -> RequestFailed:
    """The retryable failure for a 2xx answer that cannot be read."""
    return RequestFailed(FailureType.BAD_BODY, message[:MAX_MESSAGE_CHARS], retryable=True)


def load_json(body: bytes) -> Any:
    """``body`` as JSON; a retryable ``bad_body`` failure when it is not (a truncated answer).

    orjson reads every answer (once per row, it costs a fifth of json.loads); what it refuses and
    json accepts (NaN, Infinity, lone surrogates) goes to json. One difference remains: an integer
    beyond 64 bits comes back as a float, where json keeps it whole. No column batchrun reads can hold
    one (token counts are int64 columns; such a count was an ``output_schema`` failure and is now null).
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        preview = body[:200].decode("utf-8", "replace")
        raise bad_body(f"the answer is not valid JSON (truncated?): {preview!r}") from None


def dump_json(payload: Any) -> bytes:
    """A request body: ``payload`` as JSON bytes, once per row.

    orjson writes it (compact, a fifth of json.dumps' cost); a payload orjson cannot write (integers
    beyond 64 bits, a key that is not a string, number or boolean) is written by json as before.
    """
    try:
        return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(payload).encode()


def error_object(doc: Any) -> str | None:
    """The message of a TGI error object ``{"error": ..., "error_type": ...}``, if ``doc`` is one."""
    if isinstance(doc, dict) and "error" in doc:
        kind = doc.get("error_type")
        message = str(doc["error"])
        return f"{kind}: {message}" if kind else message
    return None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Header ``name`` (lower case). aiohttp's headers are case-insensitive; a plain dict may not be."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


#: A count a server reports (tokens) is stored as int64: anything outside 0..this is not a count.
_MAX_COUNT = 2**63 - 1


def header_int(headers: Mapping[str, str], name: str) -> int | None:
    """Header ``name`` as a count, or ``None`` (unknown) when absent, not an integer, or negative."""
    value = header(headers, name)
    try:
        return optional_int(int(value)) if value is not None else None
    except ValueError:
        return None


def optional_int(value: Any) -> int | None:
    """``value`` when it is a count: a JSON integer (not a boolean) from 0 to int64's maximum; else ``None``.

    A server that reports a negative or fractional token count said nothing usable: the count is
    unknown (null), never summed, and never a reason to lose the answer.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT:
        return value
    return None


def require_prompt(template: str | None, column: str | None, row: Row) -> str:
    """The row's rendered prompt; an ``empty_prompt`` failure when it is blank."""
    prompt = render_prompt(template=template, column=column, columns=row.columns)
    if not prompt.strip():
        raise RequestFailed(FailureType.EMPTY_PROMPT, "the prompt is empty for this row", retryable=False)
    return prompt
