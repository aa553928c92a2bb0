"""Running the emulator: in a test's event loop, in a background thread, or until cancelled."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from batchrun.emulator.config import DEFAULT_TOKEN, EmulatorConfig, EndpointConfig, Episode
from batchrun.emulator.control_plane import ControlPlane
from batchrun.emulator.data_plane import EndpointServer
from batchrun.emulator.hub import EmulatedHub
from batchrun.emulator.listen import listen
from batchrun.emulator.router import Router
from batchrun.emulator.state import EndpointState


class Emulator:
    """A local Inference Endpoints service: the control plane on one port, each endpoint on its own.

    ``async with Emulator(config) as emu:`` starts everything; ``emu.api_url`` is what to assign to
    ``huggingface_hub.constants.INFERENCE_ENDPOINTS_ENDPOINT``; ``emu.endpoint_url(ns, name)`` is an
    endpoint's data-plane base url. The control port also plays the Hub (``emu.hub``, see
    ``batchrun.emulator.hub``): ``emu.hub_url`` is what to give ``HF_ENDPOINT``.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._servers: dict[tuple[str, str], EndpointServer] = {}
        self._control = ControlPlane(self, config.token)
        self.hub = EmulatedHub(config.token)
        self._runner: web.AppRunner | None = None
        self.api_url = ""
        self.control_url = ""
        self.router: Router | None = None  # the Inference Providers router and batch API, when configured

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the control port and every endpoint's port; EmulatorError (and nothing left open) if one is busy."""
        app = self._control.app()
        self.hub.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        try:
            port = await listen(self._runner, self.config.host, self.config.control_port, what="",
                                advice="pick another with --port (or control_port in the config; 0 picks a free one)")
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            self.control_url = f"http://{host}:{port}"
            self.api_url = f"{self.control_url}/v2"
            self.hub.base_url = self.control_url
            for repo_id, folder in self.config.hub_datasets.items():
                self.hub.seed_folder(repo_id, folder)
            for endpoint in self.config.endpoints:
                await self.add_endpoint(endpoint)
            if self.config.router is not None:
                self.router = Router(self.config.router, token=self.config.token, host=self.config.host)
                await self.router.start()
                self.hub.provider_mapping = self.router.provider_mapping
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close every port and cancel background work."""
        for server in list(self._servers.values()):
            await server.stop()
        self._servers.clear()
        if self.router is not None:
            await self.router.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def hub_url(self) -> str:
        """The emulated Hub's base url: what ``HF_ENDPOINT`` (or ``output.push_to_hub.endpoint``) takes."""
        return self.control_url

    @property
    def router_url(self) -> str:
        """The router's base url, ending in ``/v1`` (chat, completions, models, files, batches)."""
        if self.router is None:
            raise KeyError("no router is configured (the emulator config's `router:` section)")
        return self.router.url

    def router_stats(self) -> dict[str, Any]:
        """The router's counters: per provider requests, 429s, tokens, cost; per batch status and billing."""
        if self.router is None:
            raise KeyError("no router is configured (the emulator config's `router:` section)")
        return self.router.stats()

    def provider_down(self, name: str, seconds: float, kind: str = "503") -> None:
        """A router provider answers ``kind`` (500/502/503/504 or ``reset``) for ``seconds`` from now (on the loop)."""
        if self.router is None:
            raise KeyError("no router is configured (the emulator config's `router:` section)")
        self.router.provider_down(name, seconds, kind)

    # ----- endpoints

    async def add_endpoint(self, config: EndpointConfig) -> EndpointServer:
        """Start serving one more endpoint (also used by the API's create)."""
        server = EndpointServer(config, token=self.config.token, host=self.config.host)
        await server.start(config.port)
        self._servers[(config.namespace, config.name)] = server
        return server

    async def remove_endpoint(self, namespace: str, name: str) -> None:
        """Stop serving an endpoint and forget it (the API's delete)."""
        server = self._servers.pop((namespace, name))
        await server.stop()

    def find(self, namespace: str, name: str) -> EndpointServer | None:
        """The endpoint's server, or None."""
        return self._servers.get((namespace, name))

    def servers(self) -> list[EndpointServer]:
        """Every endpoint's server, in creation order."""
        return list(self._servers.values())

    def template(self) -> EndpointConfig:
        """Settings for endpoints created through the API: the first configured endpoint's, or defaults."""
        if self.config.endpoints:
            return self.config.endpoints[0]
        return EndpointConfig(name="template")

    def _server(self, namespace: str, name: str) -> EndpointServer:
        server = self._servers.get((namespace, name))
        if server is None:
            raise KeyError(f"no emulated endpoint {namespace}/{name}")
        return server

    # ----- what tests read

    def endpoint_url(self, namespace: str, name: str) -> str:
        """The endpoint's data-plane base url (its own loopback port), whatever its state."""
        return self._server(namespace, name).state.base_url

    def state(self, namespace: str, name: str) -> EndpointState:
        """The live state object: .state, .ready_replicas, .target_replicas, .billable_seconds() ..."""
        return self._server(namespace, name).state

    @property
    def control_log(self) -> list[dict]:
        """Every control-plane call: t, method, path, status, and body for PUT and create."""
        return self._control.log

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot: per endpoint, data-plane counters, state and billable seconds."""
        endpoints = {}
        for server in self._servers.values():
            state = server.state
            endpoints[f"{state.namespace}/{state.name}"] = {
                **server.stats.to_dict(),
                "state": state.state,
                "ready_replicas": state.ready_replicas,
                "target_replicas": state.target_replicas,
                "billable_seconds": round(state.billable_seconds(), 6),
            }
        return {"endpoints": endpoints, "control_log": list(self._control.log)}

    # ----- test hooks: episodes on demand

    def inject(self, namespace: str, name: str, kind: str, seconds: float = 1.0) -> None:
        """Start an episode now (``outage_503``, ``lose_replica``, ``fail_endpoint``). Call on the loop."""
        self._server(namespace, name).play(Episode(kind=kind, at_s=0.0, seconds=seconds))

    def fail_endpoint(self, namespace: str, name: str) -> None:
        """The endpoint goes to ``failed`` now."""
        self.inject(namespace, name, "fail_endpoint")

    def lose_replica(self, namespace: str, name: str) -> None:
        """One ready replica disappears now and restarts."""
        self.inject(namespace, name, "lose_replica")

    def redeploy(self, namespace: str, name: str, *, revision: str, seed: int | None = None) -> None:
        """The endpoint serves another revision from now on (a redeploy), as GET /info and the control
        plane's ``model.revision`` say; ``seed`` plays new weights (other answers). Call on the loop."""
        server = self._server(namespace, name)
        config = dataclasses.replace(server.config, revision=revision,
                                     seed=server.config.seed if seed is None else seed)
        server.config = server.tgi.config = server.tei.config = server.state.config = config
        server.state.model["revision"] = config.model_sha


