"""The retry policy: which outcomes are retried, how long to wait, and how many retries to allow.

Everything here is pure (no sleeping, no I/O): the dispatcher asks, then does the waiting itself.
This is the only place in batchrun that decides about retries (reliability.md §2: retry at one layer).

- :func:`classify` maps an HTTP status or a transport failure to a :class:`Verdict`.
- :func:`parse_retry_after` reads a ``Retry-After`` header (seconds or an HTTP date).
- :class:`RetryPolicy` turns one failed attempt into a :class:`Decision`: give up, or retry after N seconds.
- :class:`RetryBudget` keeps retries under a share of all requests over a sliding window.
- :func:`next_step` is the whole decision after one attempt of a row: an answer, a redraw the task asked
  for, or a failure in; done, fail, retry after N seconds, or reroute (the endpoint is drained) out.
  The dispatcher's loop only carries it out.
"""

from __future__ import annotations

import email.utils
import enum
import json
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from batchrun.errors import RequestFailed, redact
from batchrun.facts import MAX_MESSAGE_CHARS
from batchrun.rate import is_rate_refusal
from batchrun.records import FailureType, http_failure_type
from batchrun.spec import DEFAULT_OUTAGE_TIMEOUT, RetrySpec
from batchrun.tasks.base import Redraw

__all__ = [
    "Action",
    "Decision",
    "Drain",
    "EndpointView",
    "RetryBudget",
    "RetryPolicy",
    "RetryRules",
    "Step",
    "Tries",
    "Verdict",
    "answer_failure",
    "classify",
    "is_missing_route",
    "is_overload",
    "is_paused_answer",
    "is_rejected",
    "is_unavailable",
    "next_step",
    "parse_retry_after",
    "retry_after_ms",
    "server_message",
]


#: Failures that have no HTTP status (or whose status says success): the request may do better again.
TRANSPORT_FAILURES = frozenset({FailureType.TIMEOUT, FailureType.CONNECTION, FailureType.BAD_BODY})


class Verdict(str, enum.Enum):
    """What an outcome means for the row and the job."""

    SUCCESS = "success"
    RETRY = "retry"  # transient: try again later
    FAIL = "fail"  # permanent for this row: record a failure now
    STOP_JOB = "stop_job"  # the token was refused: no row can succeed (401/403)


# reliability.md §2, spelled out. Statuses not listed fall back on their class: 5xx retry, the rest fail.
_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_AUTH_STATUSES = frozenset({401, 403})
# Statuses that mean "the server has too much work": they shrink the adaptive concurrency limit.
_OVERLOAD_STATUSES = frozenset({429, 503})
#: Outcomes that say the endpoint is not there (as opposed to overloaded, 429, or refusing the row).
_UNAVAILABLE_STATUSES = frozenset({500, 502, 503, 504})

#: The failure of a row whose endpoint answered that it is paused (the job stops, resumable).
ENDPOINT_PAUSED = FailureType.ENDPOINT_PAUSED
#: The failure of a row whose answers were not valid against the output schema, redraws included.
INVALID_OUTPUT = FailureType.INVALID_OUTPUT


def classify(outcome: int | FailureType) -> Verdict:
    """Classify an HTTP status, or a failure without a usable status, per reliability.md §2.

    Retryable: timeouts, connection errors, a bad 200 body, 429, 500, 502, 503, 504 and any other 5xx.
    Job-stopping: 401, 403. Everything else that is not a 2xx (400, 404, 413, 422, other 4xx, stray
    1xx/3xx) is a permanent failure for the row.
    """
    if isinstance(outcome, FailureType):
        return Verdict.RETRY if outcome in TRANSPORT_FAILURES else Verdict.FAIL
    if 200 <= outcome < 300:
        return Verdict.SUCCESS
    if outcome in _AUTH_STATUSES:
        return Verdict.STOP_JOB
    if outcome in _RETRYABLE_STATUSES or 500 <= outcome < 600:
        return Verdict.RETRY
    return Verdict.FAIL


def is_overload(failure: RequestFailed) -> bool:
    """True when a failure says the endpoint is over capacity (429, 503, a timeout).

    These shrink the adaptive concurrency limit; other failures say nothing about load.
    """
    return failure.status in _OVERLOAD_STATUSES or failure.error_type == FailureType.TIMEOUT


def is_rejected(failure: RequestFailed) -> bool:
    """TGI's own 429: no Retry-After, an instant refusal for want of capacity (it measures capacity)."""
    return failure.status == 429 and failure.retry_after is None


