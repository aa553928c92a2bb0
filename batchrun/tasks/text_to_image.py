"""Text in, an image out: the inference toolkit's text-to-image route (protocols.md §2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batchrun.errors import RequestFailed
from batchrun.images import (
    ACCEPT,
    check_generated_image,
    decode_json_image,
    derive_seed,
    image_output_schema,
    image_value,
)
from batchrun.records import FailureType
from batchrun.task_kinds import task_kind
from batchrun.tasks.base import PreparedRequest, header, require_prompt

if TYPE_CHECKING:
    from batchrun.records import Row
    from batchrun.spec import JobSpec

__all__ = ["TextToImageTask"]


class TextToImageTask:
    """One image per row, kept as sent.

    The request asks for ``image_format`` with ``Accept`` and carries the row's seed: its
    ``seed_column`` value, or one derived from the row id and ``job_seed`` when there is no column
    or the value is null. The answer is checked (Pillow decodes all of it, in the format asked for)
    and stored byte for byte; a 200 that is not such an image is a retryable failure. A JSON answer
    holding a base64 image (a server that ignored ``Accept``) is read too, then checked the same way.
    """

    kind = task_kind("text-to-image")
    name = kind.name

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
        self.template = template
        self.column = column
        self.image_format = image_format
        self.seed_column = seed_column
        self.job_seed = job_seed
        self.parameters = dict(parameters)
        self.output_schema = image_output_schema()
        self._headers = {"Accept": ACCEPT[image_format]}

    @classmethod
    def from_spec(cls, spec: JobSpec) -> TextToImageTask:
        """The task a validated spec describes."""
        image = spec.image
        return cls(
            template=spec.prompt.template,
            column=spec.prompt.column,
            parameters=spec.parameters,
            image_format=image.format if image is not None else "png",
            seed_column=image.seed_column if image is not None else None,
            job_seed=image.seed if image is not None else 0,
        )

    def seed_for(self, row: Row) -> int:
        """The seed ``row`` is drawn with; the same in every run and every process."""
        if self.seed_column is not None:
            value = row.columns.get(self.seed_column)
            if value is not None:
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                    raise RequestFailed(
                        FailureType.BAD_SEED,
                        f"column {self.seed_column!r} holds {value!r}; expected an integer from 0 to 2**63 - 1",
                        retryable=False,
                    )
                return value
        return derive_seed(row.id, self.job_seed)

    def prepare(self, row: Row) -> PreparedRequest:
        """The request for ``row``, with its seed in the parameters and in the known outputs."""
        prompt = require_prompt(self.template, self.column, row)
        seed = self.seed_for(row)
        payload = {"inputs": prompt, "parameters": {**self.parameters, "seed": seed}}
        return PreparedRequest(self.kind.route, payload, headers=self._headers, outputs={"seed": seed})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200: the image bytes unchanged, its size and format."""
        content_type = header(headers, "content-type")
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

    def describe(self, request: PreparedRequest) -> str:
        """The prompt the request sends."""
        return str(request.payload.get("inputs", ""))
