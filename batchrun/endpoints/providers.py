"""Serverless targets billed per token: the Inference Providers router, and any OpenAI-compatible API.

    endpoint: {provider: together, model: ORG/NAME}          the router, with the HF token
    endpoint: {provider: auto, model: ORG/NAME, router_url: local}   the built-in emulator's router
    endpoint: {url: https://api.example.com/v1, model: NAME, api_key_env: VAR}   an OpenAI-compatible API

There is no lifecycle: entering returns the :class:`~batchrun.endpoints.base.DataPlane` at once, and
there is nothing to bracket. The plane names the model each request's body carries (``ORG/NAME:PROVIDER``
for a pinned provider), and its limits spec for the lane's limiter. The meter is charged each answer's
tokens (:mod:`batchrun.tasks.billed`) at the spec's ``price``, or the router's pricing of the provider
that answered.

The check reads ``GET /v1/models`` before anything is sent: the model exists, the pinned provider serves
it (and is not in ``error``), the key works, ``max_tokens`` fits the context, structured output is
supported where the router says so.

text-to-image goes to the pinned provider's own route under the router (``{router}/{provider}/...``,
:mod:`batchrun.tasks.provider_images`). Its check reads the Hub's ``inferenceProviderMapping`` of the
model instead (``GET {HF_ENDPOINT}/api/models/{model}?expand=inferenceProviderMapping``, as
huggingface_hub's client does): the provider serves it for text-to-image, and under which id of its own.
Each image is charged ``price.per_image`` plus ``price.per_megapixel`` times its megapixels.

An API key is read from the environment variable ``api_key_env`` when the endpoint is made, registered
with :func:`batchrun.errors.register_secret` (so every redaction covers it) and kept only in the plane,
never in the spec, a message or a file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from batchrun.cost import CostMeter, ImagePrice, TokenPrice
from batchrun.endpoints.base import Bracketed, BracketResult, DataPlane, EndpointCheck, LifecycleRecord
from batchrun.errors import AuthError, EndpointUnusableError, RequestFailed, redact, register_secret
from batchrun.facts import CHECK_MAX_BYTES, CHECK_TIMEOUT_S

if TYPE_CHECKING:
    from batchrun.spec import EndpointSpec

__all__ = ["ROUTER_URL", "ServerlessEndpoint", "first_image_provider", "hub_image_mapping"]

#: The Inference Providers router (OpenAI-compatible).
ROUTER_URL = "https://router.huggingface.co/v1"
#: Provider values that let the router choose (the model is sent without a suffix, or with the policy).
POLICIES = ("auto", "fastest", "cheapest", "preferred")
#: The emulated provider that serves the model for `router_url: local` with a policy rather than a name.
LOCAL_PROVIDER = "emulated"
_NOTHING_TO_BRACKET = "a serverless target has no lifecycle: there is nothing to bracket"


class ServerlessEndpoint:
    """A target billed per token: the router (:meth:`router`) or an OpenAI-compatible API (:meth:`api`)."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        body_model: str,
        token: str | None,
        send_token: bool,
        price: TokenPrice | None,
        provider: str | None = None,
        key_variable: str | None = None,
        local: bool = False,
        limits: Any = None,
        max_tokens: int | None = None,
        structured: bool = False,
        image_route: Any = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.body_model = body_model
        self.provider = provider
        self.limits = limits
        self.ref = f"{provider}:{model}" if provider is not None else f"{redact(base_url)} ({model})"
        self.record = LifecycleRecord(initial_state="serverless")
        self.image_route = image_route  # text-to-image: the provider's route (tasks.provider_images.ImageRoute)
        self.image_price: ImagePrice | None = None
        self.meter = CostMeter(None, token_price=price, per_token=True)
        self._token = token
        self._send_token = send_token
        self._key_variable = key_variable
        self._local = local
        self._max_tokens = max_tokens
        self._structured = structured
        self._emulator: Any = None  # the built-in router's emulator (endpoints/local.py starts it)

    @classmethod
    def router(cls, e: EndpointSpec, *, token: str | None, max_tokens: int | None = None,
               structured: bool = False, images: bool = False) -> ServerlessEndpoint:
        """`endpoint: {provider, model}`: the Inference Providers router, with the HF token.

        ``images``: a text-to-image job, sent to the provider's own route (the body names the provider's
        model id, which the check reads from the Hub)."""
        assert e.provider is not None and e.model is not None
        pinned = e.provider not in ("auto", "preferred")
        route = None
        if images:
            from batchrun.tasks.provider_images import IMAGE_ROUTES

            route = IMAGE_ROUTES[e.provider]
        made = cls(base_url=e.router_url if e.router_url not in (None, "local") else ROUTER_URL,
                   model=e.model, body_model=e.model if images or not pinned else f"{e.model}:{e.provider}",
                   token=token, send_token=False, price=_price(e), provider=e.provider, local=e.router_url == "local",
                   limits=getattr(e, "limits", None), max_tokens=max_tokens, structured=structured, image_route=route)
        if images:
            if e.price is not None:
                made.image_price = ImagePrice(e.price.per_image or 0.0, e.price.per_megapixel or 0.0)
            made.meter = CostMeter(None, per_token=True, image_price=made.image_price)
        return made

    @classmethod
    def api(cls, e: EndpointSpec, *, token: str | None, max_tokens: int | None = None,
            structured: bool = False) -> ServerlessEndpoint:
        """`endpoint: {url, model, api_key_env}`: an OpenAI-compatible API, its key from the environment.

        Without ``api_key_env`` the HF token goes where it always may (Hugging Face hosts, loopback, or the
        url when ``send_token``)."""
        assert e.url is not None and e.model is not None
        key = os.environ.get(e.api_key_env) if e.api_key_env else None
        if e.api_key_env and not key:
            raise EndpointUnusableError(f"the environment variable {e.api_key_env} (endpoint.api_key_env) is not set: "
                                        "export the API key in it")
        register_secret(key)
        return cls(base_url=e.url.rstrip("/"), model=e.model, body_model=e.model,
                   token=key if e.api_key_env else token, send_token=True if e.api_key_env else e.send_token,
                   price=_price(e), key_variable=e.api_key_env, limits=getattr(e, "limits", None),
                   max_tokens=max_tokens, structured=structured)

    def __repr__(self) -> str:
        return f"ServerlessEndpoint({self.ref!r})"

    # ------------------------------------------------------------------ the check

    async def check(self) -> EndpointCheck:
        """Read-only, before anything is sent: ``GET /v1/models`` says the model is served, and how."""
        if self._local:
            return self._local_check()
        if self.provider is not None and not self._token:
            raise AuthError("no Hugging Face token found for the Inference Providers router: set HF_TOKEN or run "
                            "`hf auth login` (a token allowed to make calls to Inference Providers)")
        if self.image_route is not None:
            return await self._image_check()
        status, doc = await self._get_models()
        if status in (401, 403):
            what = (f"the API key in {self._key_variable}" if self._key_variable else "the Hugging Face token")
            raise AuthError(f"{self.ref} refused {what} (HTTP {status} on GET /models): check it, then run the job "
                            "again", status=status)
        if self.provider is None:
            return self._api_check(status, doc)
        if status != 200 or not isinstance(doc.get("data"), list):
            raise EndpointUnusableError(f"the router at {redact(self.base_url)} did not list its models (HTTP "
                                        f"{status} on GET /models): check endpoint.router_url; nothing was sent")
        return self._router_check(doc["data"])

    async def _get_models(self) -> tuple[int, dict[str, Any]]:
        from batchrun.tasks import join_url

        return await self._get_json(join_url(self.base_url, "/models"), self.base_url)

    async def _get_json(self, url: str, what: str) -> tuple[int, dict[str, Any]]:
        return await _fetch_json(url, what, self._token, send_token=self._send_token)

    async def _image_check(self) -> EndpointCheck:
        """text-to-image: the Hub's inferenceProviderMapping says the pinned provider serves the model for it,
        and under which id; that id goes in each body where the provider's route takes one."""
        mapping = await hub_image_mapping(self.model, self._token)
        mine = mapping.get(str(self.provider))
        if mine is None or mine.get("task") != "text-to-image":
            serving = ", ".join(p for p, m in mapping.items() if m.get("task") == "text-to-image") or "no provider"
            other = f" (it serves it for {mine.get('task')})" if mine is not None else ""
            raise EndpointUnusableError(f"provider {self.provider} does not serve {self.model} for text-to-image"
                                        f"{other}; it is served for text-to-image by: {serving} (the Hub's "
                                        "inferenceProviderMapping): check endpoint.provider; nothing was sent")
        if mine.get("status") == "error":
            raise EndpointUnusableError(f"provider {self.provider} reports status error for {self.model}: choose "
                                        "another provider; nothing was sent")
        provider_id = str(mine.get("providerId") or self.model)
        self.body_model = provider_id
        note = f"{self.ref}: text-to-image as {provider_id}"
        if mine.get("status") == "staging":
            note += " (status staging)"
        if self.image_price is not None:
            note += f", {self.image_price}"
        return EndpointCheck(note=note, model=self.model, details={"providers": [self.provider],
                                                                   "provider_model": provider_id})

    def _router_check(self, models: list[Any]) -> EndpointCheck:
        entry = next((m for m in models if isinstance(m, dict) and m.get("id") == self.model), None)
        if entry is None:
            raise EndpointUnusableError(f"the Inference Providers router serves no model {self.model} (GET "
                                        "/v1/models): check endpoint.model; nothing was sent")
        providers = [p for p in entry.get("providers") or () if isinstance(p, dict) and p.get("provider")]
        for p in providers:
            price = _router_price(p)
            if price is not None:
                self.meter.provider_prices[str(p["provider"])] = price
        live = [p for p in providers if p.get("status", "live") == "live"]
        if self.provider in POLICIES:
            chosen = live
            if not chosen:
                raise EndpointUnusableError(f"no provider serves {self.model} live now (GET /v1/models: "
                                            f"{_statuses(providers)}); nothing was sent")
        else:
            chosen = [p for p in providers if p["provider"] == self.provider]
            if not chosen:
                names = ", ".join(str(p["provider"]) for p in live) or "none live"
                raise EndpointUnusableError(f"provider {self.provider} does not serve {self.model} (it is served by: "
                                            f"{names}): check endpoint.provider; nothing was sent")
            if chosen[0].get("status") == "error":
                raise EndpointUnusableError(f"provider {self.provider} reports status error for {self.model}: choose "
                                            "another provider (or provider: auto); nothing was sent")
        # The price of an answer whose provider is not known: the dearest that may serve it.
        prices = [_router_price(p) for p in chosen]
        known = [p for p in prices if p is not None]
        if known:
            self.meter.provider_prices[""] = max(known, key=lambda p: p.input_per_mtok + p.output_per_mtok)
        self._fits(chosen)
        note = f"{self.ref}: served by {', '.join(str(p['provider']) for p in chosen)}"
        if self.provider not in POLICIES and chosen[0].get("status") == "staging":
            note += " (status staging)"
        price = self.meter.price_for(None if self.provider in POLICIES else self.provider)
        if price is not None:
            note += f", ${price.input_per_mtok:g}/${price.output_per_mtok:g} per 1M tokens in/out"
        return EndpointCheck(note=note, model=self.model, details={"providers": [p["provider"] for p in chosen]})

    def _fits(self, chosen: list[dict[str, Any]]) -> None:
        """The parameters fit every provider that may answer: max_tokens within the context, structured output."""
        contexts = [c for p in chosen if isinstance(c := p.get("context_length"), int) and c > 0]
        if self._max_tokens is not None and contexts and self._max_tokens >= min(contexts):
            raise EndpointUnusableError(f"parameters.max_tokens ({self._max_tokens}) does not fit the context of "
                                        f"{self.model} ({min(contexts)} tokens); nothing was sent")
        if self._structured and any(p.get("supports_structured_output") is False for p in chosen):
            without = [str(p["provider"]) for p in chosen if p.get("supports_structured_output") is False]
            raise EndpointUnusableError(f"structured output (output_schema) is not supported by {', '.join(without)} "
                                        f"for {self.model}: pin a provider that supports it; nothing was sent")

    def _api_check(self, status: int, doc: dict[str, Any]) -> EndpointCheck:
        ids = [m.get("id") for m in doc.get("data") or () if isinstance(m, dict)]
        if status == 200 and ids and self.model not in ids:
            raise EndpointUnusableError(f"{redact(self.base_url)} does not list the model {self.model} (GET /models); "
                                        "check endpoint.model; nothing was sent")
        if status == 200 and ids:
            note = f"{self.ref}: serves {self.model}"
        else:
            note = f"{self.ref}: answers (HTTP {status} on GET /models; the model was not checked)"
        return EndpointCheck(note=note, model=self.model)

    def _local_check(self) -> EndpointCheck:
        config = self._local_router()
        if self.image_route is not None:  # the local router serves the model under the Hub's id
            return EndpointCheck(note=f"the built-in emulator's router ({self.ref}, text-to-image)", model=self.model)
        served = config.providers[0]
        self.meter.provider_prices[""] = self.meter.provider_prices[served.name] = TokenPrice(
            served.price_input, served.price_output)
        return EndpointCheck(note=f"the built-in emulator's router ({self.ref})", model=self.model)

    def _local_router(self) -> Any:
        from batchrun.endpoints.local import local_router

        price = self.meter.token_price
        return local_router(LOCAL_PROVIDER if self.provider in POLICIES else str(self.provider), self.model,
                            price_input=None if price is None else price.input_per_mtok,
                            price_output=None if price is None else price.output_per_mtok,
                            images=self.image_route is not None,
                            price_image=None if self.image_price is None else self.image_price.per_image)

    # ------------------------------------------------------------------ the job

    async def __aenter__(self) -> DataPlane:
        self.record.acquired_at = self.record.ready_at = time.monotonic()
        base, token = self.base_url, self._token
        if self._local:
            from batchrun.endpoints.local import start_local_router

            self._emulator, token = await start_local_router(self._local_router())
            base = self._emulator.router_url
        self.meter.start(1)
        model: str | None = self.body_model
        if self.image_route is not None:  # the provider's own base under the router: {origin}/{provider}[/v1]
            base = base.rstrip("/").removesuffix("/v1") + self.image_route.base
            model = model if self.image_route.model_in_body else None
        return DataPlane(url=base, token=token, send_token=self._send_token, model=model,
                         limits=self.limits,
                         token_name=f"the API key in {self._key_variable}" if self._key_variable else None)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.meter.stop()
        self.record.released_at = time.monotonic()
        self.record.final_action = "none"
        emulator, self._emulator = self._emulator, None
        if emulator is not None:
            await emulator.stop()

    def excuses(self, failure: RequestFailed) -> bool:
        return False

    async def up(self) -> BracketResult:
        """Nothing to hold up: a serverless target is used as it is."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_NOTHING_TO_BRACKET)

    async def down(self) -> BracketResult:
        """Nothing to put down: a serverless target is used as it is."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_NOTHING_TO_BRACKET)


