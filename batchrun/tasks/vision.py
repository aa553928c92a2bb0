"""Image and text in, text out: a vision-language model through TGI's chat route."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batchrun.errors import RequestFailed
from batchrun.images import load_input_image, to_data_url
from batchrun.records import FailureType
from batchrun.task_kinds import task_kind
from batchrun.tasks.base import PreparedRequest, require_prompt
from batchrun.tasks.conversation import conversation_messages
from batchrun.tasks.text import OUTPUT_SCHEMA, describe_messages, parse_chat_completion

if TYPE_CHECKING:
    from batchrun.records import Row
    from batchrun.spec import JobSpec

__all__ = ["VISION_OUTPUT_SCHEMA", "VisionChatTask"]

VISION_OUTPUT_SCHEMA = OUTPUT_SCHEMA.append(pa.field("image_downsized", pa.bool_(), nullable=True))
"""A vision-language job's columns: the text ones, and whether the input image was shrunk to send it
(null for an http(s) URL, which the server fetches and batchrun never sees)."""


class VisionChatTask:
    """A vision-language model through TGI's chat route: the rendered text and one image per row.

    The image comes from ``image_column``, in any shape :func:`~batchrun.images.load_input_image`
    reads (a ``datasets`` Image value, raw bytes, a local path, an http(s) URL). It is decoded in
    :meth:`prepare`, so an image that cannot be read fails its row before a request is sent, and it
    travels as an exact ``data:<mime>;base64,...`` URL (an http(s) URL is passed through for the
    server to fetch). With ``max_side``, a larger image is shrunk to fit first; the
    ``image_downsized`` column says so.

    With ``messages_column``, the row's conversation is sent instead (see
    :mod:`batchrun.tasks.conversation`): each image part is read and sent the same way, and
    ``image_downsized`` says whether any of them was shrunk (null when none was read by batchrun).
    """

    kind = task_kind("image-text-to-text")
    name = kind.name
    output_schema = VISION_OUTPUT_SCHEMA

    def __init__(
        self,
        *,
        template: str | None,
        column: str | None,
        image_column: str | None,
        system: str | None,
        parameters: Mapping[str, Any],
        max_side: int | None = None,
        base_dir: str | None = None,
        messages_column: str | None = None,
    ) -> None:
        self.template = template
        self.column = column
        self.image_column = image_column
        self.system = system
        self.max_side = max_side
        self.base_dir = base_dir
        self.messages_column = messages_column
        # TGI ignores the model name; "tgi" is what its docs send. A user's own "model" wins.
        self.parameters = {"model": "tgi", **parameters}

    @classmethod
    def from_spec(cls, spec: JobSpec) -> VisionChatTask:
        """The task a validated spec describes (the spec guarantees ``prompt.image_column`` or
        ``prompt.messages_column``)."""
        prompt, image = spec.prompt, spec.image
        assert prompt.image_column is not None or prompt.messages_column is not None
        return cls(
            template=prompt.template,
            column=prompt.column,
            image_column=prompt.image_column,
            system=prompt.system,
            parameters=spec.parameters,
            max_side=image.max_side if image is not None else None,
            base_dir=image.base_dir if image is not None else None,
            messages_column=prompt.messages_column,
        )

    def prepare(self, row: Row) -> PreparedRequest:
        """The chat request for ``row``: its text prompt and its image as content parts."""
        if self.messages_column is not None:
            return self._prepare_conversation(row)
        assert self.image_column is not None
        prompt = require_prompt(self.template, self.column, row)
        if self.image_column not in row.columns:
            raise RequestFailed(
                FailureType.BAD_IMAGE, f"the row has no image column {self.image_column!r}", retryable=False
            )
        url, downsized = self._image_url(row.columns[self.image_column])
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
        messages.append({"role": "user", "content": content})
        return PreparedRequest(
            self.kind.route, {**self.parameters, "messages": messages}, outputs={"image_downsized": downsized}
        )

    def _prepare_conversation(self, row: Row) -> PreparedRequest:
        assert self.messages_column is not None
        shrunk: list[bool] = []

        def image_part(value: Any, turn: int) -> dict[str, Any]:
            try:
                url, downsized = self._image_url(value)
            except RequestFailed as exc:
                raise RequestFailed(exc.error_type, f"turn {turn}: {exc.message}", retryable=False) from None
            if downsized is not None:
                shrunk.append(downsized)
            return {"type": "image_url", "image_url": {"url": url}}

        messages = conversation_messages(row.columns, self.messages_column, system=self.system, image_part=image_part)
        return PreparedRequest(
            self.kind.route,
            {**self.parameters, "messages": messages},
            outputs={"image_downsized": any(shrunk) if shrunk else None},
        )

    def _image_url(self, value: Any) -> tuple[str, bool | None]:
        """``value`` as the URL to send and whether it was shrunk (None for an http(s) URL passed through)."""
        image = load_input_image(value, base_dir=self.base_dir)
        try:
            url, report = to_data_url(image, max_side=self.max_side)
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow decoded it but cannot re-encode it
            message = f"the image cannot be re-encoded to send: {exc}"
            raise RequestFailed(FailureType.BAD_IMAGE, message, retryable=False) from None
        return url, None if image.url is not None else bool(report["downsized"])

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200 chat completion (as for a text chat job)."""
        return parse_chat_completion(status, headers, body)

    def describe(self, request: PreparedRequest) -> str:
        """The messages the request sends; the image as ``<image image/png>``, never its base64."""
        return describe_messages(request.payload)