def is_unavailable(failure: RequestFailed) -> bool:
    """True when a failure says the endpoint is not there: a 5xx from a proxy, a timeout, a refused connection."""
    if failure.model_answered:
        # TGI's own JSON error (a 500 ``incomplete_generation``): the model ran and failed on this row.
        # Taking it for an outage would let a few such rows at the end of a job hold the breaker open,
        # each probe failing again, until the outage timeout.
        return False
    if failure.status is not None:
        return failure.status in _UNAVAILABLE_STATUSES
    return failure.error_type in (FailureType.CONNECTION, FailureType.TIMEOUT)


def is_missing_route(failure: RequestFailed, *, succeeded: bool) -> bool:
    """A route that does not exist (reliability.md §2): a redirect, or a 404/405 that is a proxy's page or
    comes before anything succeeded. A model server's own JSON 404 after successes is the row's."""
    status = failure.status
    if status is None:
        return False
    if 300 <= status < 400:
        return True
    return status in (404, 405) and not (succeeded and failure.model_answered)


def is_paused_answer(body: bytes) -> bool:
    """The Inference Endpoints proxy's plain-text answer for a paused endpoint (protocols.md §3).

    It is text, not TGI's JSON error, so it is recognised by its words, as huggingface_hub recognises
    the control plane's "already running". Not the row's fault: the endpoint itself is paused.
    """
    return b"endpoint is paused" in body[:512].lower()