async def _fetch_json(url: str, what: str, token: str | None, *, send_token: bool) -> tuple[int, dict[str, Any]]:
    """GET ``url`` for a check: its status and JSON object ({} unless a 200 holding one)."""
    from batchrun.transport import Request, TransportError, auth_headers, current_transport

    headers = auth_headers(url, token, send_token=send_token)
    try:
        answer = await current_transport().send(
            Request("GET", url, headers, timeout=CHECK_TIMEOUT_S, max_bytes=CHECK_MAX_BYTES))
    except TransportError as exc:
        detail = redact(f"{type(exc).__name__}: {exc}")[:300] or type(exc).__name__
        raise EndpointUnusableError(f"cannot reach {redact(what)} ({detail}): check the endpoint's url; "
                                    "nothing was sent") from None
    try:
        doc = json.loads(answer.body) if answer.status == 200 else {}
    except (UnicodeDecodeError, ValueError):
        doc = {}
    return answer.status, doc if isinstance(doc, dict) else {}


async def hub_image_mapping(model: str, token: str | None) -> dict[str, Mapping[str, Any]]:
    """The Hub's inferenceProviderMapping of ``model`` by provider, as huggingface_hub's client reads it
    (``GET {HF_ENDPOINT}/api/models/{model}?expand=inferenceProviderMapping``), in the Hub's order."""
    from huggingface_hub import constants

    from batchrun.tasks import join_url

    hub = constants.ENDPOINT  # huggingface_hub's, which honours HF_ENDPOINT
    status, doc = await _fetch_json(join_url(hub, f"/api/models/{model}") + "?expand=inferenceProviderMapping", hub,
                                    token, send_token=False)
    if status in (401, 403):
        from batchrun.transport import token_problem

        withheld = None if token is None else token_problem(hub)
        if token is None or withheld is not None:
            why = "no Hugging Face token was found" if token is None else f"the token was not sent ({withheld})"
            raise AuthError(f"the Hub answered HTTP {status} on GET /api/models/{model}, and {why}: set HF_TOKEN "
                            "or run `hf auth login`, then run the job again", status=status)
        raise AuthError(f"the Hub refused the Hugging Face token (HTTP {status} on GET /api/models/{model}): "
                        "check it, then run the job again", status=status)
    if status == 404:
        raise EndpointUnusableError(f"the Hub has no model {model} (GET /api/models/{model}): check endpoint.model; "
                                    "nothing was sent")
    if status != 200:
        raise EndpointUnusableError(f"the Hub at {redact(hub)} did not say which providers serve {model} "
                                    f"(HTTP {status} on GET /api/models/{model}); nothing was sent")
    return _image_mapping(doc.get("inferenceProviderMapping"))


