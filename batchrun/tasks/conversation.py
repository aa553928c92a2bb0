"""A row's conversation (``prompt.messages_column``) checked and turned into chat messages.

The column holds ``datasets``' conversational format: a list of ``{role, content}`` turns, where
``content`` is a string or a list of parts (``{"type": "text", "text": ...}`` and image parts). The
answer the job asks for is the next assistant turn, so a conversation must end on a user or system
turn. A conversation that cannot be sent fails its row before any request, with a message naming the
turn (1-based, as people count), so the user can find it in their data.

Image parts are accepted in the shapes found in the wild: OpenAI's ``{"type": "image_url",
"image_url": {"url": ...}}`` and ``datasets``/TRL's ``{"type": "image", "image": ...}`` (any value
:func:`~batchrun.images.load_input_image` reads: a ``datasets`` Image value, bytes, a path, a URL).
What becomes of them is the task's choice (``image_part``): the vision task sends them as it sends
an ``image_column`` image; the text chat task has none and fails the row.

Light on purpose (no pyarrow, no Pillow): the spec parser imports :mod:`batchrun.tasks`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from batchrun.errors import RequestFailed
from batchrun.records import FailureType

__all__ = ["ROLES", "conversation_messages", "messages_column_problem"]

ROLES = ("system", "user", "assistant")
"""The roles a conversation's turns may have."""

#: An image part as found in a row -> the content part to send (raises RequestFailed when it cannot).
ImagePart = Callable[[Any, int], dict[str, Any]]


def bad_conversation(message: str) -> RequestFailed:
    """The non-retryable failure of a conversation that cannot be sent."""
    return RequestFailed(FailureType.BAD_CONVERSATION, message, retryable=False)


def conversation_messages(
    columns: Mapping[str, Any], column: str, *, system: str | None, image_part: ImagePart | None
) -> list[dict[str, Any]]:
    """The chat messages for a row's conversation in ``column``, with ``system`` prepended only when
    the conversation has no system turn of its own.

    Raises a non-retryable ``bad_conversation`` RequestFailed naming the turn for a missing or unknown
    role, an empty content, a part that is neither text nor an image, or a last turn from the
    assistant. A string value is read as the conversation's JSON text (a JSONL input whose turns mix
    shapes arrives that way).
    """
    if column not in columns:
        raise bad_conversation(f"the row has no column {column!r}")
    value = columns[column]
    if value is None:
        raise bad_conversation(f"column {column!r} is null in this row")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad_conversation(f"column {column!r} holds text that is not a JSON list of messages") from None
    if not isinstance(value, (list, tuple)):
        raise bad_conversation(f"column {column!r} holds a {type(value).__name__}, not a list of messages")
    if not value:
        raise bad_conversation("the conversation has no turns")
    messages = [_message(turn, number, image_part) for number, turn in enumerate(value, start=1)]
    if messages[-1]["role"] == "assistant":
        raise bad_conversation(
            f"turn {len(messages)}: the last turn is the assistant's; the job asks for the next assistant turn, "
            "so a conversation must end with a user (or system) turn"
        )
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _message(turn: Any, number: int, image_part: ImagePart | None) -> dict[str, Any]:
    if not isinstance(turn, Mapping):
        raise bad_conversation(f"turn {number}: expected a {{role, content}} mapping, got {type(turn).__name__}")
    role = turn.get("role")
    if role is None or role == "":
        raise bad_conversation(f"turn {number}: has no role")
    if role not in ROLES:
        raise bad_conversation(f"turn {number}: role {role!r} is not one of {', '.join(ROLES)}")
    return {"role": role, "content": _content(turn.get("content"), number, image_part)}


def _content(content: Any, number: int, image_part: ImagePart | None) -> str | list[dict[str, Any]]:
    if content is None or (isinstance(content, str) and not content.strip()):
        raise bad_conversation(f"turn {number}: the content is empty")
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise bad_conversation(f"turn {number}: content is a {type(content).__name__}, not text or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = part.get("text")
            if isinstance(text, str) and text.strip():
                parts.append({"type": "text", "text": text})
            continue  # an empty text part says nothing; the turn is judged on what remains
        if kind in ("image_url", "image"):
            if image_part is None:
                raise bad_conversation(
                    f"turn {number}: holds an image part, but this task sends text only; "
                    "use task image-text-to-text for conversations with images"
                )
            parts.append(image_part(_image_value(part, kind, number), number))
            continue
        raise bad_conversation(f"turn {number}: a content part of type {kind!r} is neither text nor an image")
    if not parts:
        raise bad_conversation(f"turn {number}: the content is empty")
    return parts


def _image_value(part: Mapping[str, Any], kind: str, number: int) -> Any:
    """The image a part holds: a URL for ``image_url``, any loadable value for ``image``."""
    if kind == "image_url":
        inner = part.get("image_url")
        value = inner.get("url") if isinstance(inner, Mapping) else inner
    else:
        value = part.get("image")
        if value is None:  # TRL writes {"type": "image"} with the image under "url" or "path" in some sets
            value = part.get("url") or part.get("path")
    if value is None or value == "":
        raise bad_conversation(f"turn {number}: an image part holds no image")
    return value


def messages_column_problem(field: Any) -> str | None:
    """Why the Arrow ``field`` cannot be ``prompt.messages_column``, or ``None`` when it can.

    A list (of message structs) or text (a conversation's JSON) can; anything else would fail every
    row with ``bad_conversation``, so preflight refuses it before anything costs money.
    """
    import pyarrow as pa  # callers hold a schema, so pyarrow is loaded already

    kind = field.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_string(kind) or (
        pa.types.is_large_string(kind)
    ):
        return None
    return (
        f"column {field.name!r} has type {kind}; prompt.messages_column must name a column of conversations: "
        "lists of {role, content} messages"
    )
