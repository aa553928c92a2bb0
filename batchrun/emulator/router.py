"""The Inference Providers router on its own loopback port: OpenAI-compatible chat, completions and models.

``model`` is ``ORG/NAME`` (the first live provider, in the configured order, that serves it and is not
down), ``ORG/NAME:PROVIDER`` (pinned) or ``ORG/NAME:fastest|cheapest|preferred``. The provider that
served an answer is named in the ``x-inference-provider`` response header, as the real router does.
Every inference request goes through, in order: the bearer token (401), the body (400), the model
(404 unknown, 400 not served by the pinned provider), the provider's outage (its 5xx or a reset), its
random 429s (no Retry-After), the request (TGI's validation, as a 400), its request and token limits
(429 ``rate_limit_exceeded``), then the TGI emulator's generator, after the provider's latency.

The same port serves text-to-image on hf-inference's, together's and nscale's own routes
(``batchrun.emulator.router_images``), and the batch API (``batchrun.emulator.batch_api``), whose answers come from
:meth:`Router.offline_answer`: the same generator, so batch and online answers are equal.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from batchrun.emulator import textgen
from batchrun.emulator.batch_api import BatchApi
from batchrun.emulator.config import EndpointConfig
from batchrun.emulator.data_plane import _reset_connection
from batchrun.emulator.listen import listen
from batchrun.emulator.openai_errors import openai_error
from batchrun.emulator.rate_limits import RateWindow
from batchrun.emulator.replies import Reply, json_reply
from batchrun.emulator.router_config import ProviderConfig, RouterConfig
from batchrun.emulator.router_images import RouterImages
from batchrun.emulator.tgi import Invalid, Prepared, TgiModel, chat_prompt
from batchrun.emulator.vision import ImageRejected

PROVIDER_HEADER = "x-inference-provider"
POLICIES = ("auto", "preferred", "fastest", "cheapest")
_FINISH = {"eos_token": "stop", "length": "length", "stop_sequence": "stop"}
_RESET = web.RequestKey("batchrun_router_reset", bool)  # the request's connection was reset
_STATUS_PHRASE = {"500": "Internal Server Error", "502": "Bad Gateway", "503": "Service Unavailable",
                  "504": "Gateway Timeout"}


class ProviderState:
    """One provider's live state: its windows, its outages, its prompt cache, its counters."""

    def __init__(self, config: ProviderConfig, host_seed: int = 0) -> None:
        self.config = config
        self.requests = RateWindow(config.rpm, config.window_s)
        self.tokens = RateWindow(config.tpm, config.window_s)
        self.outages: list[tuple[float, float, str]] = []  # (start, end, kind) on the loop clock
        self._prefixes: set[bytes] = set()
        self._draws: Counter[bytes] = Counter()
        self._host_seed = host_seed
        self.models: dict[str, TgiModel] = {}
        # Counters.
        self.by_status: Counter[str] = Counter()
        self.rate_limited = 0  # 429s of its request or token limits
        self.random_429 = 0  # 429s drawn from rate_429
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.cost_usd = 0.0
        self.images = 0  # text-to-image answers (batchrun.emulator.router_images)
        self.tokens_by_minute: Counter[int] = Counter()  # minute since the router's first request -> tokens

    def model(self, model_id: str) -> TgiModel:
        """The TGI emulator's model for ``model_id``, sized by this provider's context length."""
        if model_id not in self.models:
            cfg = self.config
            endpoint = EndpointConfig(name=cfg.name, model_id=model_id, max_total_tokens=cfg.context_length,
                                      max_input_tokens=cfg.context_length - 1, latency_base_s=cfg.latency_s,
                                      latency_per_token_s=cfg.latency_per_token_s)
            self.models[model_id] = TgiModel(endpoint, _no_images)
        return self.models[model_id]

    def outage(self, now: float) -> str | None:
        """The kind of the outage under way, or None."""
        for start, end, kind in self.outages:
            if start <= now < end:
                return kind
        return None

    def draw_429(self, body: bytes) -> bool:
        """Whether this request meets one of the provider's random 429s (seeded by the body and its repeats)."""
        if self.config.rate_429 <= 0:
            return False
        digest = hashlib.blake2b(body, digest_size=16).digest()
        seen = self._draws[digest]
        self._draws[digest] += 1
        material = (self.config.seed.to_bytes(8, "big", signed=True) + self.config.name.encode() + digest
                    + seen.to_bytes(4, "big"))
        roll = int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big") / 2**64
        return roll < self.config.rate_429

    def cached(self, messages: list) -> int:
        """Prompt tokens of the longest message prefix this provider saw before (its prompt cache); remembers these."""
        cached = 0
        for k in range(1, len(messages) + 1):
            key = hashlib.blake2b(json.dumps(messages[:k], sort_keys=True).encode(), digest_size=16).digest()
            if key in self._prefixes:
                cached = textgen.count_tokens(chat_prompt(messages[:k]))
            self._prefixes.add(key)
        return cached

    def rate_headers(self, now: float) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers, if this provider sends them."""
        if not self.config.rate_limit_headers:
            return {}
        return {**self.requests.headers("requests", now), **self.tokens.headers("tokens", now)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": sum(self.by_status.values()),
            "by_status": dict(self.by_status),
            "rate_limited_429": self.rate_limited,
            "random_429": self.random_429,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "images": self.images,
            "cost_usd": round(self.cost_usd, 9),
            "tokens_by_minute": dict(self.tokens_by_minute),
        }


async def _no_images(url: str) -> Any:
    raise ImageRejected("the emulated router serves text models only")


class Router:
    """The router's application: routes, providers, stats. ``start`` opens its port; ``url`` ends in ``/v1``."""

    def __init__(self, config: RouterConfig, *, token: str | None, host: str) -> None:
        self.config = config
        self.host = host
        self._expected_auth = f"Bearer {token}" if token is not None else None
        self.providers = {p.name: ProviderState(p) for p in config.providers}
        self.batches = BatchApi(self, config.batch)
        self.images = RouterImages(self)
        self._runner: web.AppRunner | None = None
        self._first_request: float | None = None  # loop time
        self._ids = itertools.count(1)
        self.base_url = ""
        self.by_route: Counter[tuple[str, str]] = Counter()

    @property
    def url(self) -> str:
        """What ``InferenceClient(base_url=...)`` or an OpenAI client takes: the base url ending in ``/v1``."""
        return f"{self.base_url}/v1"

    async def start(self) -> None:
        app = web.Application(client_max_size=self.config.batch.max_file_bytes + 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/emulator/router/stats", self._stats)
        self.batches.add_routes(app)
        self.images.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        await self._runner.setup()
        try:
            port = await listen(self._runner, self.host, self.config.port, what="router: ",
                                advice="give the router another port (router.port; 0 picks a free one)")
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----- hooks and stats

    def provider_down(self, name: str, seconds: float, kind: str = "503") -> None:
        """The provider answers ``kind`` (a 5xx or ``reset``) to every request for ``seconds`` from now."""
        now = asyncio.get_running_loop().time()
        self.providers[name].outages.append((now, now + seconds, kind))

    def provider_mapping(self, model: str) -> dict[str, dict[str, str]]:
        """The Hub's ``inferenceProviderMapping`` of ``model`` (its dict form): per provider that serves it, the
        provider's id for it, the task and the status. Empty when no provider serves it."""
        mapping: dict[str, dict[str, str]] = {}
        for p in self.providers.values():
            status = p.config.status if p.config.status in ("live", "staging", "error") else None
            image = next((own for hf_id, own in p.config.image_models if hf_id == model), None)
            if status is None or (image is None and model not in p.config.models):
                continue
            mapping[p.config.name] = {"status": status, "providerId": image or model,
                                      "task": "text-to-image" if image is not None else "conversational"}
        return mapping

    def stats(self) -> dict[str, Any]:
        """Per provider: requests by status, 429s (limits and random), tokens, cost, tokens per minute; batches."""
        by_route: dict[str, dict[str, int]] = {}
        for (route, status), count in sorted(self.by_route.items()):
            by_route.setdefault(route, {})[status] = count
        return {"by_route": by_route, "providers": {n: p.to_dict() for n, p in self.providers.items()},
                "batches": self.batches.stats()}

    # ----- the front door

    def authorized(self, request: web.Request) -> bool:
        return self._expected_auth is None or request.headers.get("Authorization") == self._expected_auth

    def unauthorized(self) -> web.Response:
        return openai_error(401, "Invalid credentials in Authorization header", "invalid_request_error",
                            "invalid_api_key").to_response()

    def resolve(self, model: str, route: str) -> ProviderState | Reply:
        """The provider that serves ``model`` (``ORG/NAME[:PROVIDER|:POLICY]``) on ``route``, or the error reply."""
        base, _, suffix = model.partition(":")
        serving = [p for p in self.providers.values() if base in p.config.models]
        if not serving:
            return openai_error(404, f"The model `{base}` does not exist or you do not have access to it.",
                                "invalid_request_error", "model_not_found", "model")
        if route == "completions":
            serving = [p for p in serving if p.config.completions]
        if suffix and suffix not in POLICIES:
            pinned = self.providers.get(suffix)
            if pinned is None or pinned not in serving:
                return openai_error(400, f"Model not supported by provider {suffix}", "invalid_request_error",
                                    "model_not_supported", "model")
            return pinned
        now = asyncio.get_running_loop().time()
        live = [p for p in serving if p.config.status == "live"]
        up = [p for p in live if p.outage(now) is None] or live
        if not up:
            return openai_error(400, f"The requested model '{base}' is not supported by any provider you have "
                                     "enabled.", "invalid_request_error", "model_not_supported", "model")
        if suffix == "fastest":
            return min(up, key=lambda p: p.config.latency_s)
        if suffix == "cheapest":
            return min(up, key=lambda p: p.config.price_input + p.config.price_output)
        return up[0]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._inference(request, "completions")

    async def _inference(self, request: web.Request, route: str) -> web.StreamResponse:
        name = f"POST /v1/{'chat/completions' if route == 'chat' else 'completions'}"
        return await self.counted(request, name, self._answer(request, route))

    async def counted(self, request: web.Request, name: str,
                      answer: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """``answer``, counted under route ``name`` by its status (``reset`` for a reset connection)."""
        status: int | str = 500
        try:
            response = await answer
            status = "reset" if request.get(_RESET) else response.status
            return response
        finally:
            self.by_route[(name, str(status))] += 1

    def fault_response(self, request: web.Request, provider: ProviderState, body: bytes,
                       headers: dict[str, str], now: float) -> web.StreamResponse | None:
        """The provider's fault for this request as a response (its connection reset, if that is the
        fault), or None when the provider answers normally."""
        fault = self.fault(provider, body, headers, now)
        if isinstance(fault, str):  # "reset"
            request[_RESET] = True
            _reset_connection(request)
            return web.Response(status=500)  # never reaches the client: the transport is gone
        return None if fault is None else fault.to_response()

    async def _answer(self, request: web.Request, route: str) -> web.StreamResponse:
        if not self.authorized(request):
            return self.unauthorized()
        body = await request.read()
        loop = asyncio.get_running_loop()
        now = self.begin()
        payload = _payload(body)
        if isinstance(payload, Reply):
            return payload.to_response()
        chosen = self.resolve(payload["model"], route)
        if isinstance(chosen, Reply):
            return chosen.to_response()
        provider = chosen
        headers = {PROVIDER_HEADER: provider.config.name}
        faulty = self.fault_response(request, provider, body, headers, now)
        if faulty is not None:
            return faulty
        base = payload["model"].partition(":")[0]
        prepared = await _prepare(provider.model(base), payload, route)
        if isinstance(prepared, Reply):
            provider.by_status[str(prepared.status)] += 1
            prepared.headers.update(headers)
            return prepared.to_response()
        max_tokens = payload.get("max_tokens")
        cost = prepared.input_tokens + (max_tokens if isinstance(max_tokens, int) else 0)
        refusal = self.limit_reply(provider, cost, now)
        if refusal is not None:
            refusal.headers.update(headers)
            return refusal.to_response()
        provider.requests.take(1, now)
        provider.tokens.take(cost, now)
        headers.update(provider.rate_headers(now))
        model = provider.model(base)
        generation = model.run(prepared)
        first, per_token = model.latency(prepared, len(generation.tokens))
        if first + per_token * len(generation.tokens) > 0:
            await asyncio.sleep(first + per_token * len(generation.tokens))
        answer = self._body(provider, base, route, payload, prepared, generation)
        provider.by_status["200"] += 1
        minute = int((loop.time() - (self._first_request or now)) // 60)
        provider.tokens_by_minute[minute] += answer["usage"]["total_tokens"]
        return json_reply(answer, headers=headers).to_response()

    def begin(self) -> float:
        """The loop's time now; the first inference request starts the configured outages' clock."""
        now = asyncio.get_running_loop().time()
        if self._first_request is None:
            self._first_request = now
            for provider in self.providers.values():
                provider.outages += [(now + o.at_s, now + o.at_s + o.seconds, o.kind) for o in provider.config.outages]
        return now

    def fault(self, provider: ProviderState, body: bytes, headers: dict[str, str], now: float) -> Reply | str | None:
        """The provider's outage (its 5xx reply, or ``"reset"``: reset the connection) or random 429, or None."""
        outage = provider.outage(now)
        if outage is not None:
            provider.by_status[outage] += 1
            if outage == "reset":
                return outage
            return openai_error(int(outage), f"{outage} {_STATUS_PHRASE[outage]}: the provider "
                                f"{provider.config.name} is unavailable", "server_error", headers=headers)
        if provider.draw_429(body):
            provider.random_429 += 1
            provider.by_status["429"] += 1
            return openai_error(429, f"{provider.config.name} is overloaded: too many requests, try again later",
                                "rate_limit_exceeded", "rate_limit_exceeded",
                                headers={**headers, **provider.rate_headers(now)})
        return None

    def limit_reply(self, provider: ProviderState, cost: int, now: float) -> Reply | None:
        """The 429 of a request over the provider's request or token limit, or None."""
        cfg = provider.config
        if not provider.requests.fits(1, now):
            window = provider.requests
            what = f"requests per {cfg.window}: Limit {cfg.rpm}, Used {window.used}, Requested 1"
        elif not provider.tokens.fits(cost, now):
            window = provider.tokens
            what = f"tokens per {cfg.window}: Limit {cfg.tpm}, Used {window.used}, Requested {cost}"
        else:
            return None
        provider.rate_limited += 1
        provider.by_status["429"] += 1
        wait = window.reset_s(now)
        headers = provider.rate_headers(now)
        if cfg.retry_after in ("seconds", "both"):
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        if cfg.retry_after in ("ms", "both"):
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        return openai_error(429, f"Rate limit reached on {what}. Please try again in {wait:.3f}s.", "requests"
                            if window is provider.requests else "tokens", "rate_limit_exceeded", headers=headers)

    def _body(self, provider: ProviderState, base: str, route: str, payload: dict, prepared: Prepared,
              generation: textgen.Generation, *, count: bool = True) -> dict[str, Any]:
        """The OpenAI answer of a generation (usage with cached and reasoning tokens where they apply).

        ``count``: bill it to the provider now at the online price (a batch bills its requests when it delivers)."""
        completion = len(generation.tokens)
        usage: dict[str, Any] = {"prompt_tokens": prepared.input_tokens, "completion_tokens": completion,
                                 "total_tokens": prepared.input_tokens + completion}
        if provider.config.cached_tokens and route == "chat":
            cached = provider.cached(payload["messages"])
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
            if count:
                provider.cached_tokens += cached
        if base in self.config.reasoning_models:
            usage["completion_tokens_details"] = {"reasoning_tokens": completion // 3}
        if count:
            provider.prompt_tokens += prepared.input_tokens
            provider.completion_tokens += completion
            provider.cost_usd += (prepared.input_tokens * provider.config.price_input
                                  + completion * provider.config.price_output) / 1e6
        finish = _FINISH[generation.finish_reason]
        number = next(self._ids)
        if route == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": generation.text},
                                      "logprobs": None, "finish_reason": finish}
            kind, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": finish}
            kind, prefix = "text_completion", "cmpl"
        return {"id": f"{prefix}-{number:012x}", "object": kind, "created": int(time.time()), "model": base,
                "choices": [choice], "usage": usage}

    async def offline_answer(self, body: dict, route: str) -> tuple[int, dict[str, Any], ProviderState | None]:
        """A batch request's answer: (status code, body, provider). Same generator as online, no limits or latency."""
        payload = _payload(json.dumps(body).encode())
        if isinstance(payload, Reply):
            return payload.status, json.loads(payload.body), None
        chosen = self.resolve(payload["model"], route)
        if isinstance(chosen, Reply):
            return chosen.status, json.loads(chosen.body), None
        base = payload["model"].partition(":")[0]
        prepared = await _prepare(chosen.model(base), payload, route)
        if isinstance(prepared, Reply):
            return prepared.status, json.loads(prepared.body), chosen
        generation = chosen.model(base).run(prepared)
        answer = self._body(chosen, base, route, payload, prepared, generation, count=False)
        return 200, answer, chosen

    # ----- models and stats

    async def _models(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return self.unauthorized()
        created = int(time.time())
        data = []
        for model in self.config.models():
            providers = [{
                "provider": p.config.name, "status": p.config.status, "context_length": p.config.context_length,
                "pricing": {"input": p.config.price_input, "output": p.config.price_output},
                "supports_tools": p.config.supports_tools,
                "supports_structured_output": p.config.supports_structured_output,
            } for p in self.providers.values() if model in p.config.models]
            data.append({"id": model, "object": "model", "created": created, "owned_by": model.split("/")[0],
                         "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                         "providers": providers})
        self.by_route[("GET /v1/models", "200")] += 1
        return json_reply({"object": "list", "data": data}).to_response()

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request):
            return self.unauthorized()
        return json_reply(self.stats()).to_response()


def _payload(body: bytes) -> dict | Reply:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    if not isinstance(payload, dict):
        return openai_error(400, "The request body must be a JSON object.", "invalid_request_error")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        return openai_error(400, "you must provide a model parameter", "invalid_request_error", param="model")
    if payload.get("stream"):
        return openai_error(400, "streaming is not emulated by the router", "invalid_request_error", param="stream")
    return payload


async def _prepare(model: TgiModel, payload: dict, route: str) -> Prepared | Reply:
    """TGI's validation of the request; its refusals become OpenAI 400s."""
    required = "messages" if route == "chat" else "prompt"
    if required not in payload:
        return openai_error(400, f"Missing required parameter: '{required}'.", "invalid_request_error",
                            param=required)
    try:
        if route == "chat":
            return await model.prepare_chat(payload)
        return await model.prepare_completions(payload)
    except Invalid as invalid:
        try:
            message = json.loads(invalid.reply.body).get("error", "")
        except (ValueError, AttributeError):
            message = invalid.reply.body.decode(errors="replace")
        return openai_error(400, str(message), "invalid_request_error")