def first_image_provider(model: str, mapping: Mapping[str, Mapping[str, Any]]) -> tuple[str, list[str]]:
    """``provider: auto`` for text-to-image: huggingface_hub's client takes the first provider of the mapping;
    batchrun takes the first that serves ``model`` for text-to-image, is not in error, and has a route
    batchrun builds. Returns it and the text-to-image providers passed over (why, each)."""
    from batchrun.tasks.provider_images import IMAGE_ROUTES

    passed: list[str] = []
    for name, entry in mapping.items():
        if entry.get("task") != "text-to-image":
            continue
        if entry.get("status") == "error":
            passed.append(f"{name} (status error)")
        elif name not in IMAGE_ROUTES:
            passed.append(f"{name} (a route batchrun does not build)")
        else:
            return name, passed
    why = ", ".join(passed) if passed else "the Hub maps no provider to it for text-to-image"
    raise EndpointUnusableError(f"provider auto: no provider serves {model} for text-to-image on a route batchrun "
                                f"builds ({', '.join(IMAGE_ROUTES)}): {why}; nothing was sent")


def _price(e: EndpointSpec) -> TokenPrice | None:
    price = e.price
    if price is None or price.input_per_mtok is None or price.output_per_mtok is None:
        return None
    return TokenPrice(price.input_per_mtok, price.output_per_mtok)


def _router_price(provider: Mapping[str, Any]) -> TokenPrice | None:
    """A provider's pricing as GET /v1/models gives it (USD per 1M tokens); None when missing."""
    pricing = provider.get("pricing")
    if not isinstance(pricing, Mapping):
        return None
    given, taken = pricing.get("input"), pricing.get("output")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in (given, taken)):
        return None
    return TokenPrice(float(given), float(taken))  # type: ignore[arg-type]


def _image_mapping(mapping: Any) -> dict[str, Mapping[str, Any]]:
    """The Hub's inferenceProviderMapping by provider: its dict form (model info) or its list form."""
    if isinstance(mapping, Mapping):
        return {str(p): m for p, m in mapping.items() if isinstance(m, Mapping)}
    if isinstance(mapping, list):
        return {str(m["provider"]): m for m in mapping if isinstance(m, Mapping) and m.get("provider")}
    return {}


def _statuses(providers: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['provider']} {p.get('status', 'unknown')}" for p in providers) or "no provider"
