"""The dispatcher: rows in, one record per row out, with retries, backpressure and adaptive concurrency.

A fixed pool of ``max_concurrency`` workers pulls rows one at a time, only when free, so a bounded
queue upstream never grows. Each worker takes a slot of an :class:`~batchrun.limit.AdaptiveLimit`
before sending, so at most ``limit <= max_concurrency`` requests run at once. Each row goes through
one retry loop, the only one in batchrun (reliability.md §2):

    prepare ─ fails? → RowFailure(retryable=False), nothing sent
      │
      └─ attempt: slot → send → classify
            success          → RowResult (an answer invalid against the output schema is drawn
                               again with a fresh seed, retries.invalid_output times, then a
                               RowFailure(invalid_output))
            401 / 403        → AuthError out of run(): the job stops
            permanent        → RowFailure(retryable=False)
            transient        → excused (a cold start)? back off without using up an attempt
                             → policy.decide → give up: RowFailure(retryable=True)
                                             → sleep (slot released) → retry budget → attempt again

Stopping is the job's :class:`~batchrun.stop.Stop`: once a stop is requested, no row is pulled and
rows waiting (for a slot, a backoff or the retry budget) are left without a record, so they run again
next time; requests on the wire finish within the grace. When the grace ends, everything still running
is cancelled, and nothing is sent after :meth:`Dispatcher.run` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl

from batchrun.breaker import Admission, CircuitBreaker
from batchrun.endpoints.base import DataPlane
from batchrun.errors import AuthError, EndpointError, RequestFailed, redact, register_secret
from batchrun.limit import AdaptiveLimit
from batchrun.records import Row, RowFailure, RowResult
from batchrun.retry import (
    FailureKind,
    RetryBudget,
    RetryPolicy,
    Verdict,
    classify,
    is_overload,
    is_paused_answer,
    parse_retry_after,
)
from batchrun.spec import DEFAULT_OUTAGE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, ConcurrencySpec, RetrySpec
from batchrun.stop import Stop
from batchrun.structured import InvalidAnswer
from batchrun.tasks import PreparedRequest, Task, join_url
from batchrun.tasks.base import dump_json
from batchrun.tasks.structured import StructuredTask

__all__ = ["DispatchConfig", "DispatchStats", "Dispatcher", "LatencySample"]

# Server text kept in a failure row: enough to read the reason, not a whole HTML error page.
_MAX_MESSAGE_CHARS = 500
# A backoff for excused failures (cold start) grows with consecutive ones, up to this exponent: with
# the default policy that is min(cap, 0.5 * 2**6) = 30 s at most between probes.
_EXCUSED_MAX_EXPONENT = 6
# Longest single wait while the retry budget is spent: new requests elsewhere raise the allowance,
# so look again this often rather than sleeping until the oldest retry expires.
_BUDGET_POLL_S = 0.25


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

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.initial_concurrency < 1:
            raise ValueError(f"initial_concurrency must be at least 1, got {self.initial_concurrency}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.retry_budget_ratio < 0:
            raise ValueError(f"retry_budget_ratio must not be negative, got {self.retry_budget_ratio}")


class LatencySample:
    """A fixed-size uniform sample of latencies (reservoir sampling) for p50/p95 at constant memory."""

    def __init__(self, size: int = 4096, *, seed: int = 0) -> None:
        self.size = size
        self.count = 0
        self._values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        """Offer one latency to the sample."""
        self.count += 1
        if len(self._values) < self.size:
            self._values.append(value)
            return
        slot = self._rng.randrange(self.count)
        if slot < self.size:
            self._values[slot] = value

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the sample, or None before any latency was seen."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class DispatchStats:
    """Live counters for progress reporting. ``status_counts`` keys are HTTP statuses or failure kinds."""

    sent: int = 0  # requests sent (attempts)
    ok: int = 0  # rows that succeeded
    failed: int = 0  # rows recorded as failures
    retries: int = 0  # attempts after a row's first
    in_flight: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    output_tokens: int = 0
    latencies: LatencySample = field(default_factory=LatencySample)
    limit: int = 0  # the adaptive concurrency limit now


class _Abandon(Exception):
    """A row is left without a record because intake stopped (it runs again next time)."""


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
    """Sends every row's request to one endpoint and hands exactly one record per finished row to ``on_record``.

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
        kept_columns: Callable[[Row], dict[str, Any]] | None = None,
        excuses: Callable[[RequestFailed], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        url = yarl.URL(plane.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"the endpoint url must be an http(s) URL, got {redact(plane.url)!r}")
        if any(key.lower() == "authorization" for key in plane.headers):
            raise ValueError("the data plane's headers may not set Authorization: the token comes from huggingface_hub")
        self.base_url = plane.url
        self.task = task
        self.config = config
        self._on_record = on_record
        self._kept_columns = kept_columns
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._excuses = excuses
        self._has_token = bool(plane.token)
        register_secret(plane.token)
        self._headers = {"Content-Type": "application/json", **plane.headers}
        if plane.token:
            self._headers["Authorization"] = f"Bearer {plane.token}"
        self.limit = AdaptiveLimit(
            min(config.initial_concurrency, config.max_concurrency), maximum=config.max_concurrency, clock=clock
        )
        self.budget = RetryBudget(ratio=config.retry_budget_ratio, clock=clock)
        self._stats = DispatchStats(limit=self.limit.limit)
        self._timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
        self._urls: dict[str, str] = {}
        self._stop = Stop()
        self.breaker = CircuitBreaker()
        self._breaker_changed = asyncio.Event()
        self._good_limit = self.limit.value  # the limit while the endpoint last answered well
        # Answers that must follow a JSON Schema are read (and redrawn) here, the one retry layer.
        self._structured = task if isinstance(task, StructuredTask) else None

    # ------------------------------------------------------------------ lifecycle

    async def run(self, rows: AsyncIterator[Row], stop: Stop | None = None) -> None:
        """Dispatch every row of ``rows`` until they end or ``stop`` is requested; see the module docstring.

        Raises AuthError (after cancelling the other workers) when the endpoint refuses the token, and
        EndpointError when it answers that it is paused. Returns normally when the grace ends.
        """
        self._stop = stop = stop or Stop()
        feed = _RowFeed(rows)
        n = self.config.max_concurrency
        # limit_per_host=0: no separate per-host cap; the total equals the worker count, and every
        # request goes to one host anyway. Connections are kept alive between requests.
        connector = aiohttp.TCPConnector(limit=n, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector, headers=self._headers) as session, stop.until_aborted():
            try:
                async with asyncio.TaskGroup() as workers:
                    for i in range(n):
                        workers.create_task(self._worker(session, feed), name=f"dispatch-{i}")
            except BaseExceptionGroup as group:
                # One worker's AuthError (or EndpointError) ends them all; raise it as itself.
                raise group.exceptions[0] from None

    @property
    def stats(self) -> DispatchStats:
        """Live counters; ``in_flight`` and ``limit`` are read at the moment of the call."""
        self._stats.in_flight = self.limit.in_flight
        self._stats.limit = self.limit.limit
        return self._stats

    # ------------------------------------------------------------------ workers

    async def _worker(self, session: aiohttp.ClientSession, feed: _RowFeed) -> None:
        while not self._stop.requested:
            row = feed.next_nowait()  # most rows are here already: no wait, so nothing for a stop to cut
            if row is None:
                async with self._stop.until_requested():
                    row = await feed.next()
            if row is None or self._stop.requested:
                return  # the rows ended, or intake stopped: a row pulled just then runs next time
            try:
                record = await self._process(session, row)
            except _Abandon:
                continue
            if isinstance(record, RowResult):
                self._stats.ok += 1
            else:
                self._stats.failed += 1
            self._on_record(record)

    async def _process(self, session: aiohttp.ClientSession, row: Row) -> RowResult | RowFailure:
        try:
            request = self.task.prepare(row)
        except RequestFailed as unsendable:
            return self._failure(row, unsendable, attempts=0)
        body = dump_json(request.payload)  # once per row, not per attempt
        url = self._url(request)
        headers = request.headers or None
        attempts = 0  # requests sent for this row
        burned = 0  # attempts that count against policy.max_attempts
        cold_streak = 0  # consecutive excused failures, for their backoff
        redraws = 0  # tries after an answer that was not valid against the output schema
        while True:
            # A closed breaker admits every request: ask it (and maybe wait) only when it is not closed.
            probe = False if self.breaker.closed else await self._admitted()
            sent_at, outcome = await self._attempt(session, url, body, headers, first=attempts == 0)
            attempts += 1
            self._observe(outcome, probe=probe, row=row.position)
            if isinstance(outcome, dict):
                if request.outputs:  # columns the task knew before sending (a text-to-image seed)
                    outcome = {**request.outputs, **outcome}
                latency = self._clock() - sent_at
                self.limit.on_success(latency)
                self._stats.latencies.add(latency)
                self._stats.output_tokens += outcome.get("completion_tokens") or 0
                if self._structured is not None:
                    try:
                        outcome = self._structured.read(request, outcome)
                    except InvalidAnswer as invalid:
                        # The endpoint answered, but not a document of the schema: draw again with a
                        # fresh seed. These tries count apart from transport attempts and need no
                        # backoff: nothing is wrong with the endpoint.
                        self._count(_INVALID_OUTPUT)
                        redraws += 1
                        if redraws > self.config.invalid_output_retries:
                            failure = RequestFailed(_INVALID_OUTPUT, str(invalid), status=200, retryable=False)
                            return self._failure(row, failure, attempts=attempts)
                        request = self._structured.redraw(request, row, redraws)
                        body = dump_json(request.payload)
                        continue
                return RowResult(row.position, row.id, self._kept(row), outcome, latency, attempts)
            failure = outcome
            if failure.status is not None and classify(failure.status) is Verdict.STOP_JOB:
                raise self._auth_error(failure.status)
            if failure.error_type == _ENDPOINT_PAUSED:
                raise EndpointError(
                    f"the endpoint answered that it is paused ({failure.message}). Resume it (for a Dedicated "
                    "endpoint: `batchrun endpoint resume NAME --namespace NS`, or let batchrun manage it with "
                    "endpoint.name), then run the job again: it continues where it stopped.",
                    state="paused",
                )
            if is_overload(failure):
                # TGI's own 429 (no Retry-After) is a refusal for want of capacity: the limit measures it.
                self.limit.on_overload(sent_at, rejected=failure.status == 429 and failure.retry_after is None)
            outage = failure.retryable and _is_unavailable(failure) and self.breaker.suspects_outage
            if outage:
                # The endpoint, not the row, is failing (or may be): the row keeps its attempts and backs
                # off; once the breaker is open it holds the row until the endpoint is back. Its retry does
                # not wait for the retry budget: the breaker already spares the endpoint.
                delay = self.config.policy.delay(failure, min(cold_streak, _EXCUSED_MAX_EXPONENT), self._rng)
                cold_streak += 1
            elif failure.retryable and self._excuses is not None and self._excuses(failure):
                delay = self.config.policy.delay(failure, min(cold_streak, _EXCUSED_MAX_EXPONENT), self._rng)
                cold_streak += 1
            else:
                decision = self.config.policy.decide(failure, burned, self._rng)
                burned += 1
                cold_streak = 0
                if not decision.retry:
                    return self._failure(row, failure, attempts=attempts)
                delay = decision.delay_s
            # A 429 is the endpoint saying "not now" at once, and the adaptive limit already holds the load
            # at its capacity: its retry waits for a slot, not for the retry budget, which is for failures
            # that cost the endpoint work (and would bottleneck a job whose capacity shrank).
            await self._wait_to_retry(delay, spend_budget=not outage and failure.status != 429)

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        *,
        first: bool,
    ) -> tuple[float, dict[str, Any] | RequestFailed]:
        """Send one request inside a concurrency slot. Returns when it was sent, and outputs or a failure."""
        if self._stop.requested:
            raise _Abandon()  # intake stopped: a row not sent yet is left for next time
        # The fast path (a free slot, taken at once) needs no cancel scope: only a wait can be stopped.
        if not self.limit.try_acquire():
            async with self._stop.until_requested() as waiting:
                await self.limit.acquire()
            if waiting.cancelled:
                raise _Abandon()
        try:
            # Checked right before sending: once a stop is requested, a row that was only waiting for a
            # slot is left for next time.
            if self._stop.requested:
                raise _Abandon()
            self.budget.record_request()  # every request counts, retries included (the budget is a share)
            self._stats.sent += 1
            if not first:
                self._stats.retries += 1
            sent_at = self._clock()
            try:
                return sent_at, await self._send(session, url, body, headers)
            except RequestFailed as failure:
                return sent_at, failure
        finally:
            self.limit.release()

    async def _send(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: bytes,
        request_headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        try:
            # The task's own headers (text-to-image's Accept) are added to the session's. The answer is
            # read as raw bytes and only the task decides what it is: JSON, or image bytes kept as sent.
            async with session.post(
                url, data=body, headers=request_headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                payload = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError:
            self._count(FailureKind.TIMEOUT.value)
            raise RequestFailed(
                FailureKind.TIMEOUT.value, f"no complete answer within {self.config.request_timeout_s:g} s",
                retryable=True,
            ) from None
        except aiohttp.ClientError as exc:
            # Refused, reset, closed mid-answer (ClientPayloadError), bad HTTP from the server...
            self._count(FailureKind.CONNECTION.value)
            raise RequestFailed(
                FailureKind.CONNECTION.value, f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE_CHARS], retryable=True
            ) from None
        self._count(str(status))
        if 200 <= status < 300:  # what classify() calls SUCCESS, asked first: it is nearly every answer
            try:
                return self.task.parse(status, headers, payload)
            except RequestFailed:
                self._count(FailureKind.BAD_BODY.value)
                raise
        verdict = classify(status)
        message, model_answered = _server_message(status, payload)
        if status == 400 and is_paused_answer(payload):
            # Not this row's fault: the endpoint itself is paused. Recording the row as a permanent
            # failure would lose it for good, so the whole job stops (resumable) instead.
            raise RequestFailed(_ENDPOINT_PAUSED, message, status=status, retryable=False)
        retry_after = parse_retry_after(
            headers.get("Retry-After"), time.time(), maximum=self.config.policy.max_retry_after
        )
        raise RequestFailed(
            f"http_{status}",
            message,
            status=status,
            retryable=verdict is Verdict.RETRY,
            retry_after=retry_after,
            model_answered=model_answered,
        )

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

    async def _admitted(self) -> bool:
        """Wait until the breaker lets a request out; True when it goes as the probe."""
        while True:
            now = self._clock()
            admission = self.breaker.admit(now)
            if admission is not Admission.WAIT:
                return admission is Admission.PROBE
            outage = self.breaker.outage_s(now)
            if outage > self.config.outage_timeout_s:
                raise EndpointError(
                    f"the endpoint has not answered for {outage:.0f}s (outage_timeout "
                    f"{self.config.outage_timeout_s:g}s); the rows not done are kept for the next run",
                    state="unavailable",
                )
            async with self._stop.until_requested() as waiting:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.breaker.wait_s(now)):
                        await self._breaker_changed.wait()
            if waiting.cancelled:
                raise _Abandon()

    def _observe(self, outcome: dict[str, Any] | RequestFailed, *, probe: bool, row: int) -> None:
        """Count an outcome for the breaker; when it closes again, go back to the last good limit."""
        unavailable = isinstance(outcome, RequestFailed) and _is_unavailable(outcome)
        if not unavailable and self.breaker.closed:
            self._good_limit = max(self._good_limit * 0.99, self.limit.value)
        if self.breaker.record(unavailable=unavailable, now=self._clock(), probe=probe, row=row):
            if self.breaker.closed:
                self.limit.raise_to(self._good_limit)
            self._breaker_changed.set()
            self._breaker_changed.clear()
        elif probe:  # a failed probe: the waiters look again at the next probe time
            self._breaker_changed.set()
            self._breaker_changed.clear()

    def waiting_for(self) -> str | None:
        """Why requests are held back right now, for the progress line (None when they are not)."""
        return self.breaker.describe(self._clock())

    # ------------------------------------------------------------------ helpers

    def _url(self, request: PreparedRequest) -> str:
        url = self._urls.get(request.path)
        if url is None:
            url = self._urls[request.path] = join_url(self.base_url, request.path)
        return url

    def _kept(self, row: Row) -> dict[str, Any]:
        return self._kept_columns(row) if self._kept_columns is not None else {}

    def _count(self, key: str) -> None:
        counts = self._stats.status_counts
        counts[key] = counts.get(key, 0) + 1

    def _failure(self, row: Row, failure: RequestFailed, *, attempts: int) -> RowFailure:
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

    def _auth_error(self, status: int) -> AuthError:
        if self._has_token:
            message = (
                f"The endpoint refused the token (HTTP {status}): it is invalid, expired, or cannot access "
                f"this endpoint. Set HF_TOKEN to a token with access, or run `hf auth login`."
            )
        else:
            message = (
                f"The endpoint requires a token (HTTP {status}) and none was found. "
                f"Set HF_TOKEN, or run `hf auth login`."
            )
        return AuthError(message, status=status)


