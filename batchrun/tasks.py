"""Tasks: how one row becomes a request, and how a 200 answer becomes output columns.

A task knows the wire format of one route (protocols.md §1, §2) and nothing about sending,
retrying or writing. Rows that cannot make a request (empty prompt, a template that does not render,
an input image that does not decode) fail in :meth:`Task.prepare` with a non-retryable
:class:`RequestFailed`, before anything is sent.

    text-generation      TextGenerationTask   POST /                     text out
    chat-completion      ChatCompletionTask   POST /v1/chat/completions  text out
    image-text-to-text   VisionChatTask       POST /v1/chat/completions  image + text in, text out
    text-to-image        TextToImageTask      POST / (Accept: image/*)   image bytes out, stored unchanged
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from batchrun.errors import RequestFailed
from batchrun.images import (
    ACCEPT,
    check_generated_image,
    decode_json_image,
    derive_seed,
    image_output_schema,
    image_value,
    load_input_image,
    to_data_url,
)
from batchrun.records import Row

if TYPE_CHECKING:
    from batchrun.spec import ImageSpec

__all__ = [
    "OUTPUT_SCHEMA",
    "VISION_OUTPUT_SCHEMA",
    "ChatCompletionTask",
    "PreparedRequest",
    "Task",
    "TextGenerationTask",
    "TextToImageTask",
    "VisionChatTask",
    "join_url",
    "make_task",
    "render_prompt",
]

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("generated_text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64(), nullable=True),
        pa.field("completion_tokens", pa.int64(), nullable=True),
    ]
)
"""The output columns every text task produces."""

VISION_OUTPUT_SCHEMA = OUTPUT_SCHEMA.append(pa.field("image_downsized", pa.bool_(), nullable=True))
"""A vision-language job's columns: the text ones, and whether the input image was shrunk to send it
(null for an http(s) URL, which the server fetches and batchrun never sees)."""

TASKS = ("text-generation", "chat-completion", "text-to-image", "image-text-to-text")
CHAT_PATH = "/v1/chat/completions"

# Server text stored in a failure row is cut to this many characters: enough to read the reason,
# not enough to bloat a Parquet file with an HTML error page.
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready to send: ``path`` relative to the endpoint base, and the JSON ``payload``.

    ``headers`` are sent with this request only (text-to-image's ``Accept``). ``outputs`` are output
    columns already known before sending (the seed a row was drawn with, whether its image was
    downsized); the dispatcher adds them to what :meth:`Task.parse` reads from the answer, so a
    task's parse never needs to know which row it is reading.
    """

    path: str
    payload: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)


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


class _StrictColumns(Mapping[str, Any]):
    """The row's columns as ``format_map`` sees them: a missing or null column is a template error."""

    def __init__(self, columns: Mapping[str, Any]) -> None:
        self._columns = columns

    def __getitem__(self, key: str) -> Any:
        if key not in self._columns:
            raise RequestFailed(
                "template", f"the prompt template uses column {key!r}, which the row does not have", retryable=False
            )
        value = self._columns[key]
        if value is None:
            raise RequestFailed("template", f"column {key!r} is null in this row", retryable=False)
        return value

    def __iter__(self):  # pragma: no cover - format_map only looks keys up
        return iter(self._columns)

    def __len__(self) -> int:  # pragma: no cover
        return len(self._columns)


def render_prompt(*, template: str | None, column: str | None, columns: Mapping[str, Any]) -> str:
    """The prompt for one row: ``template`` rendered with the row's columns, or one column's value.

    Templates use ``str.format_map`` placeholders (``"Summarise: {text}"``; ``"{{"`` is a literal
    brace). A placeholder naming a missing or null column raises ``RequestFailed(error_type="template")``;
    so does a malformed template. With ``column``, a missing column is a ``template`` failure and a
    null value an ``empty_prompt`` failure. Exactly one of ``template`` and ``column`` is given.
    """
    if (template is None) == (column is None):
        raise ValueError("give exactly one of template and column")
    if template is not None:
        try:
            return template.format_map(_StrictColumns(columns))
        except RequestFailed:
            raise
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            # Positional "{}", "{0}", an unmatched brace, a bad format spec, "{a.missing}" ...
            raise RequestFailed(
                "template", f"the prompt template cannot be rendered for this row: {type(exc).__name__}: {exc}",
                retryable=False,
            ) from None
    assert column is not None
    if column not in columns:
        raise RequestFailed("template", f"the row has no column {column!r}", retryable=False)
    value = columns[column]
    if value is None:
        raise RequestFailed("empty_prompt", f"column {column!r} is null in this row", retryable=False)
    return value if isinstance(value, str) else str(value)


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


