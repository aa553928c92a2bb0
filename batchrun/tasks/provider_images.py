"""Text-to-image through the Inference Providers router, in each provider's own request shape.

This is the one place that knows the per-provider shapes, as huggingface_hub's provider helpers do
(``huggingface_hub/inference/_providers/``: ``hf_inference.py``, ``together.py``, ``nscale.py``;
docs/providers.md, "Text-to-image"). The router serves a provider at ``{router}/{provider}``, and then
the provider's own route:

    hf-inference  POST /hf-inference/models/{ORG/NAME}    {"inputs", "parameters"}  -> the image's bytes
    together      POST /together/v1/images/generations   {"prompt", "model", "response_format": "base64",
                                                          width, height, steps, seed}  -> data[0].b64_json
    nscale        POST /nscale/v1/images/generations     {"prompt", "model", "response_format": "b64_json",
                                                          "size": "WxH", seed}  -> data[0].b64_json

together and nscale take the provider's own model id in the body (the Hub's ``inferenceProviderMapping``;
the endpoint's check reads it and the route puts it in each body); hf-inference takes the Hub's id in
the path. Every request asks ``Accept: image/png``, as huggingface_hub's client does (hf-inference
honours ``image.format``); the image is checked and stored as the text-to-image task stores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchrun.errors import RequestFailed
from batchrun.images import ACCEPT, check_generated_image, decode_json_image, image_value
from batchrun.records import FailureType
from batchrun.tasks.base import PreparedRequest, header, load_json, require_prompt
from batchrun.tasks.text_to_image import TextToImageTask

if TYPE_CHECKING:
    from batchrun.records import Row
    from batchrun.spec import JobSpec

__all__ = ["IMAGE_ROUTES", "ImageRoute", "ProviderImageTask"]


@dataclass(frozen=True, kw_only=True)
class ImageRoute:
    """One provider's text-to-image route under the router: where it is, and how its body is shaped."""

    provider: str
    base: str
    """The provider's base under the router's origin, as the data plane's url ends (``/together/v1``)."""
    path: str
    """The route, relative to ``base``; ``{model}`` is the Hub's model id."""
    model_in_body: bool
    """Whether the body names the provider's own model id (the data plane's ``model``)."""
    openai_form: bool
    """An OpenAI images body and answer (``data[0].b64_json``), rather than the toolkit's raw bytes."""

    def payload(self, prompt: str, parameters: Mapping[str, Any], seed: int) -> dict[str, Any]:
        """The body for ``prompt``, with huggingface_hub's renames for this provider."""
        if not self.openai_form:  # hf_inference.py: HFInferenceTask
            return {"inputs": prompt, "parameters": {**parameters, "seed": seed}}
        extra = dict(parameters)
        steps = extra.pop("num_inference_steps", None)
        if self.provider == "together":  # together.py: TogetherTextToImageTask
            if steps is not None:
                extra["steps"] = steps
            return {"prompt": prompt, "response_format": "base64", **extra, "seed": seed}
        # nscale.py: NscaleTextToImageTask takes a size, and neither steps nor cfg_scale
        extra.pop("cfg_scale", None)
        if "width" in extra and "height" in extra:
            extra["size"] = f"{extra.pop('width')}x{extra.pop('height')}"
        return {"response_format": "b64_json", "prompt": prompt, **extra, "seed": seed}

    def image(self, headers: Mapping[str, str], body: bytes) -> bytes:
        """The image's bytes in a 200 answer; a retryable failure when it holds none."""
        kind = (header(headers, "content-type") or "").split(";")[0].strip().lower()
        if not self.openai_form:
            return decode_json_image(body) if kind == "application/json" else body
        doc = load_json(body)
        data = doc.get("data") if isinstance(doc, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        b64 = first.get("b64_json")
        if not isinstance(b64, str):
            raise RequestFailed(FailureType.NOT_AN_IMAGE, f"{self.provider} answered 200 without data[0].b64_json",
                                status=200, retryable=True)
        return decode_json_image(b'"' + b64.encode() + b'"')


#: The providers whose text-to-image routes batchrun builds (task_kinds: text-to-image's provider_routes).
IMAGE_ROUTES: Mapping[str, ImageRoute] = {
    "hf-inference": ImageRoute(provider="hf-inference", base="/hf-inference", path="/models/{model}",
                               model_in_body=False, openai_form=False),
    "together": ImageRoute(provider="together", base="/together/v1", path="/v1/images/generations",
                           model_in_body=True, openai_form=True),
    "nscale": ImageRoute(provider="nscale", base="/nscale/v1", path="/v1/images/generations",
                         model_in_body=True, openai_form=True),
}


class ProviderImageTask(TextToImageTask):
    """One image per row from a provider through the router: its request shape, its answer, one seed per row.

    hf-inference is asked for ``image.format`` (``Accept``) and its answer must be in it; together and
    nscale choose the format themselves, so any of png, jpeg and webp is kept, and ``format`` says which.
    """

    def __init__(self, *, provider: str, model: str, **keys: Any) -> None:
        super().__init__(**keys)
        self.route = IMAGE_ROUTES[provider]
        self.model = model
        self._path = self.route.path.format(model=model)
        if self.route.openai_form:
            self._headers = {"Accept": ACCEPT["png"]}

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ProviderImageTask:
        """The task a validated spec on a provider target describes."""
        image, target = spec.image, spec.endpoint
        assert target.provider is not None and target.model is not None
        if target.provider not in IMAGE_ROUTES:  # auto: preflight chooses it from the Hub's mapping first
            raise ValueError(f"provider {target.provider} names no text-to-image route: batchrun's preflight chooses "
                             "the provider before it builds the task; build it from a spec with one of "
                             f"{', '.join(IMAGE_ROUTES)}")
        return cls(provider=target.provider, model=target.model, template=spec.prompt.template,
                   column=spec.prompt.column, parameters=spec.parameters,
                   image_format=image.format if image is not None else "png",
                   seed_column=image.seed_column if image is not None else None,
                   job_seed=image.seed if image is not None else 0)

    def prepare(self, row: Row) -> PreparedRequest:
        """The provider's request for ``row``, with the row's seed."""
        prompt = require_prompt(self.template, self.column, row)
        seed = self.seed_for(row)
        return PreparedRequest(self._path, self.route.payload(prompt, self.parameters, seed), headers=self._headers,
                               outputs={"seed": seed})

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Output columns from a 200: the image's bytes as the provider made them, its size and format."""
        data = self.route.image(headers, body)
        expected = None if self.route.openai_form else self.image_format
        checked = check_generated_image(data, header(headers, "content-type"), expected)
        # The provider is the route's own (pinned): the router's x-inference-provider, when sent, says the same.
        return {"image": image_value(bytes(data)), "width": checked.width, "height": checked.height,
                "format": checked.format, "provider": self.route.provider}

    def describe(self, request: PreparedRequest) -> str:
        """The prompt the request sends."""
        return str(request.payload.get("inputs", request.payload.get("prompt", "")))