def _nothing() -> None:
    return None


_ENDPOINT_PAUSED = "endpoint_paused"
_INVALID_OUTPUT = "invalid_output"  # a 200 whose answer is not valid against the output schema
#: Outcomes that say the endpoint is not there (as opposed to overloaded, 429, or refusing the row).
_UNAVAILABLE_STATUSES = frozenset({500, 502, 503, 504})


def _is_unavailable(failure: RequestFailed) -> bool:
    if failure.model_answered:
        # TGI's own JSON error (a 500 ``incomplete_generation``): the model ran and failed on this row.
        # Taking it for an outage would let a few such rows at the end of a job hold the breaker open,
        # each probe failing again, until the outage timeout.
        return False
    if failure.status is not None:
        return failure.status in _UNAVAILABLE_STATUSES
    return failure.error_type in (FailureKind.CONNECTION.value, FailureKind.TIMEOUT.value)


def _server_message(status: int, body: bytes) -> tuple[str, bool]:
    """A readable, redacted, bounded message from an error answer (TGI's JSON error, or raw text), and
    whether the answer was the model server's own JSON error rather than a proxy's text."""
    text = body[:4096].decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    model_answered = False
    if isinstance(doc, dict) and "error" in doc:
        model_answered = True
        text = str(doc["error"])
        if doc.get("error_type"):
            text = f"{doc['error_type']}: {text}"
    text = text.strip() or "(empty body)"
    return redact(f"HTTP {status}: {text}")[:_MAX_MESSAGE_CHARS], model_answered
