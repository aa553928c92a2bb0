"""The router's text-to-image routes, per provider, as huggingface_hub's provider helpers call them.

huggingface_hub 2.x (``inference/_providers/``) sends text-to-image through the router at
``https://router.huggingface.co/{provider}`` + the provider's own route, with the provider's model id
(read from the Hub's ``inferenceProviderMapping``), and ``Accept: image/png``:

    hf-inference  POST /hf-inference/models/{ORG/NAME}      {"inputs": prompt, "parameters": {...}}
                  -> the image's bytes (hf_inference.py: HFInferenceTask)
    together      POST /together/v1/images/generations     {"prompt", "model", "response_format": "base64",
                  width, height, seed, steps, ...}  -> {"data": [{"b64_json": ...}]} (together.py)
    nscale        POST /nscale/v1/images/generations       {"prompt", "model", "response_format": "b64_json",
                  "size": "WxH", seed, ...}  -> {"data": [{"b64_json": ...}]} (nscale.py)

Each request goes through what the chat routes have: the bearer token (401), the provider's outage, its
random 429s, the request (400), its request limit (429; an image costs no tokens), then the drawing
after ``image_latency_s``. The provider is named in ``x-inference-provider``; each image is billed
``price_image``. Errors: hf-inference answers the toolkit's ``{"error": ...}``; the OpenAI-style
providers answer OpenAI's error object (assumed: their own shapes are not documented by the client).
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from aiohttp import web

from batchrun.emulator.config import EndpointConfig
from batchrun.emulator.openai_errors import openai_error
from batchrun.emulator.replies import Reply, json_reply
from batchrun.emulator.router_config import IMAGE_PROVIDERS
from batchrun.emulator.text_to_image import ImageModel
from batchrun.emulator.text_to_image import error as toolkit_error

__all__ = ["RouterImages"]

# What each OpenAI-style provider's helper asks for in response_format (together: base64, nscale: b64_json).
_B64_FORMATS = ("base64", "b64_json")


class Router(Protocol):
    """What these routes use of the router (batchrun.emulator.router.Router, which imports this module)."""

    providers: dict[str, Any]  # name -> ProviderState

    def authorized(self, request: web.Request) -> bool: ...
    def unauthorized(self) -> web.Response: ...
    def begin(self) -> float: ...
    def fault_response(self, request: web.Request, provider: Any, body: bytes, headers: dict[str, str],
                       now: float) -> web.StreamResponse | None: ...
    async def counted(self, request: web.Request, name: str,
                      answer: Awaitable[web.StreamResponse]) -> web.StreamResponse: ...
    def limit_reply(self, provider: Any, cost: int, now: float) -> Reply | None: ...


#: A provider's live state (batchrun.emulator.router.ProviderState).
ProviderState = Any


class RouterImages:
    """The text-to-image routes of :data:`IMAGE_PROVIDERS` on the router's port."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._models: dict[str, ImageModel] = {}
        self._ids = itertools.count(1)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/hf-inference/models/{org}/{name}", self._hf_inference)
        for name in IMAGE_PROVIDERS:
            if name != "hf-inference":
                app.router.add_post(f"/{name}/v1/images/generations", self._generations)

    async def _hf_inference(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, "hf-inference", "POST /hf-inference/models/{model}")

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        name = request.path.split("/")[1]
        return await self._counted(request, name, f"POST /{name}/v1/images/generations")

    async def _counted(self, request: web.Request, name: str, route: str) -> web.StreamResponse:
        return await self.router.counted(request, route, self._answer(request, name))

    async def _answer(self, request: web.Request, name: str) -> web.StreamResponse:
        router = self.router
        if not router.authorized(request):
            return router.unauthorized()
        body = await request.read()
        now = router.begin()
        provider = router.providers.get(name)
        found = self._request(request, name, provider, body)
        if isinstance(found, Reply):
            return found.to_response()
        assert provider is not None
        payload, accept = found
        headers = {"x-inference-provider": name}
        faulty = router.fault_response(request, provider, body, headers, now)
        if faulty is not None:
            return faulty
        checked = self._image_model(provider).parse(json.dumps(payload).encode())
        if isinstance(checked, Reply):
            return self._refused(provider, checked, name, headers).to_response()
        refusal = router.limit_reply(provider, 0, now)
        if refusal is not None:
            refusal.headers.update(headers)
            return refusal.to_response()
        provider.requests.take(1, now)
        drawn = await self._image_model(provider).render(payload, accept)
        if drawn.status != 200:
            return self._refused(provider, drawn, name, headers).to_response()
        provider.by_status["200"] += 1
        provider.images += 1
        provider.cost_usd += provider.config.price_image
        headers.update(provider.rate_headers(now))
        if name == "hf-inference":
            drawn.headers.update(headers)
            return drawn.to_response()
        return json_reply({"id": f"img-{next(self._ids):012x}", "object": "list", "created": int(time.time()),
                           "model": found[0].get("model"), "data": [
                               {"index": 0, "b64_json": base64.b64encode(drawn.body).decode()}]},
                          headers=headers).to_response()

    def _request(self, request: web.Request, name: str, provider: ProviderState | None,
                 body: bytes) -> tuple[dict[str, Any], str] | Reply:
        """The request as the toolkit's ``{inputs, parameters}`` and the image type to answer, or the refusal."""
        if name == "hf-inference":
            model = f"{request.match_info['org']}/{request.match_info['name']}"
            if provider is None or provider.config.image_model(model) is None:
                return json_reply({"error": f"Model {model} is not served by hf-inference for text-to-image"}, 404)
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return toolkit_error("Body needs to be a valid JSON object")
            if not isinstance(payload, dict):
                return toolkit_error("Body needs to be a valid JSON object")
            return payload, request.headers.get("Accept", "")
        return _openai_style(name, provider, body)

    def _image_model(self, provider: ProviderState) -> ImageModel:
        cfg = provider.config
        if cfg.name not in self._models:
            self._models[cfg.name] = ImageModel(EndpointConfig(
                name=cfg.name, task="text-to-image", image_latency_s=cfg.image_latency_s,
                image_reject_non_square=False))
        return self._models[cfg.name]

    def _refused(self, provider: ProviderState, reply: Reply, name: str, headers: dict[str, str]) -> Reply:
        """A 400 of the drawing's checks, in the provider's own error shape."""
        provider.by_status[str(reply.status)] += 1
        if name != "hf-inference":
            message = json.loads(reply.body).get("error", "invalid request")
            reply = openai_error(reply.status, str(message), "invalid_request_error")
        reply.headers.update(headers)
        return reply