class EmulatorThread:
    """The same Emulator run by a background thread's event loop, for blocking callers (huggingface_hub).

    Attributes and hooks are those of the Emulator; the hooks are forwarded to the emulator's loop.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.emulator = Emulator(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def __enter__(self) -> EmulatorThread:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                await self.emulator.start()
            except BaseException as error:  # surfaced in the caller's thread
                failure.append(error)
                ready.set()
                return
            ready.set()
            try:
                await self._stopped.wait()
            finally:
                await self.emulator.stop()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="batchrun-emulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stopped is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` on the emulator's loop and return its result."""
        async def run() -> Any:
            return function(*args)
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    @property
    def api_url(self) -> str:
        return self.emulator.api_url

    @property
    def control_url(self) -> str:
        return self.emulator.control_url

    @property
    def control_log(self) -> list[dict]:
        return self.call(lambda: list(self.emulator.control_log))

    @property
    def hub_url(self) -> str:
        return self.emulator.hub_url

    @property
    def hub(self) -> _OnLoop:
        """The emulated Hub, its methods run on the emulator's loop (``emu.hub.race_next_commit(repo)``)."""
        return _OnLoop(self, self.emulator.hub)

    def endpoint_url(self, namespace: str, name: str) -> str:
        return self.emulator.endpoint_url(namespace, name)

    @property
    def router_url(self) -> str:
        return self.emulator.router_url

    def router_stats(self) -> dict[str, Any]:
        return self.call(self.emulator.router_stats)

    def provider_down(self, name: str, seconds: float, kind: str = "503") -> None:
        self.call(self.emulator.provider_down, name, seconds, kind)

    def state(self, namespace: str, name: str) -> EndpointState:
        return self.emulator.state(namespace, name)

    def stats(self) -> dict[str, Any]:
        return self.call(self.emulator.stats)

    def inject(self, namespace: str, name: str, kind: str, seconds: float = 1.0) -> None:
        self.call(self.emulator.inject, namespace, name, kind, seconds)

    def fail_endpoint(self, namespace: str, name: str) -> None:
        self.call(self.emulator.fail_endpoint, namespace, name)

    def lose_replica(self, namespace: str, name: str) -> None:
        self.call(self.emulator.lose_replica, namespace, name)

    def redeploy(self, namespace: str, name: str, *, revision: str, seed: int | None = None) -> None:
        self.call(lambda: self.emulator.redeploy(namespace, name, revision=revision, seed=seed))


