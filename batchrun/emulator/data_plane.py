"""One emulated endpoint on its own loopback port: the proxy in front, then TGI or the toolkit.

Every inference request goes through the same front door, in this order (its body is read, and its
prompt counted in the stats, whatever the outcome):
1. the bearer token (protected endpoints, when the emulator has a token): a bare 401;
2. the endpoint's state, as the Inference Endpoints proxy answers it: paused -> 400, failed -> 503,
   no ready replica (pending, initializing, scaled to zero, a replica restarting) -> 503, and a
   scaled-to-zero endpoint is woken; ``X-Scale-Up-Timeout: <s>`` holds the request instead;
3. a scripted outage -> 503;
4. the drawn fault, if any (429, 5xx, reset, hang);
5. capacity: TGI admits max_concurrent_requests per ready replica, then answers an immediate 429
   ``Model is overloaded``; TEI counts inputs against the same limit (batchrun.emulator.tei);
   text-to-image queues for a free replica;
6. the model, whose 200 may still be replaced by an error body or cut in half by a fault.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from batchrun.emulator import vision
from batchrun.emulator.config import TEI_TASKS, EndpointConfig, Episode
from batchrun.emulator.faults import EpisodeScript, FaultDice
from batchrun.emulator.listen import listen
from batchrun.emulator.replies import Reply, json_reply, text_reply, tgi_error
from batchrun.emulator.state import ACTIVE_STATES, EndpointState
from batchrun.emulator.stats import EndpointStats
from batchrun.emulator.tei import ERROR_BODY as TEI_ERROR_BODY
from batchrun.emulator.tei import TeiError, TeiModel, Unparsable, fault_reply, overloaded, texts_of
from batchrun.emulator.text_to_image import ImageModel
from batchrun.emulator.text_to_image import error as image_error
from batchrun.emulator.tgi import Invalid, TgiModel, prompt_of

PAUSED_TEXT = "Bad Request: The endpoint is paused, ask a maintainer to restart it"
_IDLE_CHECK_S = 1.0


class EndpointServer:
    """An endpoint's data plane and its live state, served on ``base_url``."""

    def __init__(self, config: EndpointConfig, *, token: str | None, host: str) -> None:
        self.config = config
        self.host = host
        self.stats = EndpointStats()
        self.dice = FaultDice(config.faults, config.fault_seed)
        self.episodes = EpisodeScript(config.episodes, self.play)
        self.outage_until = 0.0
        self.admitted = 0  # TGI requests inside the model (capacity is counted on these)
        self.drawing = 0  # text-to-image requests holding a replica
        self._expected_auth = f"Bearer {token}" if token is not None and config.type != "public" else None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._idle_task: asyncio.Task | None = None
        self.state: EndpointState  # set in start(), once the port is known
        self.tgi = TgiModel(config, self._fetch_image)
        self.images = ImageModel(config)
        self.tei = TeiModel(config)

    # ----- lifecycle of the server itself

    async def start(self, port: int = 0) -> None:
        """Listen on a loopback port and create the endpoint's state."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        if self.config.task == "text-to-image":
            app.router.add_post("/", self._image)
            app.router.add_get("/info", self._no_info)  # the toolkit has no /info: a 404 past the proxy
        elif self.config.task in TEI_TASKS:
            self._add_tei_routes(app)
        else:
            app.router.add_post("/", self._generate_list)
            app.router.add_post("/generate", self._generate)
            app.router.add_post("/generate_stream", self._generate_stream)
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/v1/completions", self._completions)
            app.router.add_get("/info", self._info)
            app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/", self._health)
        # handler_cancellation: a client that gives up on a hung request frees it at once.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
        await self._runner.setup()
        try:
            bound = await listen(self._runner, self.host, port,
                                 what=f"endpoint {self.config.namespace}/{self.config.name}: ",
                                 advice="give the endpoint another port (its `port` key; 0 picks a free one)")
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.state = EndpointState(self.config, f"http://{host}:{bound}")
        self._idle_task = asyncio.get_running_loop().create_task(self._idle_watch())

    async def stop(self) -> None:
        """Stop serving and cancel background work."""
        self.episodes.cancel()
        if self._idle_task is not None:
            self._idle_task.cancel()
        self.state.close()
        if self._runner is not None:
            await self._runner.cleanup()
        # After the handlers ended: one still running could otherwise open the image-fetch session anew.
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    async def _idle_watch(self) -> None:
        while True:
            timeout_s = self.state.scale_to_zero_timeout * 60
            await asyncio.sleep(min(_IDLE_CHECK_S, max(0.005, timeout_s / 4)))
            self.state.idle_check(self.stats.in_flight)

    # ----- episodes

    def play(self, episode: Episode) -> None:
        """Start a scripted incident now."""
        if episode.kind == "outage_503":
            self.outage_until = max(self.outage_until, asyncio.get_running_loop().time() + episode.seconds)
        elif episode.kind == "lose_replica":
            self.state.lose_replica()
        elif episode.kind == "fail_endpoint":
            self.state.fail("Endpoint failed: the container exited unexpectedly")

    # ----- the front door

    def _authorized(self, request: web.Request) -> bool:
        return self._expected_auth is None or request.headers.get("Authorization") == self._expected_auth

    async def _proxy_gate(self, request: web.Request) -> Reply | None:
        state = self.state
        if state.state == "paused":
            return text_reply(400, PAUSED_TEXT)
        if state.state in ("failed", "updateFailed"):
            return text_reply(503, f"Service Unavailable: the endpoint is {state.state}")
        if state.ready_replicas == 0 or state.state not in ACTIVE_STATES:
            state.wake()
            hold = request.headers.get("X-Scale-Up-Timeout")
            try:
                hold_s = float(hold) if hold else 0.0
            except ValueError:
                hold_s = 0.0
            if hold_s <= 0 or not await state.wait_until(
                    lambda: state.ready_replicas > 0 and state.state in ACTIVE_STATES, hold_s):
                return text_reply(503, "Service Unavailable: the endpoint is starting, retry later")
        if self.outage_until and asyncio.get_running_loop().time() < self.outage_until:
            return text_reply(503, "Service Unavailable")
        return None

    async def _front_door(self, request: web.Request, route: str,
                          answer: Callable[[web.Request, bytes], Awaitable[Reply | web.StreamResponse]],
                          ) -> web.StreamResponse:
        """Run one inference request through auth, state, faults and capacity; count it."""
        if not self._authorized(request):
            self.stats.count_only(route, 401)
            return web.Response(status=401)
        stats = self.stats
        stats.started()
        status: int | str = 500
        try:
            self.state.note_activity()
            self.episodes.on_request(stats.requests)
            body = await request.read()
            refusal = await self._proxy_gate(request)
            if refusal is not None:
                self._count_prompt(body)
                status = refusal.status
                return refusal.to_response()
            fault = self.dice.draw(body)
            request[_FAULT] = fault
            if fault is not None and fault not in _LATE_FAULTS:
                # The model never sees this request, so its prompt is counted here (the model counts the rest).
                self._count_prompt(body)
                if fault in ("reset", "hang"):
                    status = fault
                early = await self._early_fault(request, fault)
                if early is not None:
                    status = early.status
                    return early.to_response()
                if fault in ("reset", "hang"):
                    return web.Response(status=500)  # never reaches the client: the transport is gone
            response = await answer(request, body)
            if isinstance(response, Reply):
                response = self._late_fault(response, fault).to_response()
            status = response.status
            return response
        except asyncio.CancelledError:
            # The client went away (handler cancellation): a hang keeps its name, anything else is "cancelled".
            status = status if status == "hang" else "cancelled"
            raise
        finally:
            stats.finished(route, status)

    def _count_prompt(self, body: bytes) -> None:
        if self.config.task in TEI_TASKS:
            for text in texts_of(body):
                self.stats.prompt(text)
            return
        prompt = prompt_of(body)
        if prompt:
            self.stats.prompt(prompt)

    async def _early_fault(self, request: web.Request, fault: str) -> Reply | None:
        """The answer of a fault that strikes before the model runs; None for the others (and after a reset)."""
        if fault in _LATE_FAULTS:
            return None
        text_to_image = self.config.task == "text-to-image"
        tei_reply = fault_reply(self.tei, fault, request.path) if self.config.task in TEI_TASKS else None
        if tei_reply is not None:
            if fault == "429":
                tei_reply.headers["Retry-After"] = f"{self.config.faults.retry_after_s:g}"
            return tei_reply
        if fault in ("429", "429_no_retry_after"):
            reply = image_error("Model is overloaded") if text_to_image else tgi_error(429, "overloaded",
                                                                                        "Model is overloaded")
            reply.status = 429
            if fault == "429":
                reply.headers["Retry-After"] = f"{self.config.faults.retry_after_s:g}"
            return reply
        if fault == "500":
            if text_to_image:
                return json_reply({"error": "Internal Server Error"}, 500)
            return tgi_error(500, "incomplete_generation", "Incomplete generation")
        if fault in ("502", "503", "504"):
            phrase = {"502": "Bad Gateway", "503": "Service Unavailable", "504": "Gateway Timeout"}[fault]
            return text_reply(int(fault), f"{fault} {phrase}")
        if fault == "hang":
            await asyncio.sleep(self.config.faults.hang_s)
        _reset_connection(request)
        return None

    def _late_fault(self, reply: Reply, fault: str | None) -> Reply:
        if fault is None or reply.status != 200:
            return reply
        if fault == "error_body":
            if self.config.task == "text-to-image":
                return Reply(200, b'{"error":"CUDA out of memory"}', "application/json", reply.headers)
            if self.config.task in TEI_TASKS:
                return Reply(200, TEI_ERROR_BODY, "application/json", reply.headers)
            return Reply(200, b'{"error":"Request failed during generation: Server error: CUDA out of memory",'
                              b'"error_type":"generation"}', "application/json", reply.headers)
        if fault == "truncated":
            return Reply(200, reply.body[: len(reply.body) // 2], reply.content_type, reply.headers)
        return reply

    # ----- TGI routes

    async def _generate_list(self, request: web.Request) -> web.StreamResponse:
        return await self._front_door(request, "POST /", self._answer_generate_list)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._front_door(request, "POST /generate", self._answer_generate)

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._front_door(request, "POST /generate_stream", self._answer_generate_stream)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._front_door(request, "POST /v1/chat/completions", self._answer_chat)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._front_door(request, "POST /v1/completions", self._answer_completions)

    async def _answer_completions(self, request: web.Request, body: bytes):
        return await self._tgi(request, body, "prompt", "completions")

    async def _answer_generate_list(self, request: web.Request, body: bytes):
        return await self._tgi(request, body, "inputs", "list")

    async def _answer_generate(self, request: web.Request, body: bytes):
        return await self._tgi(request, body, "inputs", "object")

    async def _answer_generate_stream(self, request: web.Request, body: bytes):
        return await self._tgi(request, body, "inputs", "stream")

    async def _answer_chat(self, request: web.Request, body: bytes):
        return await self._tgi(request, body, "messages", "chat")

    async def _tgi(self, request: web.Request, body: bytes, required: str, shape: str):
        try:
            payload = self.tgi.parse_body(body, required)
            if shape == "chat":
                prepared = await self.tgi.prepare_chat(payload)
            elif shape == "completions":
                prepared = await self.tgi.prepare_completions(payload)
            else:
                prepared = await self.tgi.prepare_generate(payload)
        except Invalid as invalid:
            return invalid.reply
        prepared.broken = request.get(_FAULT) == "invalid_json"
        self.stats.prompt(prepared.prompt)
        capacity = self.state.ready_replicas * self.config.max_concurrent_requests
        if self.admitted >= capacity:
            return tgi_error(429, "overloaded", "Model is overloaded")
        self.admitted += 1
        try:
            if shape == "chat":
                if payload.get("stream"):
                    return await self.tgi.stream_chat(request, payload, prepared)
                return await self.tgi.chat(payload, prepared)
            if shape == "completions":
                return await self.tgi.completions(payload, prepared)
            if shape == "stream" or payload.get("stream"):
                return await self.tgi.stream_generate(request, payload, prepared)
            return await self.tgi.generate(payload, prepared, as_list=shape == "list")
        finally:
            self.admitted -= 1

    async def _fetch_image(self, url: str):
        if url.startswith("data:"):
            return await vision.load_image(url)
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return await vision.load_image(url, self._http)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return await self._plain_route(request, "GET /info", lambda: json_reply(self.tgi.info()))

    async def _no_info(self, request: web.Request) -> web.StreamResponse:
        return await self._plain_route(request, "GET /info", lambda: text_reply(404, "Not Found"))

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        def metrics() -> Reply:
            ok = sum(n for (route, status), n in self.stats.by_route_status.items() if status == "200")
            lines = [f"tgi_request_count {self.stats.requests}", f"tgi_request_success {ok}",
                     f"tgi_batch_current_size {self.admitted}", "tgi_queue_size 0"]
            return Reply(200, ("\n".join(lines) + "\n").encode(), "text/plain")
        return await self._plain_route(request, "GET /metrics", metrics)

    # ----- text-to-image route

    async def _image(self, request: web.Request) -> web.StreamResponse:
        return await self._front_door(request, "POST /", self._answer_image)

    async def _answer_image(self, request: web.Request, body: bytes):
        parsed = self.images.parse(body)
        if isinstance(parsed, Reply):
            return parsed
        payload, prompt = parsed
        self.stats.prompt(prompt)
        state = self.state
        # One image at a time per ready replica; the rest wait their turn (the toolkit's queue).
        if self.drawing >= state.ready_replicas:
            await state.wait_until(lambda: self.drawing < state.ready_replicas, self.config.faults.hang_s + 3600)
        self.drawing += 1
        try:
            return await self.images.render(payload, request.headers.get("Accept", ""))
        finally:
            self.drawing -= 1
            state.poke()

    # ----- TEI routes

    def _add_tei_routes(self, app: web.Application) -> None:
        routes = {"/embed": "embed", "/v1/embeddings": "openai", "/embeddings": "openai", "/rerank": "rerank",
                  "/predict": "predict", "/similarity": "similarity", "/tokenize": "tokenize",
                  "/": self.tei.root_kind(), "/invocations": self.tei.root_kind()}
        for path, kind in routes.items():
            app.router.add_post(path, self._tei_handler(path, kind))
        app.router.add_get("/info", self._tei_info)
        app.router.add_get("/ping", self._health)

    def _tei_handler(self, path: str, kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def answer(request: web.Request, body: bytes) -> Reply:
            return await self._tei(body, kind)

        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._front_door(request, f"POST {path}", answer)
        return handler

    async def _tei(self, body: bytes, kind: str) -> Reply:
        """One TEI request: TEI's own checks, then a permit per input, then the model."""
        self._count_prompt(body)
        try:
            job = self.tei.prepare(kind, body)
        except Unparsable as unparsable:
            return unparsable.reply
        except TeiError as error:
            return self.tei.error(error, openai=kind == "openai")
        outcome = self.tei.run(job)
        if kind == "tokenize":  # tokenization only: no permit
            return outcome.reply
        # TEI takes the permits first, so an overloaded server answers 429 even to an invalid input.
        waits = job.batch and self.tei.behaviour.batch_inputs_wait
        free = self._tei_free()
        if len(job.inputs) > free and not waits:
            if job.batch and job.refused_in_flight and free > 0 and outcome.reply.status == 200:
                await self._tei_hold(outcome.lengths[:free], body)  # the admitted inputs run first
            return overloaded(self.tei, kind)
        if outcome.reply.status != 200:
            return outcome.reply  # refused by validation or the model type, before any inference
        started = asyncio.get_running_loop().time()
        await self._tei_admit(outcome.lengths, body)
        seconds = asyncio.get_running_loop().time() - started
        outcome.reply.headers.update(self.tei.headers(outcome, seconds))
        return outcome.reply

    def _tei_free(self) -> int:
        return self.state.ready_replicas * self.config.max_concurrent_requests - self.admitted

    async def _tei_admit(self, lengths: list[int], body: bytes) -> None:
        """Hold one permit per input for the inference time.

        From 1.9.0 every input takes its permit with try_acquire (the caller has answered 429 when they
        are not all free): the embed routes take them all before any inference, predict and rerank
        inside each input's future (the admitted inputs run, then the 429). Before 1.9.0 a batch's
        inputs wait for their permits, so only a single input can be refused: here the inputs run in
        waves as permits free up (server.rs at 1.8.3 and 1.9.3).
        """
        remaining = lengths
        while remaining:
            if self._tei_free() <= 0:
                await self.state.wait_until(lambda: self._tei_free() > 0, self.config.faults.hang_s + 3600)
            take = max(1, self._tei_free())
            await self._tei_hold(remaining[:take], body)
            remaining = remaining[take:]

    async def _tei_hold(self, lengths: list[int], body: bytes) -> None:
        self.admitted += len(lengths)
        try:
            seconds = self.tei.latency(lengths, body)
            if seconds > 0:
                await asyncio.sleep(seconds)
        finally:
            self.admitted -= len(lengths)
            self.state.poke()

    async def _tei_info(self, request: web.Request) -> web.StreamResponse:
        return await self._plain_route(request, "GET /info", lambda: json_reply(self.tei.info()))

    # ----- health

    async def _health(self, request: web.Request) -> web.StreamResponse:
        def healthy() -> Reply:
            if self.config.task == "text-to-image":
                return Reply(200, b"Ok", "text/plain")
            return Reply(200, b"", "text/plain")
        return await self._plain_route(request, f"GET {request.path}", healthy)

    async def _plain_route(self, request: web.Request, route: str, make) -> web.StreamResponse:
        if not self._authorized(request):
            self.stats.count_only(route, 401)
            return web.Response(status=401)
        refusal = await self._proxy_gate(request)
        reply = refusal if refusal is not None else make()
        self.stats.count_only(route, reply.status)
        return reply.to_response()


_FAULT = web.RequestKey("batchrun_fault", object)  # the fault drawn for a request, for the model to see
# Faults that strike after the model ran: the answer is spoilt, not replaced.
_LATE_FAULTS = ("error_body", "truncated", "invalid_json")


def _reset_connection(request: web.Request) -> None:
    """Close the connection with a TCP RST, as a crashed proxy or replica would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()