def _openai_style(name: str, provider: ProviderState | None, body: bytes) -> tuple[dict[str, Any], str] | Reply:
    """An OpenAI images request (together, nscale) as the toolkit's ``{inputs, parameters}``, or the refusal."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    if not isinstance(payload, dict):
        return openai_error(400, "The request body must be a JSON object.", "invalid_request_error")
    model = payload.get("model")
    if provider is None or not isinstance(model, str) or provider.config.image_model(model) is None:
        return openai_error(404, f"The model `{model}` does not exist or you do not have access to it.",
                            "invalid_request_error", "model_not_found", "model")
    if payload.get("response_format") not in _B64_FORMATS:
        return openai_error(400, f"response_format {payload.get('response_format')!r} is not emulated: ask for "
                            f"{' or '.join(_B64_FORMATS)}", "invalid_request_error", param="response_format")
    parameters = {k: payload[k] for k in ("width", "height", "seed") if k in payload}
    size = payload.get("size")
    if name == "nscale" and size is not None:
        width, _, height = str(size).partition("x")
        if not (width.isdigit() and height.isdigit()):
            return openai_error(400, f"size must be WIDTHxHEIGHT, got {size!r}", "invalid_request_error",
                                param="size")
        parameters.update(width=int(width), height=int(height))
    return {"inputs": payload.get("prompt"), "parameters": parameters, "model": model}, "image/png"
