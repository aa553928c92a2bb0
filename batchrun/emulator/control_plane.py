"""The Inference Endpoints API (``/v2/endpoint/...``) as huggingface_hub calls it, plus ``/emulator/stats``.

Every call is appended to the control log (time, method, path, status, and the body of PUT and
create), never with its Authorization header.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Protocol

from aiohttp import web

from batchrun.emulator.config import TASKS, EndpointConfig, is_commit_sha
from batchrun.emulator.data_plane import EndpointServer
from batchrun.emulator.state import TransitionRefused

NOT_FOUND = {"error": "Endpoint not found"}
#: The largest request body the control port reads: the emulated Hub's commits carry whole Parquet shards
#: (base64 in NDJSON), far past aiohttp's default of 1 MiB.
MAX_BODY_BYTES = 1024 * 1024 * 1024
UNAUTHORIZED = {"error": "Invalid credentials in Authorization header"}


class EndpointRegistry(Protocol):
    """What the control plane needs from the emulator that owns it: its endpoints' servers.

    ``batchrun.emulator.server.Emulator`` implements it; the control plane knows only this, so the
    two modules do not import each other.
    """

    def find(self, namespace: str, name: str) -> EndpointServer | None: ...

    def servers(self) -> list[EndpointServer]: ...

    async def add_endpoint(self, config: EndpointConfig) -> EndpointServer: ...

    async def remove_endpoint(self, namespace: str, name: str) -> None: ...

    def template(self) -> EndpointConfig: ...

    def stats(self) -> dict[str, Any]: ...


class ControlPlane:
    """The aiohttp application of the control port, bound to one emulator's endpoints."""

    def __init__(self, emulator: EndpointRegistry, token: str | None) -> None:
        self.emulator = emulator
        self._expected_auth = f"Bearer {token}" if token is not None else None
        self.log: list[dict] = []

    def app(self) -> web.Application:
        """The routes."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/v2/endpoint/{namespace}", self._list)
        app.router.add_post("/v2/endpoint/{namespace}", self._create)
        app.router.add_get("/v2/endpoint/{namespace}/{name}", self._get)
        app.router.add_put("/v2/endpoint/{namespace}/{name}", self._update)
        app.router.add_delete("/v2/endpoint/{namespace}/{name}", self._delete)
        app.router.add_post("/v2/endpoint/{namespace}/{name}/pause", self._pause)
        app.router.add_post("/v2/endpoint/{namespace}/{name}/resume", self._resume)
        app.router.add_post("/v2/endpoint/{namespace}/{name}/scale-to-zero", self._scale_to_zero)
        app.router.add_get("/emulator/stats", self._stats)
        return app

    # ----- plumbing

    def _record(self, request: web.Request, status: int, body: object = None) -> None:
        entry: dict = {"t": time.time(), "method": request.method, "path": request.path, "status": status}
        if body is not None:
            entry["body"] = body
        self.log.append(entry)

    def _answer(self, request: web.Request, status: int, payload: object, body: object = None) -> web.Response:
        self._record(request, status, body)
        return web.json_response(payload, status=status)

    def _refused(self, request: web.Request) -> web.Response | None:
        if self._expected_auth is not None and request.headers.get("Authorization") != self._expected_auth:
            return self._answer(request, 401, UNAUTHORIZED)
        return None

    def _find(self, request: web.Request) -> EndpointServer | None:
        return self.emulator.find(request.match_info["namespace"], request.match_info["name"])

    # ----- routes

    async def _list(self, request: web.Request) -> web.Response:
        if refusal := self._refused(request):
            return refusal
        namespace = request.match_info["namespace"]
        items = [s.state.to_api() for s in self.emulator.servers() if s.config.namespace == namespace]
        return self._answer(request, 200, {"items": items})

    async def _get(self, request: web.Request) -> web.Response:
        if refusal := self._refused(request):
            return refusal
        server = self._find(request)
        if server is None:
            return self._answer(request, 404, NOT_FOUND)
        return self._answer(request, 200, server.state.to_api())

    async def _update(self, request: web.Request) -> web.Response:
        if refusal := self._refused(request):
            return refusal
        body = await _json_body(request)
        if not isinstance(body, dict):
            return self._answer(request, 400, {"error": "Body must be a JSON object"}, body)
        server = self._find(request)
        if server is None:
            return self._answer(request, 404, NOT_FOUND, _without_secrets(body))
        server.state.update(body)
        return self._answer(request, 200, server.state.to_api(), _without_secrets(body))

    async def _transition(self, request: web.Request, action: str) -> web.Response:
        if refusal := self._refused(request):
            return refusal
        server = self._find(request)
        if server is None:
            return self._answer(request, 404, NOT_FOUND)
        # What the data plane was serving at that moment, for tests and post-mortems: a pause with requests
        # still inside (or arriving after it, answered 400) means a client sent after its pause.
        in_flight = server.stats.in_flight
        try:
            getattr(server.state, action)()
        except TransitionRefused as refused:
            self._record(request, refused.status)
            return web.Response(status=refused.status, text=json.dumps({"error": refused.message}),
                                content_type="application/json")
        response = self._answer(request, 200, server.state.to_api())
        self.log[-1]["data_in_flight"] = in_flight
        return response

    async def _pause(self, request: web.Request) -> web.Response:
        return await self._transition(request, "pause")

    async def _resume(self, request: web.Request) -> web.Response:
        return await self._transition(request, "resume")

    async def _scale_to_zero(self, request: web.Request) -> web.Response:
        return await self._transition(request, "scale_to_zero")

    async def _create(self, request: web.Request) -> web.Response:
        if refusal := self._refused(request):
            return refusal
        body = await _json_body(request)
        logged = _without_secrets(body) if isinstance(body, dict) else body
        try:
            config = self._config_from_create(request.match_info["namespace"], body)
        except (ValueError, KeyError, TypeError) as error:
            return self._answer(request, 400, {"error": f"Invalid endpoint definition: {error}"}, logged)
        assert isinstance(body, dict)  # _config_from_create refused anything else
        if self.emulator.find(config.namespace, config.name) is not None:
            return self._answer(request, 409, {"error": "Endpoint already exists"}, logged)
        server = await self.emulator.add_endpoint(config)
        # The rest of the model block (image, env, ...) is echoed; the revision shown is the resolved one.
        server.state.update({"model": {k: v for k, v in body["model"].items() if k != "revision"}})
        server.state.resume()
        return self._answer(request, 200, server.state.to_api(), logged)

    async def _delete(self, request: web.Request) -> web.Response:
        if refusal := self._refused(request):
            return refusal
        server = self._find(request)
        if server is None:
            return self._answer(request, 404, NOT_FOUND)
        await self.emulator.remove_endpoint(server.config.namespace, server.config.name)
        return self._answer(request, 200, {})

    async def _stats(self, request: web.Request) -> web.Response:
        # The stats list every prompt sent: they ask for the token like every other route.
        if refusal := self._refused(request):
            return refusal
        return web.json_response(self.emulator.stats())

    def _config_from_create(self, namespace: str, body: object) -> EndpointConfig:
        """An EndpointConfig for a POST /endpoint/{ns} body; timings come from the emulator's first endpoint."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        model = body["model"]
        compute = body.get("compute", {})
        scaling = compute.get("scaling", {})
        task = model.get("task") or "text-generation"
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not emulated (emulated: {', '.join(TASKS)})")
        template = self.emulator.template()
        return dataclasses.replace(
            template,
            name=body["name"], namespace=namespace, task=task, model_id=model["repository"],
            # A commit sha is served as given; a branch or tag (or none) resolves to the model's derived sha.
            revision=model.get("revision") if is_commit_sha(model.get("revision")) else None,
            framework=model.get("framework") or "pytorch",
            type=body.get("type", "protected"),
            vendor=body.get("provider", {}).get("vendor", "aws"),
            region=body.get("provider", {}).get("region", "us-east-1"),
            accelerator=compute.get("accelerator", "gpu"),
            instance_type=compute.get("instanceType", "nvidia-a10g"),
            instance_size=compute.get("instanceSize", "x1"),
            min_replica=int(scaling.get("minReplica") or 0), max_replica=int(scaling.get("maxReplica") or 1),
            scale_to_zero_timeout=float(scaling.get("scaleToZeroTimeout") or 15),
            initial_state="paused", episodes=(),
        )


async def _json_body(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError:
        return None


def _without_secrets(body: dict) -> dict:
    # The control log may be printed by tests; secret values sent to the API stay out of it.
    model = body.get("model")
    if isinstance(model, dict) and "secrets" in model:
        return {**body, "model": {**model, "secrets": dict.fromkeys(model["secrets"], "***")}}
    return body