def parse_retry_after(value: str | None, now: float, *, maximum: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value, clamped to ``[0, maximum]``.

    ``value`` is either a number of seconds (integer or decimal) or an HTTP date; ``now`` is the
    current wall-clock time (``time.time()``), needed for the date form. Returns ``None`` when the
    header is absent or unreadable, so that the caller falls back on plain backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means it said so implicitly
            return None
        seconds = when.timestamp() - now
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), maximum)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt: give up (``retry`` is False), or retry after ``delay_s``."""

    retry: bool
    delay_s: float = 0.0

    @classmethod
    def give_up(cls) -> Decision:
        """Stop trying this row in this run."""
        return cls(retry=False)

    @classmethod
    def retry_after(cls, delay_s: float) -> Decision:
        """Try again once ``delay_s`` seconds have passed."""
        return cls(retry=True, delay_s=delay_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How many attempts a row gets per run, and how long to wait between them.

    ``max_attempts`` counts every attempt including the first. Backoff is full jitter,
    ``uniform(0, min(backoff_cap, backoff_base * 2**attempt))`` with ``attempt`` the 0-based index of
    the attempt that just failed, so the first retry waits up to ``backoff_base``. A server's
    ``Retry-After`` (already parsed into ``RequestFailed.retry_after``) is a floor: the delay is at
    least that, clamped to ``max_retry_after``.
    """

    # The defaults are the spec's: a job without a `retries` section and a bare RetryPolicy() agree.
    max_attempts: int = RetrySpec.max_attempts
    backoff_base: float = RetrySpec.backoff_base
    backoff_cap: float = RetrySpec.backoff_cap
    max_retry_after: float = RetrySpec.max_retry_after

    @classmethod
    def from_spec(cls, spec: RetrySpec) -> RetryPolicy:
        """The policy a job's ``retries`` section describes (its ``budget_ratio`` goes to :class:`RetryBudget`)."""
        return cls(
            max_attempts=spec.max_attempts,
            backoff_base=spec.backoff_base,
            backoff_cap=spec.backoff_cap,
            max_retry_after=spec.max_retry_after,
        )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_base < 0 or self.backoff_cap < 0 or self.max_retry_after < 0:
            raise ValueError("backoff_base, backoff_cap and max_retry_after must not be negative")

    def delay(self, failure: RequestFailed, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before the next attempt: jittered backoff, never less than Retry-After."""
        # Exponent capped so that 2**attempt cannot overflow a float for absurd attempt counts.
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** min(attempt, 64))
        wait = rng.uniform(0.0, ceiling)
        if failure.retry_after is not None:
            wait = max(wait, min(max(failure.retry_after, 0.0), self.max_retry_after))
        return wait

    def decide(self, failure: RequestFailed, attempt: int, rng: random.Random) -> Decision:
        """Decide after attempt number ``attempt`` (0-based) failed with ``failure``."""
        if not failure.retryable or attempt + 1 >= self.max_attempts:
            return Decision.give_up()
        return Decision.retry_after(self.delay(failure, attempt, rng))


class RetryBudget:
    """Keeps retries under ``ratio`` of all requests sent over the last ``window_s`` seconds.

    Google SRE's client-side retry budget: when a whole endpoint is failing, per-row retries would
    multiply its load; a budget caps that at about 10%. ``min_retries`` per window are always allowed
    (Finagle's ``minRetriesPerSec``; the defaults give 5 retries/s over a 10 s window) so that a job
    whose failure share is above the ratio slows down instead of stalling: with a long window and a
    small floor, workers parked on the budget send no new requests, and so earn no new allowance.
    Past the budget the caller waits (:meth:`time_until_available`) instead of dropping the row.
    Call :meth:`record_request` for every request sent, retries included.

    Counts are kept in ``buckets`` time slices so memory stays constant at any request rate.
    """

    def __init__(
        self,
        ratio: float = RetrySpec.budget_ratio,
        window_s: float = 10.0,
        min_retries: int = 50,
        *,
        buckets: int = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or window_s <= 0 or min_retries < 0 or buckets < 1:
            raise ValueError("ratio and min_retries must not be negative; window_s and buckets must be positive")
        self.ratio = ratio
        self.window_s = window_s
        self.min_retries = min_retries
        self._clock = clock
        self._width = window_s / buckets
        # Each bucket: [slice index, requests, retries]; oldest on the left.
        self._buckets: deque[list[int]] = deque()
        self._slice_ends_at = -math.inf  # when the newest bucket's slice ends
        self._requests = 0
        self._retries = 0

    def _current(self) -> list[int]:
        index = math.floor(self._clock() / self._width)
        # A bucket stays while any part of it lies inside the window (up to one slice of slack).
        oldest_kept = index - math.ceil(self.window_s / self._width) + 1
        while self._buckets and self._buckets[0][0] < oldest_kept:
            _, requests, retries = self._buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        self._slice_ends_at = (index + 1) * self._width
        return self._buckets[-1]

    @property
    def allowed(self) -> float:
        """Retries allowed in the current window."""
        self._current()
        return max(float(self.min_retries), self.ratio * self._requests)

    @property
    def retries_in_window(self) -> int:
        """Retries spent in the current window."""
        self._current()
        return self._retries

    def record_request(self) -> None:
        """Count one request sent (a first attempt or a retry)."""
        # Within the newest bucket's slice nothing has left the window since: no need to look.
        bucket = self._buckets[-1] if self._clock() < self._slice_ends_at else self._current()
        bucket[1] += 1
        self._requests += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one; False means wait and ask again."""
        bucket = self._current()
        if self._retries + 1 > max(float(self.min_retries), self.ratio * self._requests):
            return False
        bucket[2] += 1
        self._retries += 1
        return True

    def time_until_available(self) -> float:
        """Seconds until the oldest retry leaves the window (0 when a retry can be spent now).

        New requests raise the allowance too, so this is an upper bound: callers should wait at most
        this long, and ask again sooner if they like.
        """
        self._current()
        if self._retries + 1 <= max(float(self.min_retries), self.ratio * self._requests):
            return 0.0
        slices = math.ceil(self.window_s / self._width)
        for index, _, retries in self._buckets:
            if retries:
                return max(0.0, (index + slices) * self._width - self._clock())
        # No retry to expire (ratio or min_retries of 0): only new requests can help; look again soon.
        return self._width


# --------------------------------------------------------------------------------------------------
# The decision after one attempt of a row


# A backoff for failures that cost no attempt (429s, an outage, a cold start) grows with consecutive
# ones, up to this exponent: with the default policy that is min(cap, 0.5 * 2**6) = 30 s at most.
_STREAK_MAX_EXPONENT = 6


class Action(str, enum.Enum):
    """What the dispatcher does with a row after one attempt."""

    DONE = "done"  # the row has its answer
    FAIL = "fail"  # record ``Step.failure`` for the row now
    RETRY = "retry"  # try again after ``Step.delay_s`` (at once, on the same endpoint, for a redraw)
    REROUTE = "reroute"  # the endpoint is drained: the row goes to another one at once, its tries kept


class Drain(str, enum.Enum):
    """Why a failure drains its endpoint (it takes no more requests; its rows go elsewhere or wait)."""

    AUTH = "auth"  # 401/403: the token is refused
    PAUSED = "paused"  # the proxy says the endpoint is paused
    MISSING_ROUTE = "missing_route"  # a redirect, or a 404/405 that is not the model's
    UNREACHED = "unreached"  # connections refused for longer than outage_timeout
    THROTTLED = "throttled"  # nothing but 429s for longer than outage_timeout


@dataclass(frozen=True, slots=True)
class Tries:
    """What one row has been through so far in this run; :func:`next_step` returns the next one."""

    burned: int = 0  # failed attempts that count against policy.max_attempts
    cold_streak: int = 0  # consecutive failures excused (an outage, a cold start), for their backoff
    throttle_streak: int = 0  # the row's 429s so far, for their backoff (they cost no attempt)
    redraws: int = 0  # tries after an answer not valid against the output schema
    unreached_since: float | None = None  # when the row's connections began to be refused


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of :func:`next_step`: what to do, and the row's tries from now on."""

    action: Action
    tries: Tries
    delay_s: float = 0.0
    spend_budget: bool = True  # whether the retry waits for the retry budget
    ahead: bool = False  # the retry takes the next slot an answer frees, ahead of rows not yet sent
    failure: RequestFailed | None = None  # the failure to record (FAIL)
    drain: Drain | None = None  # why the endpoint is drained now (REROUTE; None: it was already)
    for_s: float = 0.0  # how long the endpoint was unreached or throttled (UNREACHED, THROTTLED)


class EndpointView(Protocol):
    """What the decision reads of the endpoint that just answered (a :class:`~batchrun.routing.Route`)."""

    @property
    def is_drained(self) -> bool: ...

    @property
    def succeeded(self) -> bool:
        """Whether any request to it succeeded in this run."""
        ...

    @property
    def suspects_outage(self) -> bool: ...

    def throttled_for(self, now: float) -> float: ...

    def excused(self, failure: RequestFailed) -> bool:
        """Whether the endpoint excuses ``failure`` (a cold start): it costs the row no attempt."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryRules:
    """The job's rules for :func:`next_step`: the policy, the outage timeout and the redraws allowed."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    outage_timeout_s: float = DEFAULT_OUTAGE_TIMEOUT
    invalid_output_retries: int = RetrySpec.invalid_output


def next_step(
    outcome: Mapping[str, Any] | Redraw | RequestFailed,
    tries: Tries,
    endpoint: EndpointView,
    *,
    rules: RetryRules,
    now: float,
    sent_at: float,
    rng: random.Random,
) -> Step:
    """The whole retry decision after one attempt (reliability.md §2), pure but for ``rng``.

    ``outcome`` is the answer the task kept, a :class:`~batchrun.tasks.base.Redraw` it asked for, or
    the attempt's failure; ``sent_at`` is when the attempt was sent and ``now`` when its outcome came.
    """
    if isinstance(outcome, Redraw):
        redraws = tries.redraws + 1
        if redraws > rules.invalid_output_retries:
            failure = RequestFailed(INVALID_OUTPUT, outcome.reason, status=200, retryable=False)
            return Step(Action.FAIL, tries, failure=failure)
        # Nothing is wrong with the endpoint: the same request with a fresh seed, at once, no budget.
        return Step(Action.RETRY, replace(tries, redraws=redraws), spend_budget=False)
    if not isinstance(outcome, RequestFailed):
        return Step(Action.DONE, tries)
    return _after_failure(outcome, tries, endpoint, rules=rules, now=now, sent_at=sent_at, rng=rng)


def _drain_for(failure: RequestFailed, endpoint: EndpointView) -> Drain | None:
    """The reason ``failure`` drains its endpoint at once, whatever the row's tries."""
    if failure.status is not None and classify(failure.status) is Verdict.STOP_JOB:
        return Drain.AUTH
    if failure.error_type == ENDPOINT_PAUSED:
        return Drain.PAUSED
    if is_missing_route(failure, succeeded=endpoint.succeeded):
        return Drain.MISSING_ROUTE
    return None


def _after_failure(
    failure: RequestFailed, tries: Tries, endpoint: EndpointView, *, rules: RetryRules, now: float,
    sent_at: float, rng: random.Random,
) -> Step:
    if endpoint.is_drained:  # drained meanwhile (it failed elsewhere): the row keeps its tries
        return Step(Action.REROUTE, tries)
    drain = _drain_for(failure, endpoint)
    if drain is not None:
        return Step(Action.REROUTE, tries, drain=drain)
    # Unreached for longer than the outage timeout (with no breaker open to say so, as when only this
    # row is left): the endpoint is gone, and the row waits for another one or the next run.
    unreached_since = (tries.unreached_since or sent_at) if failure.unreached else None
    if unreached_since is not None and now - unreached_since > rules.outage_timeout_s:
        return Step(Action.REROUTE, tries, drain=Drain.UNREACHED, for_s=now - unreached_since)
    if tries.unreached_since != unreached_since:
        tries = replace(tries, unreached_since=unreached_since)
    throttled = failure.status == 429
    throttled_for = endpoint.throttled_for(now) if throttled else 0.0
    if throttled_for > rules.outage_timeout_s:
        # Nothing but 429s for longer than the outage timeout: bounded like an outage, the rows not done
        # are kept pending for the next run (or go to another endpoint).
        return Step(Action.REROUTE, tries, drain=Drain.THROTTLED, for_s=throttled_for)
    policy = rules.policy
    if throttled:
        # A 429 is the endpoint saying "not now": it costs the row no attempt, nor retry budget. The
        # limit already holds the load at what the endpoint takes (down to 1); the row backs off,
        # longer with each 429 in a row (full jitter, Retry-After honoured). A row's first instant
        # refusal (TGI's, for want of capacity) is not a timed retry: the limit was just cut to the
        # capacity it measured, and the row waits at the head of the queue for the slot the next
        # answer frees, when the endpoint has room again (a sleep would leave that slot idle).
        streak = tries.throttle_streak
        # Over the lane's rate (rate_limited): its rate gate paused the lane (Retry-After honoured there) and
        # holds the retry until the lane may send again; meanwhile the row may go to another lane at once.
        tries = replace(tries, throttle_streak=streak + 1)
        if not failure.rate_limited and streak == 0 and failure.retry_after is None:
            return Step(Action.RETRY, tries, spend_budget=False, ahead=True)
        delay = 0.0 if failure.rate_limited else policy.delay(failure, min(streak, _STREAK_MAX_EXPONENT), rng)
        return Step(Action.RETRY, tries, delay_s=delay, spend_budget=False)
    # A connection that could not even be made is never the row's fault (a server going away refuses
    # new connections while it still finishes the answers in flight, so other rows' successes would
    # hide the outage from the breaker, and one row could use up its attempts).
    outage = failure.retryable and is_unavailable(failure) and (endpoint.suspects_outage or failure.unreached)
    if outage or (failure.retryable and endpoint.excused(failure)):
        # The endpoint, not the row, is failing (or waking up): the row keeps its attempts and backs off;
        # once the breaker is open it holds the row until the endpoint is back. An outage's retry does
        # not wait for the retry budget: the breaker already spares the endpoint.
        streak = tries.cold_streak
        delay = policy.delay(failure, min(streak, _STREAK_MAX_EXPONENT), rng)
        return Step(Action.RETRY, replace(tries, cold_streak=streak + 1), delay_s=delay, spend_budget=not outage)
    decision = policy.decide(failure, tries.burned, rng)
    tries = replace(tries, burned=tries.burned + 1, cold_streak=0)
    if not decision.retry:
        return Step(Action.FAIL, tries, failure=failure)
    return Step(Action.RETRY, tries, delay_s=decision.delay_s)


def server_message(status: int, body: bytes) -> tuple[str, bool]:
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
    return redact(f"HTTP {status}: {text}")[:MAX_MESSAGE_CHARS], model_answered


def answer_failure(status: int, headers: Mapping[str, str], body: bytes, *, max_retry_after: float) -> RequestFailed:
    """An answer that is not a success (``status`` outside 2xx), as the failure it is: its verdict, the
    server's message, its Retry-After, and whether it is a 429 for the lane's rate (the gate's to hear).

    A 400 that says the endpoint is paused is not the row's fault: it fails as ENDPOINT_PAUSED, which
    stops the job (resumable) instead of losing the row for good.
    """
    message, model_answered = server_message(status, body)
    if 300 <= status < 400 and headers.get("Location"):  # where it was sent is what the user must see
        message = redact(f"HTTP {status}: redirected to {headers['Location']}")[:MAX_MESSAGE_CHARS]
    if status == 400 and is_paused_answer(body):
        return RequestFailed(ENDPOINT_PAUSED, message, status=status, retryable=False)
    retry_after = parse_retry_after(headers.get("Retry-After"), time.time(), maximum=max_retry_after)
    rate_limited = status == 429 and is_rate_refusal(headers, body)
    if rate_limited and retry_after is None and (ms := retry_after_ms(headers)) is not None:
        retry_after = min(ms, max_retry_after)
    return RequestFailed(
        http_failure_type(status),
        message,
        status=status,
        retryable=classify(status) is Verdict.RETRY,
        retry_after=retry_after,
        model_answered=model_answered,
        rate_limited=rate_limited,
    )


def retry_after_ms(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms`` in seconds (OpenAI's finer Retry-After), or None."""
    value = headers.get("retry-after-ms")
    try:
        seconds = float(value) / 1000 if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None
