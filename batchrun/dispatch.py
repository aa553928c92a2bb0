"""The dispatcher: rows in, one record per row out, with retries, backpressure and adaptive concurrency.

A fixed pool of ``max_concurrency`` workers pulls rows one at a time, only when free, so a bounded
queue upstream never grows. Each worker takes a slot of an :class:`~batchrun.limit.AdaptiveLimit`
before sending, so at most ``limit <= max_concurrency`` requests run at once. Each row goes through
one retry loop, the only one in batchrun (reliability.md §2); what it does after each attempt is
decided by :func:`batchrun.retry.next_step`, a pure function, and the loop only carries it out:

    prepare ─ fails? → RowFailure(retryable=False), nothing sent
      │
      └─ attempt: rate gate → slot → send → the route records the outcome (limit, breaker, gate, figures)
            answer           → the task's answer hooks (tasks.base.AnswerHook): kept → RowResult;
                               a Redraw (not valid against the output schema) → next_step
            failure, redraw  → next_step:
                 fail        → RowFailure (a permanent failure, the attempts used up, or the redraws:
                               retries.invalid_output, then invalid_output)
                 retry after → a redraw goes again at once; a failure sleeps (slot released), waits
                               for the retry budget (not after a 429 or an outage) and goes again.
                               A 429, an outage or an excused failure (a cold start) costs no attempt
                 reroute     → the endpoint is drained (401/403, paused, no such route, connections
                               refused or only 429s past outage_timeout): the row goes to another
                               endpoint; with none left, the reason stops the job (AuthError for a
                               token, EndpointError otherwise), its rows kept pending

Stopping is the job's :class:`~batchrun.stop.Stop`: once a stop is requested, no row is pulled and
rows waiting (for a slot, a backoff or the retry budget) are left without a record, so they run again
next time; requests on the wire finish within the grace. When the grace ends, everything still running
is cancelled, and nothing is sent after :meth:`Dispatcher.run` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from batchrun.breaker import Admission, CircuitBreaker
from batchrun.dispatch_stats import DispatchStats, LatencyReservoir
from batchrun.endpoints.base import DataPlane
from batchrun.errors import BatchrunError, EndpointError, RequestFailed
from batchrun.facts import MAX_MESSAGE_CHARS
from batchrun.limit import AdaptiveLimit
from batchrun.packing import RowsPerRequest, halves, make_pack, prepare_members, too_large, unpack
from batchrun.rate import Ticket, request_size
from batchrun.records import FailureType, Row, RowFailure, RowResult
from batchrun.retry import (
    INVALID_OUTPUT,
    Action,
    RetryBudget,
    RetryPolicy,
    RetryRules,
    Tries,
    answer_failure,
    is_overload,
    is_rejected,
    next_step,
)
from batchrun.routing import Route, drain_error, outage_error, pick
from batchrun.spec import (
    DEFAULT_MAX_ANSWER_BYTES,
    DEFAULT_OUTAGE_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    ConcurrencySpec,
    RetrySpec,
)
from batchrun.stop import Stop
from batchrun.tasks import PreparedRequest, Task
from batchrun.tasks.base import Redraw, answer_hooks, dump_json
from batchrun.transport import (
    AnswerTooLarge,
    Request,
    Response,
    TransportError,
    TransportTimeout,
    Unreached,
    redact_answer,
)

__all__ = ["DispatchConfig", "DispatchStats", "Dispatcher", "LatencyReservoir"]

# Longest single wait while the retry budget is spent: new requests elsewhere raise the allowance,
# so look again this often rather than sleeping until the oldest retry expires.
_BUDGET_POLL_S = 0.25
# Longest single wait on a lane's rate gate: another lane may have room by then, or the stop come.
_GATE_POLL_S = 0.25


@dataclass(frozen=True, kw_only=True)
class DispatchConfig:
    """How the dispatcher sends: concurrency bounds, per-request deadline, retry policy and budget."""

    # Concurrency: the adaptive limit starts at initial_concurrency and stays within [1, max_concurrency].
    max_concurrency: int = ConcurrencySpec.max
    initial_concurrency: int = ConcurrencySpec.initial
    # A hung server cannot hang the job: every attempt has this total deadline.
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT
    # Retries.
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    retry_budget_ratio: float = RetrySpec.budget_ratio
    # An endpoint unavailable for longer than this stops the job (resumable) instead of waiting on.
    outage_timeout_s: float = DEFAULT_OUTAGE_TIMEOUT
    # Structured output: more tries, each with a fresh seed, for an answer not valid against the schema.
    invalid_output_retries: int = RetrySpec.invalid_output
    # The largest answer body read; a larger one is a failure row (answer_too_large). None: no cap.
    max_answer_bytes: int | None = DEFAULT_MAX_ANSWER_BYTES

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.initial_concurrency < 1:
            raise ValueError(f"initial_concurrency must be at least 1, got {self.initial_concurrency}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.retry_budget_ratio < 0:
            raise ValueError(f"retry_budget_ratio must not be negative, got {self.retry_budget_ratio}")


class _Abandon(Exception):
    """A row is left without a record because intake stopped (it runs again next time)."""


class _Drained(Exception):
    """The endpoint a row waited for was drained: the row goes to another one."""


class _RowFeed:
    """The rows, pulled one worker at a time; remembers that they ended.

    When the rows come with a ``next_nowait()`` (:class:`~batchrun.reader.RowStream`), a row already
    handed over is taken with it, synchronously: no lock, no cancel scope, no await for most rows.
    """

    def __init__(self, rows: AsyncIterator[Row]) -> None:
        self._rows = rows
        self._lock = asyncio.Lock()
        self.ended = False
        self._nowait: Callable[[], Row | None] = getattr(rows, "next_nowait", _nothing)

    def next_nowait(self) -> Row | None:
        """A row that is there already, or None (then await :meth:`next`)."""
        if self.ended or self._lock.locked():
            return None  # the end is for every worker; a worker waiting on the lock is served first
        return self._nowait()

    async def next(self) -> Row | None:
        async with self._lock:
            if self.ended:
                return None
            try:
                return await anext(self._rows)
            except StopAsyncIteration:
                self.ended = True  # the other workers stop pulling too; rows in flight finish
                return None


class Dispatcher:
    """Sends every row's request to its endpoints and hands exactly one record per finished row to ``on_record``.

    A job has one endpoint or several; each is a :class:`~batchrun.routing.Route` with its own limit and
    breaker. ``plane`` is the first; :meth:`add_route` adds the others as they become ready.

    ``plane`` is where requests go: the endpoint's url (it may carry a path), headers to add, and the
    token, sent as ``Authorization: Bearer`` and never shown in a message. ``kept_columns(row)`` picks
    the input columns copied into each record. ``excuses(failure)`` returning True means that failure
    does not count against ``policy.max_attempts`` (it still backs off and spends retry budget), e.g. a
    503 while a scaled-to-zero endpoint wakes up.
    """

    def __init__(
        self,
        *,
        plane: DataPlane,
        task: Task,
        config: DispatchConfig,
        on_record: Callable[[RowResult | RowFailure], None],
        kept_columns: Callable[[Row], dict[str, object]] | None = None,
        excuses: Callable[[RequestFailed], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        name: str = "endpoint",
        rows_per_request: RowsPerRequest | None = None,
    ) -> None:
        self.base_url = plane.url
        self.task = task
        self.config = config
        self._on_record = on_record
        self._kept_columns = kept_columns
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # One route per endpoint, each with its own limit and breaker (routing.py); the first is ``plane``.
        self._routes = [self._new_route(plane, name=name, excuses=excuses)]
        self._route_added = asyncio.Event()
        self._more_coming: Callable[[], bool] = _no
        self._last_drained: BatchrunError | None = None
        self._connections = 0  # the workers' count once run() began: each route's connection pool
        #: Called with (route name, why) when an endpoint is drained: its owner releases it.
        self.on_drained: Callable[[str, BatchrunError], None] | None = None
        self.budget = RetryBudget(ratio=config.retry_budget_ratio, clock=clock)
        self._stats = DispatchStats(limit=self.limit.limit)
        self._stop = Stop()
        self._rules = RetryRules(policy=config.policy, outage_timeout_s=config.outage_timeout_s,
                                 invalid_output_retries=config.invalid_output_retries)
        # The task's layers that look at each answer (structured output, the answered-by column).
        self._hooks = answer_hooks(task)
        # A task that sends several rows per request (packing.py): each row comes as a pack, and a pack
        # refused as too large teaches the rows-per-request controller.
        self._packs = bool(getattr(task, "packs", False))
        self.rows_per_request = rows_per_request

    # ------------------------------------------------------------------ lifecycle

    async def run(self, rows: AsyncIterator[Row], stop: Stop | None = None) -> None:
        """Dispatch every row of ``rows`` until they end or ``stop`` is requested; see the module docstring.

        Raises AuthError (after cancelling the other workers) when the endpoint refuses the token, and
        EndpointError when it answers that it is paused. Returns normally when the grace ends.
        """
        self._stop = stop = stop or Stop()
        feed = _RowFeed(rows)
        n = self._connections = self.config.max_concurrency
        for route in self._routes:
            route.open_session(n)
        try:
            async with stop.until_aborted():
                try:
                    async with asyncio.TaskGroup() as workers:
                        for i in range(n):
                            workers.create_task(self._worker(feed), name=f"dispatch-{i}")
                except BaseExceptionGroup as group:
                    # One worker's AuthError (or EndpointError) ends them all; raise it as itself.
                    raise group.exceptions[0] from None
        finally:
            await asyncio.gather(*(route.close() for route in self._routes))

    # ------------------------------------------------------------------ routes (one per endpoint)

    def _new_route(self, plane: DataPlane, *, name: str,
                   excuses: Callable[[RequestFailed], bool] | None) -> Route:
        config = self.config
        return Route(plane, name=name, initial=config.initial_concurrency, maximum=config.max_concurrency,
                     clock=self._clock, excuses=excuses)

    def add_route(self, plane: DataPlane, *, name: str, excuses: Callable[[RequestFailed], bool] | None = None) -> None:
        """Send to one more endpoint from now on (it became ready after the first)."""
        route = self._new_route(plane, name=name, excuses=excuses)
        if self._connections:
            route.open_session(self._connections)
        self._routes.append(route)
        self._route_added.set()
        self._route_added.clear()

    def expect_more(self, pending: Callable[[], bool]) -> None:
        """``pending()`` says whether more endpoints may still be added: with none live, rows wait for them."""
        self._more_coming = pending

    def drain(self, name: str, error: BatchrunError) -> None:
        """Send no more to the endpoint ``name`` (it failed): its rows are retried on the others."""
        for route in self._routes:
            if route.name == name:
                self._drain(route, error)

    def _drain(self, route: Route, error: BatchrunError) -> None:
        if route.drain(error):
            self._last_drained = error
            if self.on_drained is not None:
                self.on_drained(route.name, error)

    def _pick(self, avoid: Route | None) -> Route | None:
        routes = self._routes
        if len(routes) == 1:  # one endpoint: nothing to choose
            route = routes[0]
            return route if route.drained is None else None
        return pick(routes, avoid)

    async def _route(self, avoid: Route | None = None) -> Route:
        """A live route (preferring another than ``avoid``); waits for one still starting; raises the
        error that drained the last one when none is left."""
        route = self._pick(avoid)
        while route is None:
            if not self._more_coming():
                raise self._last_drained or EndpointError("no endpoint is left to send to")
            async with self._stop.until_requested() as waiting:
                await self._route_added.wait()
            if waiting.cancelled:
                raise _Abandon()
            route = self._pick(avoid)
        return route

    @property
    def limit(self) -> AdaptiveLimit:
        """The first endpoint's concurrency limit (the only one, for a job with one endpoint)."""
        return self._routes[0].limit

    @property
    def breaker(self) -> CircuitBreaker:
        """The first endpoint's circuit breaker."""
        return self._routes[0].breaker

    @property
    def routes(self) -> Sequence[Route]:
        """Every endpoint's route so far, in the order they joined (read, never changed, by the progress)."""
        return self._routes

    def route_figures(self) -> dict[str, dict[str, object]]:
        """Each endpoint's share (rows, 429s, latency), by name."""
        return {route.name: route.figures() for route in self._routes}

    def route_in_flight(self, name: str) -> int:
        return sum(route.limit.in_flight for route in self._routes if route.name == name)

    @property
    def stats(self) -> DispatchStats:
        """Live counters; ``in_flight`` and ``limit`` are read at the moment of the call."""
        routes = self._routes
        if len(routes) == 1:
            self._stats.in_flight = routes[0].limit.in_flight
            self._stats.limit = routes[0].limit.limit
        else:
            self._stats.in_flight = sum(route.limit.in_flight for route in routes)
            self._stats.limit = sum(route.limit.limit for route in routes if route.drained is None)
        return self._stats

    # ------------------------------------------------------------------ workers

    async def _worker(self, feed: _RowFeed) -> None:
        while not self._stop.requested:
            row = feed.next_nowait()  # most rows are here already: no wait, so nothing for a stop to cut
            if row is None:
                async with self._stop.until_requested():
                    row = await feed.next()
            if row is None or self._stop.requested:
                return  # the rows ended, or intake stopped: a row pulled just then runs next time
            try:
                if self._packs:
                    await self._process_pack(row)
                    continue
                record = await self._process(row)
            except _Abandon:
                continue
            self._on_record(record)  # counted there, once (the runner's Tally)

    async def _process_pack(self, row: Row) -> None:
        """Several rows in one request, through the one retry loop; each member ends in exactly one record.

        A member that cannot make a request fails alone, before anything is sent. A pack the server
        refuses as too large (packing.too_large) is split in two, each half sent on its own, and the
        refusal lowers the rows per request; a lone row refused so fails with the server's reason.
        A pack left without a record (intake stopped) leaves all its unrecorded members for next time.
        """
        # A packing task (tasks/tei.py) makes each member's input.
        packed, inputs, unsendable = prepare_members(row, self.task.member_input)  # type: ignore[attr-defined]
        for member, failure in unsendable:
            self._on_record(self._failure(member, failure, 0))
        if not packed:
            return
        record = await self._process(make_pack(tuple(packed), tuple(inputs)))
        if isinstance(record, RowResult):
            if self.rows_per_request is not None:
                self.rows_per_request.answered(len(packed))
            for member_record in unpack(packed, record, kept=self._kept, failed=self._failure):
                self._on_record(member_record)
            return
        refusal = too_large(record.status, record.error) if len(packed) > 1 else None
        if refusal is not None:
            if self.rows_per_request is not None:
                self.rows_per_request.refused(len(packed), refusal)
            self._count("split")
            for half in halves(packed, refusal):
                await self._process_pack(half)
            return
        for member in packed:  # the pack's failure is each member's
            self._on_record(replace(record, position=member.position, id=member.id, kept=self._kept(member)))

    async def _process(self, row: Row) -> RowResult | RowFailure:
        """The row's one retry loop: send, account, ask :func:`~batchrun.retry.next_step`, carry it out."""
        try:
            request = self.task.prepare(row)
        except RequestFailed as unsendable:
            return self._failure(row, unsendable, attempts=0)
        body = dump_json(request.payload)  # once per row, not per attempt
        headers = request.headers or None
        route = self._pick(None) or await self._route()
        attempts = 0  # requests sent for this row
        tries, ahead = _NO_TRIES, False  # ahead: refused for want of capacity, it takes the next slot freed
        while True:
            try:
                # A closed breaker admits every request: ask it (and maybe wait) only when it is not closed.
                probe = False if route.breaker.closed else await self._admitted(route)
                sent_at, outcome = await self._attempt(route, route.url(request), route.body(request, body), headers,
                                                       first=attempts == 0, payload=request.payload, ahead=ahead)
            except _Drained:  # the endpoint was drained while the row waited for it: another one
                route = await self._route(route)
                continue
            attempts += 1
            now = self._clock()
            latency = now - sent_at
            self._record(route, outcome if isinstance(outcome, RequestFailed) else None, latency, now=now,
                         probe=probe, row=row.position)
            unkept: RequestFailed | Redraw
            if isinstance(outcome, dict):
                # Only a task with answer hooks, or columns known before sending, changes the answer.
                kept = self._accept(request, outcome, route.name) if self._hooks or request.outputs else outcome
                if not isinstance(kept, Redraw):  # nearly every row: no decision to make
                    return RowResult(row.position, row.id, self._kept(row), kept, latency, attempts)
                self._count(INVALID_OUTPUT)
                unkept = kept
            else:
                unkept = outcome
            step = next_step(unkept, tries, route, rules=self._rules, now=now, sent_at=sent_at, rng=self._rng)
            tries, ahead = step.tries, False
            if step.action is Action.FAIL:
                assert step.failure is not None
                return self._failure(row, step.failure, attempts=attempts)
            if step.action is Action.REROUTE:
                # Its endpoint is drained (it failed, or refused the token): the row goes to another one
                # at once and keeps its tries; with none left, the reason is raised and the job stops.
                if step.drain is not None and isinstance(unkept, RequestFailed):
                    self._drain(route, drain_error(route, step, unkept, alone=len(self._routes) == 1,
                                                   outage_timeout_s=self.config.outage_timeout_s))
                route = await self._route(route)
            elif isinstance(unkept, Redraw):
                # The endpoint answered, but not a document of the schema: the same request with a fresh
                # seed, at once and to the same endpoint (nothing is wrong with it).
                request = unkept.again(request, row, tries.redraws)
                body = dump_json(request.payload)
            else:
                await self._wait_to_retry(step.delay_s, spend_budget=step.spend_budget)
                other = self._pick(route) or await self._route(route)  # a retry prefers another endpoint,
                ahead = step.ahead and (other is route or other.room() <= 0)  # but refused for want of capacity
                route = route if ahead else other  # with no room elsewhere, it takes the next slot freed here

    def _accept(
        self, request: PreparedRequest, outputs: dict[str, object], endpoint: str,
    ) -> dict[str, object] | Redraw:
        """The answer as the row keeps it, through the task's answer hooks; or the redraw one asks for."""
        if request.outputs:  # columns the task knew before sending (a text-to-image seed)
            outputs = {**request.outputs, **outputs}
        for hook in self._hooks:
            kept = hook.accept(request, outputs, endpoint=endpoint)
            if isinstance(kept, Redraw):
                return kept
            outputs = kept
        return outputs

    def _record(self, route: Route, failure: RequestFailed | None, latency: float, *,
                now: float, probe: bool, row: int) -> None:
        """Count one attempt's outcome (None: an answer): the route's accounting (limit, breaker, figures),
        then the latency."""
        if route.record(failure, latency, probe=probe, row=row, now=now) and len(self._routes) > 1:
            self._drain_if_others_answer(route)
        if failure is None:
            self._stats.latencies.add(latency)

    async def _attempt(
        self,
        route: Route,
        url: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        *,
        first: bool,
        payload: Mapping[str, object] | None = None,
        ahead: bool = False,
    ) -> tuple[float, dict[str, object] | RequestFailed]:
        """Send one request inside a concurrency slot, once the lane's rate gate lets it out. Returns when it
        was sent, and outputs or a failure."""
        if self._stop.requested:
            raise _Abandon()  # intake stopped: a row not sent yet is left for next time
        limit = route.limit
        while True:
            # A lane that knows no rate limit (every Dedicated endpoint, most urls) asks its gate nothing.
            ticket = None if route.gate.idle else await self._through_gate(route, payload)
            # The fast path (a free slot, taken at once) needs no cancel scope: only a wait can be stopped.
            if ahead or not limit.try_acquire():
                async with self._stop.until_requested() as waiting:
                    await limit.acquire(ahead=ahead)
                if waiting.cancelled:
                    route.gate.settle(ticket)
                    raise _Abandon()
            if ticket is not None or route.gate.idle:
                break
            limit.release()  # the gate learned of a limit while this request waited for its slot: ask it
        try:
            # Checked right before sending: once a stop is requested, a row that was only waiting for a
            # slot is left for next time; a row whose endpoint was drained meanwhile goes to another.
            if self._stop.requested:
                raise _Abandon()
            if route.drained is not None:
                raise _Drained()
            self.budget.record_request()  # every request counts, retries included (the budget is a share)
            self._stats.sent += 1
            if not first:
                self._stats.retries += 1
            sent_at = self._clock()
            if ticket is not None:
                ticket.sent_at = sent_at
            try:
                return sent_at, await self._send(route, url, body, headers, ticket, payload)
            except RequestFailed as failure:
                if is_overload(failure) and not failure.rate_limited:
                    # A rate 429 is the gate's (it paused the lane); the limit is for capacity.
                    # Reported while the slot is still held, so that the cut holds back the rows waiting
                    # for this slot: TGI's own 429 (no Retry-After) is a refusal for want of capacity,
                    # and the limit measures it.
                    limit.on_overload(sent_at, rejected=is_rejected(failure), holding=True)
                return sent_at, failure
        finally:
            limit.release()
            if ticket is not None:
                route.gate.settle(ticket)

    async def _through_gate(self, route: Route, payload: Mapping[str, object] | None) -> Ticket:
        """Wait until the lane's rate gate lets this request out, and take its share. A row whose lane waits
        while another has room goes there (raises _Drained, which moves it); a stop abandons it."""
        gate = route.gate
        size = request_size(payload) if payload is not None and gate.counts_tokens else None
        while True:
            if route.drained is not None:
                raise _Drained()
            wait = gate.wait_s(gate.tokens(size)[0])
            if wait <= 0:
                return gate.take(size)
            if wait > self.config.outage_timeout_s and route.limit.in_flight == 0:
                # A window that turns only in hours (a daily limit spent): not worth holding the job for;
                # the rows not done are kept for the next run, or go to another endpoint. Not before the
                # answers on the wire are in: they are paid for.
                self._drain(route, self._outage(route, "allows no more requests", wait, why="its rate limit; ",
                                                state="rate_limited"))
                raise _Drained()
            if len(self._routes) > 1:
                other = pick(self._routes, avoid=route)
                if other is not None and other is not route and other.room() > 0:
                    raise _Drained()
            async with self._stop.until_requested() as waiting:
                await asyncio.sleep(min(wait, _GATE_POLL_S))
            if waiting.cancelled:
                raise _Abandon()

    async def _send(
        self,
        route: Route,
        url: str,
        body: bytes,
        request_headers: Mapping[str, str] | None = None,
        ticket: Ticket | None = None,
        request_payload: Mapping[str, object] | None = None,
    ) -> dict[str, object]:
        assert route.pool is not None  # opened by run() for every route
        config = self.config
        try:
            # The task's own headers (text-to-image's Accept) are added to the pool's. The answer is
            # read as raw bytes, no further than max_answer_bytes, and only the task decides what it
            # is: JSON, or image bytes kept as sent.
            response = await route.transport.send(Request(
                "POST", url, request_headers, body, config.request_timeout_s, route.pool, config.max_answer_bytes,
            ))
        except TransportTimeout:
            self._count(FailureType.TIMEOUT)
            raise RequestFailed(
                FailureType.TIMEOUT, f"no complete answer within {config.request_timeout_s:g} s",
                retryable=True,
            ) from None
        except AnswerTooLarge as large:
            if not 200 <= large.status < 300:  # a huge error page: its status and headers decide
                response = Response(large.status, large.headers, b"")
            else:
                # Paid for, but more than the job may hold: the same prompt would likely answer as much
                # again, so the row fails at once (not retried) and nothing more of the answer is read.
                self._count(FailureType.ANSWER_TOO_LARGE)
                raise RequestFailed(FailureType.ANSWER_TOO_LARGE, str(large), status=large.status,
                                    retryable=False) from None
        except TransportError as exc:
            # Refused, reset, closed mid-answer, bad HTTP from the server...
            self._count(FailureType.CONNECTION)
            raise RequestFailed(
                FailureType.CONNECTION, str(exc)[:MAX_MESSAGE_CHARS], retryable=True,
                unreached=isinstance(exc, Unreached),
            ) from None
        status, headers = response.status, response.headers
        gate = route.gate
        # Limits the answers announce are read without being told (a lane with none asks two headers).
        if not gate.idle or "x-ratelimit-remaining-requests" in headers or "x-ratelimit-remaining-tokens" in headers:
            gate.observe(headers, ticket, self._clock(), in_flight=route.limit.in_flight - 1, payload=request_payload)
        # A server that echoes the token (or another secret) back: it is scrubbed before the answer is
        # read, so it reaches no output. One search per secret form; none without a secret.
        payload = redact_answer(response.body)
        self._count(str(status))
        if 200 <= status < 300:  # what classify() calls SUCCESS, asked first: it is nearly every answer
            try:
                outputs = self.task.parse(status, headers, payload)
            except RequestFailed:
                self._count(FailureType.BAD_BODY)
                raise
            if not gate.idle:
                prompt_tokens = outputs.get("prompt_tokens")
                gate.on_answer(ticket, prompt_tokens if isinstance(prompt_tokens, int) else None)
            return outputs
        failure = answer_failure(status, headers, payload, max_retry_after=self.config.policy.max_retry_after)
        if failure.rate_limited:
            # Over the lane's requests or tokens per window: the lane pauses (until Retry-After, or a
            # growing jittered time) and its rows go to other lanes or wait; none is failed for it.
            gate.on_rate_refusal(failure.retry_after, ticket)
        raise failure

    async def _wait_to_retry(self, delay: float, *, spend_budget: bool = True) -> None:
        """Sleep ``delay`` (holding no slot), then wait for the retry budget. Abandons if intake stops."""
        async with self._stop.until_requested() as waiting:
            if delay > 0:
                await asyncio.sleep(delay)
            while spend_budget and not self.budget.try_spend():
                await asyncio.sleep(min(self.budget.time_until_available(), _BUDGET_POLL_S))
        if waiting.cancelled or self._stop.requested:
            raise _Abandon()

    # ------------------------------------------------------------------ the circuit breaker

    async def _admitted(self, route: Route) -> bool:
        """Wait until the route's breaker lets a request out; True when it goes as the probe.

        An outage past ``outage_timeout`` drains the endpoint (raises _Drained): with another endpoint
        live the row goes there, with none the job stops (resumable).
        """
        breaker = route.breaker
        while True:
            if route.drained is not None:
                raise _Drained()
            now = self._clock()
            admission = breaker.admit(now)
            if admission is not Admission.WAIT:
                return admission is Admission.PROBE
            outage = breaker.outage_s(now)
            if outage > self.config.outage_timeout_s:
                self._drain(route, self._outage(route, "has not answered", outage))
                raise _Drained()
            async with self._stop.until_requested() as waiting:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(breaker.wait_s(now)):
                        await route.breaker_changed.wait()
            if waiting.cancelled:
                raise _Abandon()

    def _drain_if_others_answer(self, route: Route) -> None:
        """An endpoint failing while another one answers is drained (a lone one is left to its breaker)."""
        others = [r for r in self._routes if r is not route and r.drained is None and r.breaker.closed and r.ok]
        if others:
            self._drain(route, EndpointError(
                f"endpoint {route.name}: {route.unavailable_streak} errors or timeouts in a row while "
                f"{others[0].name} answers", state="unavailable",
            ))

    def waiting_for(self) -> str | None:
        """Why requests are held back right now, for the progress line (None when they are not)."""
        now = self._clock()
        if len(self._routes) == 1:
            return self._routes[0].breaker.describe(now)
        held = [f"{route.name}: {why}" for route in self._routes
                if route.drained is None and (why := route.breaker.describe(now))]
        return "; ".join(held) or None

    # ------------------------------------------------------------------ helpers

    def _outage(self, route: Route, what: str, for_s: float, *, why: str = "",
                state: str = "unavailable") -> EndpointError:
        return outage_error(route, what, for_s, why=why, state=state, alone=len(self._routes) == 1,
                            outage_timeout_s=self.config.outage_timeout_s)

    def _kept(self, row: Row) -> dict[str, object]:
        return self._kept_columns(row) if self._kept_columns is not None else {}

    def _count(self, key: str) -> None:
        counts = self._stats.status_counts
        counts[key] = counts.get(key, 0) + 1

    def _failure(self, row: Row, failure: RequestFailed, attempts: int) -> RowFailure:
        return RowFailure(
            position=row.position,
            id=row.id,
            error_type=failure.error_type,
            error=failure.message,
            status=failure.status,
            attempts=attempts,
            retryable=failure.retryable,
            kept=self._kept(row),
        )


def _nothing() -> None:
    return None


def _no() -> bool:
    return False


_NO_TRIES = Tries()  # a row's tries before its first failure (frozen: shared by every row)

