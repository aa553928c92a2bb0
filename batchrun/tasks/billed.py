"""What a serverless target's answers say beyond the text: who served them, their tokens, their cost.

A job whose endpoints are billed per token (the Inference Providers router, an OpenAI-compatible API)
records, in every result row:

    provider          the provider that served it (the router's ``x-inference-provider`` header, or the
                      answer's ``provider`` field); None where the answer does not say
    cached_tokens     ``usage.prompt_tokens_details.cached_tokens``, where the answer gives it
    reasoning_tokens  ``usage.completion_tokens_details.reasoning_tokens``, where the answer gives it
    cost_usd          the answer's tokens at the price of the endpoint (and provider) that answered; for
                      text-to-image, the image at its price per image
    mode              online, batch (collected from a provider's batch API) or flex; batch and flex answers
                      are charged ``discount`` x the online price

:meth:`BilledTask.parse` reads the first three from each answer; :meth:`BilledTask.accept` (the answer
hook; it sees every answer the dispatcher parsed, a redrawn one too) charges the answering endpoint's
meter and fills ``cost_usd``. The meters are bound by :func:`bind_meters` once the job's endpoints exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from batchrun.tasks.base import ColumnsLayer, find_layer, header, optional_int

if TYPE_CHECKING:
    from batchrun.cost import CostMeter
    from batchrun.tasks.base import PreparedRequest, Task

__all__ = ["BILLED_COLUMNS", "PROVIDER_HEADER", "BilledTask", "bind_meters"]

#: The header in which the router names the provider that served an answer.
PROVIDER_HEADER = "x-inference-provider"

BILLED_COLUMNS = (
    pa.field("provider", pa.string()),
    pa.field("cached_tokens", pa.int64()),
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("mode", pa.string()),
)


class BilledTask(ColumnsLayer):
    """``inner``, whose output schema ends with :data:`BILLED_COLUMNS`."""

    def __init__(self, inner: Task, *, mode: str = "online", discount: float = 0.5, per_image: bool = False) -> None:
        clash = [f.name for f in BILLED_COLUMNS if f.name in inner.output_schema.names]
        if clash:
            raise ValueError(f"the {', '.join(clash)} column clashes with an output column of task {inner.name}")
        super().__init__(inner)
        schema = inner.output_schema
        for column in BILLED_COLUMNS:
            schema = schema.append(column)
        self.output_schema = schema
        self.meters: dict[str, CostMeter] = {}
        self.mode = mode
        self.discount = discount
        self.per_image = per_image  # each answer is one image, priced per image or megapixel (text-to-image)

    def prepare(self, row: Any) -> PreparedRequest:
        """The inner task's request; in ``mode: flex``, asking for the provider's flex tier."""
        request = self.inner.prepare(row)
        if self.mode != "flex":
            return request
        from dataclasses import replace

        return replace(request, payload={**request.payload, "service_tier": "flex"})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """The inner task's columns, with the provider and the cached and reasoning tokens."""
        outputs = self.inner.parse(status, headers, body)
        doc: Any = {}
        if not self.per_image:  # an image's answer (raw bytes, or megabytes of base64) reports no tokens
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:  # the inner task read it: never here in practice
                pass
        doc = doc if isinstance(doc, dict) else {}
        usage = doc.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        prompt = usage.get("prompt_tokens_details")
        completion = usage.get("completion_tokens_details")
        provider = header(headers, PROVIDER_HEADER) or doc.get("provider") or outputs.get("provider")
        outputs["provider"] = provider if isinstance(provider, str) and provider else None
        outputs["cached_tokens"] = optional_int(prompt.get("cached_tokens")) if isinstance(prompt, dict) else None
        outputs["reasoning_tokens"] = (optional_int(completion.get("reasoning_tokens"))
                                       if isinstance(completion, dict) else None)
        return outputs

    def accept(self, request: PreparedRequest, outputs: dict[str, Any], *, endpoint: str) -> dict[str, Any]:
        """``outputs`` with the answer's cost, charged to the meter of the endpoint that answered.

        An answer collected from a batch comes with ``mode`` set already; any other is this job's mode."""
        meter = self.meters.get(endpoint)
        if meter is None and len(self.meters) == 1:
            meter = next(iter(self.meters.values()))
        mode = outputs.get("mode") or ("flex" if self.mode == "flex" else "online")
        outputs["mode"] = mode
        cost = None
        if meter is not None and self.per_image:
            cost = meter.charge_image(optional_int(outputs.get("width")), optional_int(outputs.get("height")))
        elif meter is not None:
            cost = meter.charge(outputs.get("prompt_tokens"), outputs.get("completion_tokens"),
                                provider=outputs.get("provider"), factor=1.0 if mode == "online" else self.discount)
        outputs["cost_usd"] = cost
        return outputs


def bind_meters(task: Task, meters: Mapping[str, CostMeter]) -> None:
    """Give ``task``'s :class:`BilledTask` layer (if any) the meter of each endpoint, by its route name."""
    layer = find_layer(task, BilledTask)
    if layer is not None:
        layer.meters = dict(meters)