class _OnLoop:
    """Forwards method calls to an object owned by the emulator's loop, from another thread."""

    def __init__(self, thread: EmulatorThread, target: Any) -> None:
        self._thread = thread
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not callable(attribute):
            return self._thread.call(lambda: getattr(self._target, name))
        return lambda *args, **kwargs: self._thread.call(lambda: attribute(*args, **kwargs))


async def serve(config: EmulatorConfig, *, ready: Callable[[Emulator], None] | None = None) -> None:
    """Run an emulator until cancelled; ``ready(emu)`` is called once every port listens."""
    async with Emulator(config) as emulator:
        if ready is not None:
            ready(emulator)
        await asyncio.Event().wait()


def describe(emulator: Emulator | EmulatorThread) -> str:
    """What ``batchrun emulate`` prints: the API base, the stats route and each endpoint's url. Never the token."""
    lines = [
        f"Inference Endpoints API: {emulator.api_url}",
        f"  point huggingface_hub at it: huggingface_hub.constants.INFERENCE_ENDPOINTS_ENDPOINT = {emulator.api_url!r}",
        f"Stats: {emulator.control_url}/emulator/stats",
        f"Hub API: {emulator.control_url}  (datasets: HF_ENDPOINT={emulator.control_url}; see docs/hub.md)",
        "Endpoints:",
    ]
    inner = emulator.emulator if isinstance(emulator, EmulatorThread) else emulator
    for server in inner.servers():
        state = server.state
        lines.append(f"  {state.namespace}/{state.name}  {server.config.task}  {server.config.model_id}  "
                     f"{state.base_url}  ({state.state})")
    if inner.router is not None:
        lines.append(f"Inference Providers router and batch API: {inner.router.url}  (stats: "
                     f"{inner.router.base_url}/emulator/router/stats)")
        for p in inner.router.config.providers:
            served = list(p.models)
            if p.image_models:  # served on the provider's own route, under its own ids
                images = [model if own == model else f"{model} as {own}" for model, own in p.image_models]
                served.append(f"text-to-image {', '.join(images)} at {inner.router.base_url}/{p.name}")
            lines.append(f"  {p.name}: {'; '.join(served)}")
    token = emulator.config.token
    if token is None:
        lines.append("Auth: none")
    elif token == DEFAULT_TOKEN:
        lines.append("Auth: Bearer <the emulator's default token, see docs/emulator.md>")
    else:
        lines.append("Auth: Bearer <the token of the config file>")
    return "\n".join(lines)
