"""Text out: TGI's text generation (``POST /``) and chat completions (``POST /v1/chat/completions``).

protocols.md §1 is the wire format. The chat answer reader and the chat payload description are
shared with :mod:`batchrun.tasks.vision`, which speaks the same route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrun.task_kinds import task_kind
from batchrun.tasks.base import (
    PreparedRequest,
    bad_body,
    error_object,
    header_int,
    load_json,
    optional_int,
    require_prompt,
)
from batchrun.tasks.conversation import conversation_messages

if TYPE_CHECKING:
    from batchrun.records import Row
    from batchrun.spec import JobSpec

__all__ = ["OUTPUT_SCHEMA", "ChatCompletionTask", "CompletionsTask", "TextGenerationTask"]

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("generated_text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64(), nullable=True),
        pa.field("completion_tokens", pa.int64(), nullable=True),
    ]
)
"""The output columns every text task produces."""


def parse_chat_completion(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The text columns of a 200 chat completion; a retryable RequestFailed for a bad body."""
    doc = load_json(body)
    error = error_object(doc)
    if error is not None:
        raise bad_body(f"HTTP {status} carrying an error: {error}")
    try:
        choice = doc["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise bad_body("the answer has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise bad_body("choices[0].message.content is not a string")
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    prompt_tokens = optional_int(usage.get("prompt_tokens"))
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return {
        "generated_text": content,
        "finish_reason": finish if isinstance(finish, str) else None,
        "prompt_tokens": prompt_tokens if prompt_tokens is not None else header_int(headers, "x-prompt-tokens"),
        "completion_tokens": optional_int(usage.get("completion_tokens")),
    }


def describe_messages(payload: Mapping[str, Any]) -> str:
    """A chat payload's messages for people: ``role: text`` each, image parts as ``<image mime>``."""

    def content(value: Any) -> str:
        if not isinstance(value, list):
            return str(value)
        parts = []
        for part in value:
            if part.get("type") == "image_url":
                url = str((part.get("image_url") or {}).get("url", ""))
                parts.append(f"<image {url.split(';')[0] if url.startswith('data:') else url}>")
            else:
                parts.append(str(part.get("text", "")))
        return " ".join(parts)

    messages = payload.get("messages") or []
    return " | ".join(f"{m.get('role')}: {content(m.get('content'))}" for m in messages)


class TextGenerationTask:
    """TGI's ``POST /``: ``{"inputs": prompt, "parameters": {..., "details": true}}``.

    The answer is ``[{"generated_text", "details"}]``.
    """

    kind = task_kind("text-generation")
    name = kind.name
    output_schema = OUTPUT_SCHEMA

    def __init__(self, *, template: str | None, column: str | None, parameters: Mapping[str, Any]) -> None:
        self.template = template
        self.column = column
        # details=true is what carries finish_reason and generated_tokens back.
        self.parameters = {**parameters, "details": True}

    @classmethod
    def from_spec(cls, spec: JobSpec) -> TextGenerationTask:
        """The task a validated spec describes."""
        return cls(template=spec.prompt.template, column=spec.prompt.column, parameters=spec.parameters)

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``."""
        prompt = require_prompt(self.template, self.column, row)
        return PreparedRequest(self.kind.route, {"inputs": prompt, "parameters": self.parameters})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200 answer of ``POST /`` (a list) or ``/generate`` (an object)."""
        doc = load_json(body)
        error = error_object(doc)
        if error is not None:
            raise bad_body(f"HTTP {status} carrying an error: {error}")
        if isinstance(doc, list):
            if len(doc) != 1:
                raise bad_body(f"expected a list with one answer, got {len(doc)} items")
            doc = doc[0]
        if not isinstance(doc, dict) or not isinstance(doc.get("generated_text"), str):
            raise bad_body("the answer has no generated_text string")
        details = doc.get("details")
        if not isinstance(details, dict):
            details = {}
        completion = optional_int(details.get("generated_tokens"))
        if completion is None:
            completion = header_int(headers, "x-generated-tokens")
        finish = details.get("finish_reason")
        return {
            "generated_text": doc["generated_text"],
            "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": header_int(headers, "x-prompt-tokens"),
            "completion_tokens": completion,
        }

    def describe(self, request: PreparedRequest) -> str:
        """The prompt the request sends."""
        return str(request.payload.get("inputs", ""))


class ChatCompletionTask:
    """TGI's ``POST /v1/chat/completions`` (OpenAI style): messages in, ``choices[0].message`` out.

    The messages are a system message and the rendered prompt, or, with ``messages_column``, the
    row's whole conversation (see :mod:`batchrun.tasks.conversation`); the answer is the next
    assistant turn either way.
    """

    kind = task_kind("chat-completion")
    name = kind.name
    output_schema = OUTPUT_SCHEMA

    def __init__(
        self,
        *,
        template: str | None,
        column: str | None,
        system: str | None,
        parameters: Mapping[str, Any],
        messages_column: str | None = None,
        model: str | None = "tgi",
    ) -> None:
        self.template = template
        self.column = column
        self.system = system
        self.messages_column = messages_column
        # TGI ignores the model name; "tgi" is what its docs send. A user's own "model" wins. A serverless
        # target's model is its endpoint's, which the dispatcher puts in each body (``model=None``).
        self.parameters = {**({"model": model} if model else {}), **parameters}

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ChatCompletionTask:
        """The task a validated spec describes."""
        prompt = spec.prompt
        return cls(
            template=prompt.template,
            column=prompt.column,
            system=prompt.system,
            parameters=spec.parameters,
            messages_column=prompt.messages_column,
            model=None if all(e.per_token for e in spec.all_endpoints) else "tgi",
        )

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``."""
        messages: list[dict[str, Any]]
        if self.messages_column is not None:
            messages = conversation_messages(row.columns, self.messages_column, system=self.system, image_part=None)
            return PreparedRequest(self.kind.route, {**self.parameters, "messages": messages})
        prompt = require_prompt(self.template, self.column, row)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": prompt})
        return PreparedRequest(self.kind.route, {**self.parameters, "messages": messages})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200 chat completion."""
        return parse_chat_completion(status, headers, body)

    def describe(self, request: PreparedRequest) -> str:
        """The messages the request sends, ``role: text`` each."""
        return describe_messages(request.payload)


#: TGI's text-generation parameters that OpenAI's completions route names otherwise.
_COMPLETIONS_NAMES = {"max_new_tokens": "max_tokens"}


class CompletionsTask:
    """text-generation on a serverless target: OpenAI's ``POST /v1/completions`` (``{"model", "prompt"}``).

    The spec's TGI parameters are sent under OpenAI's names (``max_new_tokens`` as ``max_tokens``); the
    answer is ``choices[0].text`` with ``usage``. The model is the target's (the dispatcher's route)."""

    kind = task_kind("text-generation")
    name = kind.name
    output_schema = OUTPUT_SCHEMA
    route = "/v1/completions"

    def __init__(self, *, template: str | None, column: str | None, parameters: Mapping[str, Any]) -> None:
        self.template = template
        self.column = column
        self.parameters = {_COMPLETIONS_NAMES.get(k, k): v for k, v in parameters.items()}

    @classmethod
    def from_spec(cls, spec: JobSpec) -> CompletionsTask:
        """The task a validated spec describes."""
        return cls(template=spec.prompt.template, column=spec.prompt.column, parameters=spec.parameters)

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``."""
        prompt = require_prompt(self.template, self.column, row)
        return PreparedRequest(self.route, {**self.parameters, "prompt": prompt})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200 ``text_completion``."""
        doc = load_json(body)
        error = error_object(doc)
        if error is not None:
            raise bad_body(f"HTTP {status} carrying an error: {error}")
        try:
            choice = doc["choices"][0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError):
            raise bad_body("the answer has no choices[0].text") from None
        if not isinstance(text, str):
            raise bad_body("choices[0].text is not a string")
        usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
        finish = choice.get("finish_reason")
        return {
            "generated_text": text,
            "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": optional_int(usage.get("prompt_tokens")),
            "completion_tokens": optional_int(usage.get("completion_tokens")),
        }

    def describe(self, request: PreparedRequest) -> str:
        """The prompt the request sends."""
        return str(request.payload.get("prompt", ""))