def _bad_body(message: str) -> RequestFailed:
    return RequestFailed("bad_body", message[:_MAX_MESSAGE_CHARS], retryable=True)


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        preview = body[:200].decode("utf-8", "replace")
        raise _bad_body(f"the answer is not valid JSON (truncated?): {preview!r}") from None


def _error_object(doc: Any) -> str | None:
    """The message of a TGI error object ``{"error": ..., "error_type": ...}``, if ``doc`` is one."""
    if isinstance(doc, dict) and "error" in doc:
        kind = doc.get("error_type")
        message = str(doc["error"])
        return f"{kind}: {message}" if kind else message
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header ``name`` (lower case). aiohttp's headers are case-insensitive; a plain dict may not be."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def _header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = _header(headers, name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_parameters(parameters: Mapping[str, Any], reserved: tuple[str, ...]) -> dict[str, Any]:
    if parameters.get("stream"):
        raise ValueError("parameters.stream is not supported: batchrun reads whole answers")
    clash = [key for key in reserved if key in parameters]
    if clash:
        raise ValueError(f"parameters may not set {', '.join(clash)}: batchrun sets them itself")
    return dict(parameters)


def _parse_chat_completion(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The text columns of a 200 chat completion; a retryable RequestFailed for a bad body."""
    doc = _load_json(body)
    error = _error_object(doc)
    if error is not None:
        raise _bad_body(f"HTTP {status} carrying an error: {error}")
    try:
        choice = doc["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _bad_body("the answer has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise _bad_body("choices[0].message.content is not a string")
    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    prompt_tokens = _optional_int(usage.get("prompt_tokens"))
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return {
        "generated_text": content,
        "finish_reason": finish if isinstance(finish, str) else None,
        "prompt_tokens": prompt_tokens if prompt_tokens is not None else _header_int(headers, "x-prompt-tokens"),
        "completion_tokens": _optional_int(usage.get("completion_tokens")),
    }


class TextGenerationTask:
    """TGI's ``POST /``: ``{"inputs": prompt, "parameters": {..., "details": true}}`` → ``[{"generated_text", "details"}]``."""

    name = "text-generation"
    output_schema = OUTPUT_SCHEMA

    def __init__(self, *, template: str | None, column: str | None, parameters: Mapping[str, Any]) -> None:
        self.template = template
        self.column = column
        # details=true is what carries finish_reason and generated_tokens back.
        self.parameters = {**_check_parameters(parameters, ("details",)), "details": True}

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``."""
        prompt = render_prompt(template=self.template, column=self.column, columns=row.columns)
        if not prompt.strip():
            raise RequestFailed("empty_prompt", "the prompt is empty for this row", retryable=False)
        return PreparedRequest("/", {"inputs": prompt, "parameters": self.parameters})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200 answer of ``POST /`` (a list) or ``/generate`` (an object)."""
        doc = _load_json(body)
        error = _error_object(doc)
        if error is not None:
            raise _bad_body(f"HTTP {status} carrying an error: {error}")
        if isinstance(doc, list):
            if len(doc) != 1:
                raise _bad_body(f"expected a list with one answer, got {len(doc)} items")
            doc = doc[0]
        if not isinstance(doc, dict) or not isinstance(doc.get("generated_text"), str):
            raise _bad_body("the answer has no generated_text string")
        details = doc.get("details") if isinstance(doc.get("details"), dict) else {}
        completion = _optional_int(details.get("generated_tokens"))
        if completion is None:
            completion = _header_int(headers, "x-generated-tokens")
        finish = details.get("finish_reason")
        return {
            "generated_text": doc["generated_text"],
            "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": _header_int(headers, "x-prompt-tokens"),
            "completion_tokens": completion,
        }


class ChatCompletionTask:
    """TGI's ``POST /v1/chat/completions`` (OpenAI style): messages in, ``choices[0].message`` out."""

    name = "chat-completion"
    output_schema = OUTPUT_SCHEMA

    def __init__(
        self, *, template: str | None, column: str | None, system: str | None, parameters: Mapping[str, Any]
    ) -> None:
        self.template = template
        self.column = column
        self.system = system
        # TGI ignores the model name; "tgi" is what its docs send. A user's own "model" wins.
        self.parameters = {"model": "tgi", **_check_parameters(parameters, ("messages",))}

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``."""
        prompt = render_prompt(template=self.template, column=self.column, columns=row.columns)
        if not prompt.strip():
            raise RequestFailed("empty_prompt", "the prompt is empty for this row", retryable=False)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": prompt})
        return PreparedRequest(CHAT_PATH, {**self.parameters, "messages": messages})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200 chat completion."""
        return _parse_chat_completion(status, headers, body)


class VisionChatTask:
    """A vision-language model through TGI's chat route: the rendered text and one image per row.

    The image comes from ``image_column``, in any shape :func:`~batchrun.images.load_input_image`
    reads (a ``datasets`` Image value, raw bytes, a local path, an http(s) URL). It is decoded in
    :meth:`prepare`, so an image that cannot be read fails its row before a request is sent, and it
    travels as an exact ``data:<mime>;base64,...`` URL (an http(s) URL is passed through for the
    server to fetch). With ``max_side``, a larger image is shrunk to fit first; the
    ``image_downsized`` column says so.
    """

    name = "image-text-to-text"
    output_schema = VISION_OUTPUT_SCHEMA

    def __init__(
        self,
        *,
        template: str | None,
        column: str | None,
        image_column: str,
        system: str | None,
        parameters: Mapping[str, Any],
        max_side: int | None = None,
        base_dir: str | None = None,
    ) -> None:
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
            raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
        self.template = template
        self.column = column
        self.image_column = image_column
        self.system = system
        self.max_side = max_side
        self.base_dir = base_dir
        self.parameters = {"model": "tgi", **_check_parameters(parameters, ("messages",))}

    def prepare(self, row: Row) -> PreparedRequest:
        """The chat request for ``row``: its text prompt and its image as content parts."""
        prompt = render_prompt(template=self.template, column=self.column, columns=row.columns)
        if not prompt.strip():
            raise RequestFailed("empty_prompt", "the prompt is empty for this row", retryable=False)
        if self.image_column not in row.columns:
            raise RequestFailed("bad_image", f"the row has no image column {self.image_column!r}", retryable=False)
        image = load_input_image(row.columns[self.image_column], base_dir=self.base_dir)
        try:
            url, report = to_data_url(image, max_side=self.max_side)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow decoded it but cannot re-encode it
            message = f"the image cannot be re-encoded to send: {exc}"
            raise RequestFailed("bad_image", message, retryable=False) from None
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
        messages.append({"role": "user", "content": content})
        downsized = None if image.url is not None else bool(report["downsized"])
        return PreparedRequest(
            CHAT_PATH, {**self.parameters, "messages": messages}, outputs={"image_downsized": downsized}
        )

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200 chat completion (as for a text chat job)."""
        return _parse_chat_completion(status, headers, body)


class TextToImageTask:
    """The inference toolkit's text-to-image route (protocols.md §2): one image per row, kept as sent.

    The request asks for ``image_format`` with ``Accept`` and carries the row's seed: its
    ``seed_column`` value, or one derived from the row id and ``job_seed`` when there is no column
    or the value is null. The answer is checked (Pillow decodes all of it, in the format asked for)
    and stored byte for byte; a 200 that is not such an image is a retryable failure. A JSON answer
    holding a base64 image (a server that ignored ``Accept``) is read too, then checked the same way.
    """

    name = "text-to-image"

    def __init__(
        self,
        *,
        template: str | None,
        column: str | None,
        parameters: Mapping[str, Any],
        image_format: str = "png",
        seed_column: str | None = None,
        job_seed: int = 0,
    ) -> None:
        image_format = image_format.lower()
        if image_format not in ACCEPT:
            raise ValueError(f"image_format must be one of {', '.join(ACCEPT)}, got {image_format!r}")
        if "seed" in parameters:
            raise ValueError("parameters may not set seed for text-to-image: it comes from seed_column or job_seed")
        self.template = template
        self.column = column
        self.image_format = image_format
        self.seed_column = seed_column
        self.job_seed = job_seed
        self.parameters = _check_parameters(parameters, ())
        self.output_schema = image_output_schema()
        self._headers = {"Accept": ACCEPT[image_format]}

    def seed_for(self, row: Row) -> int:
        """The seed ``row`` is drawn with; the same in every run and every process."""
        if self.seed_column is not None:
            value = row.columns.get(self.seed_column)
            if value is not None:
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                    raise RequestFailed(
                        "bad_seed",
                        f"column {self.seed_column!r} holds {value!r}; expected an integer from 0 to 2**63 - 1",
                        retryable=False,
                    )
                return value
        return derive_seed(row.id, self.job_seed)

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``, with its seed in the parameters and in the known outputs."""
        prompt = render_prompt(template=self.template, column=self.column, columns=row.columns)
        if not prompt.strip():
            raise RequestFailed("empty_prompt", "the prompt is empty for this row", retryable=False)
        seed = self.seed_for(row)
        payload = {"inputs": prompt, "parameters": {**self.parameters, "seed": seed}}
        return PreparedRequest("/", payload, headers=self._headers, outputs={"seed": seed})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200: the image bytes unchanged, its size and format."""
        content_type = _header(headers, "content-type")
        data = body
        if content_type is not None and content_type.split(";")[0].strip().lower() == "application/json":
            # A JSON error object, or a base64 image from a server that ignored Accept.
            data = decode_json_image(body)
        checked = check_generated_image(data, content_type, self.image_format)
        return {
            "image": image_value(bytes(data)),
            "width": checked.width,
            "height": checked.height,
            "format": checked.format,
        }


def make_task(
    task: str,
    *,
    template: str | None = None,
    column: str | None = None,
    system: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    image: ImageSpec | None = None,
) -> Task:
    """The task named ``task`` (one of :data:`TASKS`).

    Exactly one of ``template`` and ``column`` says where the prompt comes from. ``system`` is a
    system message (chat and vision only). ``parameters`` are passed through unchanged under the
    route's own names (``max_new_tokens`` for text generation, ``max_tokens`` for chat,
    ``num_inference_steps`` for text-to-image). ``image_column`` (image-text-to-text only) names
    the input column with the picture; ``image`` is the spec's :class:`~batchrun.spec.ImageSpec`
    (defaults when None). Raises ValueError for a combination that cannot work, so a spec can
    report it before anything starts.
    """
    if (template is None) == (column is None):
        raise ValueError("give exactly one of template and column")
    if template is not None:
        list(string.Formatter().parse(template))  # a malformed template fails here, not on every row
    parameters = parameters or {}
    if image_column is not None and task != "image-text-to-text":
        raise ValueError("image_column applies to image-text-to-text only")
    if task in ("text-generation", "text-to-image") and system:
        raise ValueError(f"system does not apply to {task}; put the text in the template instead")
    if task == "text-generation":
        return TextGenerationTask(template=template, column=column, parameters=parameters)
    if task == "chat-completion":
        return ChatCompletionTask(template=template, column=column, system=system, parameters=parameters)
    if task == "text-to-image":
        return TextToImageTask(
            template=template,
            column=column,
            parameters=parameters,
            image_format=getattr(image, "format", "png"),
            seed_column=getattr(image, "seed_column", None),
            job_seed=getattr(image, "seed", 0),
        )
    if task == "image-text-to-text":
        if image_column is None:
            raise ValueError("image-text-to-text needs image_column, the input column holding the image")
        return VisionChatTask(
            template=template,
            column=column,
            image_column=image_column,
            system=system,
            parameters=parameters,
            max_side=getattr(image, "max_side", None),
            base_dir=getattr(image, "base_dir", None),
        )
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
